"""A SQLAlchemy engine from an Airflow connection: the RIS to query and the audit store to write.

A connection names its database either as ``extra.sqlalchemy_url`` or by its fields, with a connection type whose
provider has a SQL hook (``postgres`` from apache-airflow-providers-postgres, ``mysql``, ``mssql``, ...): that
hook builds the URL, with its driver and options (``sqlalchemy_scheme``, ``sqlalchemy_query`` of the postgres
connection), so pacsflow keeps no table of dialects of its own. The engine is always
:func:`pacsflow.core.db.make_engine`'s: bound values hidden from errors, SQLite set up for concurrent tasks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowException
from sqlalchemy.engine import URL, Engine, make_url

from pacsflow.core.db import make_engine
from pacsflow.core.errors import ConfigurationError

if TYPE_CHECKING:
    from airflow.models.connection import Connection as StoredConnection
    from airflow.sdk import Connection


class DatabaseHook(BaseHook):
    """Any SQLAlchemy database. Either ``extra.sqlalchemy_url`` (e.g. ``sqlite:////data/ris.sqlite``) or the
    connection's host/port/login/password/schema with a connection type that has a SQL hook (postgres, ...)."""

    conn_name_attr = "database_conn_id"
    default_conn_name = "pacsflow_ris"
    conn_type = "generic"
    hook_name = "SQLAlchemy database"

    def __init__(self, database_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.database_conn_id = database_conn_id

    def sqlalchemy_url(self) -> URL:
        return connection_url(self.get_connection(self.database_conn_id))

    def get_conn(self) -> Engine:
        return make_engine(self.sqlalchemy_url())


def connection_url(conn: Connection | StoredConnection) -> URL:
    """The SQLAlchemy URL of an Airflow connection (task SDK or core model): ``extra.sqlalchemy_url``, else the
    URL that the SQL hook of its connection type builds from its fields."""
    explicit = conn.extra_dejson.get("sqlalchemy_url")
    if explicit:
        return make_url(explicit)
    from airflow.providers.common.sql.hooks.sql import DbApiHook  # not at import: DAG parsing stays light

    try:
        hook = conn.get_hook()
    except (AirflowException, ImportError, AttributeError) as error:
        # No provider for the type; Airflow registers "generic" without a hook class (get_hook fails on it).
        raise _no_sql_hook(conn) from error
    if not isinstance(hook, DbApiHook):
        raise _no_sql_hook(conn)
    try:
        return hook.sqlalchemy_url
    except NotImplementedError:  # a SQL hook that only builds a URI string
        return make_url(hook.get_uri())


def _no_sql_hook(conn: Connection | StoredConnection) -> ConfigurationError:
    return ConfigurationError(
        f"connection {conn.conn_id!r}: set extra.sqlalchemy_url, or use a connection type with a SQL hook "
        f"(postgres, mysql, ...: its Airflow provider installed); {conn.conn_type!r} has none"
    )
