"""A SQLAlchemy engine from an Airflow connection: the RIS to query and the audit store to write."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook
from sqlalchemy.engine import URL, Engine, make_url

from pacsflow.core.db import make_engine

# Airflow connection types -> SQLAlchemy dialects for connections given as fields, not as a URL.
_DIALECTS = {
    "postgres": "postgresql+psycopg2",
    "postgresql": "postgresql+psycopg2",
    "mysql": "mysql+pymysql",
    "mssql": "mssql+pymssql",
    "oracle": "oracle+oracledb",
}


class DatabaseHook(BaseHook):
    """Any SQLAlchemy database. Either ``extra.sqlalchemy_url`` (e.g. ``sqlite:////data/ris.sqlite``) or the
    connection's host/port/login/password/schema with a known ``conn_type`` (postgres, mysql, mssql, oracle)."""

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


def connection_url(conn: Any) -> URL:
    """The SQLAlchemy URL of an Airflow connection (task SDK or core model): ``extra.sqlalchemy_url``, else its
    fields with a known ``conn_type``."""
    explicit = conn.extra_dejson.get("sqlalchemy_url")
    if explicit:
        return make_url(explicit)
    dialect = _DIALECTS.get(conn.conn_type or "")
    if dialect is None:
        raise ValueError(
            f"connection {conn.conn_id!r}: set extra.sqlalchemy_url, or use one of the conn types {sorted(_DIALECTS)}"
        )
    return URL.create(
        dialect,
        username=conn.login or None,
        password=conn.password or None,
        host=conn.host or None,
        port=conn.port or None,
        database=conn.schema or None,
    )
