"""The Airflow plugin: the audit pages mounted in the api-server, an "Extraction audit" entry in the
navigation and an "Audit" tab on every DAG run (Airflow 3 style: ``fastapi_apps`` + ``external_views``).

Registered through the ``airflow.plugins`` entry point of the pacsflow distribution (``pip install``), which
every Airflow process reads; the plugins-folder loader skips ``pacsflow/ui`` (``plugins/.airflowignore``)
so the plugin is not registered twice. The FastAPI app is built only when the api-server asks for it, so
schedulers and workers that load plugins do not import the web stack.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/pacsflow-audit"


class PacsflowAuditPlugin(AirflowPlugin):
    name = "pacsflow_audit"
    external_views = [  # noqa: RUF012  AirflowPlugin's API is mutable class attributes (typed list[Any] there)
        {
            "name": "Extraction audit",
            "href": f"{URL_PREFIX}/runs",
            "destination": "nav",
            "category": "browse",
            "url_route": "pacsflow-audit",
        },
        {
            "name": "Extraction audit",
            "href": f"{URL_PREFIX}/dags/{{DAG_ID}}/runs/{{RUN_ID}}",
            "destination": "dag_run",
            "url_route": "pacsflow-audit-run",
        },
    ]

    @cached_property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        from pacsflow.ui.app import create_app

        return [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "pacsflow extraction audit"}]
