"""SQLAlchemy engines as pacsflow needs them: bound values hidden from error text, SQLite fit for several tasks."""

from __future__ import annotations

from functools import partial
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
    timeout = url.query.get("timeout")  # a URL's own ?timeout= wins
    busy_seconds = float(timeout) if isinstance(timeout, str) else SQLITE_BUSY_SECONDS
    engine = create_engine(url, hide_parameters=True, connect_args={"timeout": busy_seconds})
    if url.database not in (None, "", ":memory:"):
        event.listen(engine, "connect", partial(_sqlite_wal, busy_ms=int(busy_seconds * 1000)))
    return engine


def _sqlite_wal(dbapi_connection: Any, _record: Any, *, busy_ms: int) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
    cursor.close()
