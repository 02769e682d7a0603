"""Alembic environment of the audit store. pacsflow runs it through :mod:`pacsflow.core.audit.migrate`, which
passes the connection (inside its lock and transaction) in ``config.attributes["connection"]``. A maintainer
writes a new revision with ``alembic.command.revision(alembic_config(connection), message, autogenerate=True)``
against a database at head, then reviews and edits it."""

from __future__ import annotations

from alembic import context
from pacsflow.core.audit.schema import VERSION_TABLE, metadata
from sqlalchemy.engine import Connection


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,  # never Airflow's alembic_version when both share a database
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters columns by copying the table
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the audit store's migrations through pacsflow.core.audit.migrate (a connection is needed)")
run_migrations(connection)
