"""SQLAlchemy engines as pacsflow needs them: bound values hidden from error text, SQLite fit for several tasks."""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url

SQLITE_BUSY_SECONDS = 60  # parallel retrieval tasks share one SQLite audit file: wait for the lock, don't fail


def make_engine(url: str | URL) -> Engine:
    """An engine whose exceptions never carry bound values (ANs, patient IDs), per the patient-data rule.

    SQLite files get write-ahead logging and a generous busy timeout, so concurrent tasks queue for the
    write lock instead of failing with "database is locked"."""
    url = make_url(url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, hide_parameters=True, pool_pre_ping=True)
    engine = create_engine(url, hide_parameters=True, connect_args={"timeout": SQLITE_BUSY_SECONDS})
    if url.database not in (None, "", ":memory:"):
        event.listen(engine, "connect", _sqlite_wal)
    return engine


def _sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_SECONDS * 1000}")
    cursor.close()
