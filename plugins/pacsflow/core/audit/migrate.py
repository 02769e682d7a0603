"""Schema migrations of the audit store (Alembic, scripts in ``migrations/``), applied on first use.

Why on first use rather than failing until an operator runs ``pacsflow db upgrade``: the previous release created
its tables on connect, so every deployment relies on the tasks preparing the store themselves; the migrations are
short, and they run under a lock in one transaction, so two tasks starting together cannot both migrate. An
upgrade that fails names ``pacsflow db upgrade``, which does the same thing by hand.

Three starting points are told apart under the lock:
- a version row: upgrade from it;
- no version row and no pacsflow tables (a new database): create the current tables and stamp them at head;
- no version row but the tables (every database of the previous release, which had no migrations): stamp the
  first revision, the previous release's schema, then upgrade.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from pacsflow.core.audit.schema import VERSION_TABLE, metadata, runs
from pacsflow.core.errors import ConfigurationError

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
PREVIOUS_RELEASE = "0001"  # the schema of the release before migrations existed (tables, no version row)
# pg_advisory_xact_lock key: any constant that other applications of the database are unlikely to use.
PG_LOCK_KEY = 0x7061637366_6C6F77  # "pacsflow"


class SchemaUpgradeError(RuntimeError):
    """The audit database could not be brought to the current schema."""


def alembic_config(connection: Connection | None = None) -> Config:
    """The Alembic configuration of the audit store; ``connection`` is the one the migrations run on."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


@cache
def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migration scripts in {MIGRATIONS}")
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision the database is stamped at; None when it has no version row."""
    return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()


def ensure_current_schema(engine: Engine) -> None:
    """Bring the audit database to the current schema unless it is there already (one cheap read when it is)."""
    _make_sqlite_directory(engine)
    with engine.connect() as connection:
        if current_revision(connection) == head_revision():
            return
    try:
        upgrade(engine)
    except ConfigurationError:
        raise
    except Exception as error:
        raise SchemaUpgradeError(
            f"the audit database ({engine.url.get_backend_name()}) could not be upgraded to schema revision "
            f"{head_revision()}: {error}. Run `pacsflow db upgrade` with the same database to retry and see why"
        ) from error


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the audit database to the current schema; returns the revisions before and after ("new" for a new
    database). Holds the lock for the whole migration, which is one transaction."""
    _make_sqlite_directory(engine)
    with engine.connect() as connection:
        _lock(connection)
        before = current_revision(connection)
        _check_known(before)
        if before is None and not inspect(connection).has_table(runs.name):
            metadata.create_all(connection)
            command.stamp(alembic_config(connection), "head")
            connection.commit()
            log.info("audit store created at schema revision %s", head_revision())
            return "new", head_revision()
        if before is None:
            log.info("audit store of the previous release (no version row): stamping revision %s", PREVIOUS_RELEASE)
            command.stamp(alembic_config(connection), PREVIOUS_RELEASE)
        if before != head_revision():
            command.upgrade(alembic_config(connection), "head")
            log.info("audit store upgraded from schema revision %s to %s", before or PREVIOUS_RELEASE, head_revision())
        connection.commit()
        return before, head_revision()


def remove(engine: Engine) -> None:
    """Drop the audit store's tables through the migrations' downgrades, leaving an empty version table (taking
    pacsflow out of a database it shares, or a test starting afresh); the next store starts a new database."""
    with engine.connect() as connection:
        _lock(connection)
        command.downgrade(alembic_config(connection), "base")
        connection.commit()


def _lock(connection: Connection) -> None:
    """Serialise migrations: the lock lasts until the transaction it opens ends."""
    dialect = connection.dialect.name
    if dialect == "postgresql":  # DDL is transactional: the second task waits, then finds the schema current
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
    elif dialect == "sqlite":  # the write lock at once (busy timeout: see pacsflow.core.db); DDL is transactional
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _check_known(revision: str | None) -> None:
    if revision is None:
        return
    try:
        known = ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        known = False
    if not known:
        raise ConfigurationError(
            f"the audit database is at schema revision {revision}, which this pacsflow does not know (its newest "
            f"is {head_revision()}): a newer pacsflow upgraded it; install that version on this worker too"
        )


def _make_sqlite_directory(engine: Engine) -> None:
    database = engine.url.database
    if engine.url.get_backend_name() == "sqlite" and database not in (None, "", ":memory:"):
        Path(str(database)).parent.mkdir(parents=True, exist_ok=True)  # a fresh data root
