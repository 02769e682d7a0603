"""A SQLAlchemy engine from an Airflow connection: the RIS to query and the audit store to write."""

from __future__ import annotations

from airflow.sdk import BaseHook
from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Engine, make_url

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
        conn = self.get_connection(self.database_conn_id)
        explicit = conn.extra_dejson.get("sqlalchemy_url")
        if explicit:
            return make_url(explicit)
        dialect = _DIALECTS.get(conn.conn_type or "")
        if dialect is None:
            raise ValueError(
                f"connection {self.database_conn_id!r}: set extra.sqlalchemy_url, or use one of the conn types "
                f"{sorted(_DIALECTS)}"
            )
        return URL.create(dialect, username=conn.login or None, password=conn.password or None,
                          host=conn.host or None, port=conn.port or None, database=conn.schema or None)

    def get_conn(self) -> Engine:
        # hide_parameters: bound values (ANs, patient IDs) must never reach exception text or logs
        return create_engine(self.sqlalchemy_url(), pool_pre_ping=True, hide_parameters=True)
