"""The audit routes answer only to Airflow's auth manager: no credentials 401, a user who may not read the DAG
403 on every run route and an empty runs list, and the plugin is what the api-server registered."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from tests.ui.conftest import DAG_ID, RUN_IDS

RUN_PATH = f"/pacsflow-audit/dags/{DAG_ID}/runs/{quote(RUN_IDS[1], safe='')}"
RUN_ROUTES = (
    "",
    "/audit.csv",
    "/audit.parquet",
    "/accessions/an:0000000000000000",
    "/series/0000000000000000",
    "/series/0000000000000000/preview.png",
)

pytestmark = [pytest.mark.airflow, pytest.mark.orthanc]


def test_the_api_server_registers_the_plugin_with_its_views(api_server):
    status, body, _ = api_server.get("/api/v2/plugins", "auditor")
    assert status == 200
    plugin = next(p for p in json.loads(body)["plugins"] if p["name"] == "pacsflow_audit")
    assert {(v["destination"], v["href"]) for v in plugin["external_views"]} == {
        ("nav", "/pacsflow-audit/runs"),
        ("dag_run", "/pacsflow-audit/dags/{DAG_ID}/runs/{RUN_ID}"),
    }
    assert [app["url_prefix"] for app in plugin["fastapi_apps"]] == ["/pacsflow-audit"]
    status, body, _ = api_server.get("/api/v2/plugins/importErrors", "auditor")
    assert status == 200 and json.loads(body)["import_errors"] == []


def test_without_credentials_every_route_is_refused(api_server):
    for path in (
        "/pacsflow-audit/runs",
        "/pacsflow-audit/static/audit.css",
        *(RUN_PATH + route for route in RUN_ROUTES),
        f"/pacsflow-audit/dags/{DAG_ID}/compare",
    ):
        assert api_server.get(path, None)[0] == 401, path


def test_a_user_who_may_not_read_the_dag_sees_none_of_its_audit(api_server):
    for path in (*(RUN_PATH + route for route in RUN_ROUTES), f"/pacsflow-audit/dags/{DAG_ID}/compare"):
        assert api_server.get(path, "outsider")[0] == 403, path
    assert api_server.get(RUN_PATH + "/search", "outsider", data=b"accession_number=1")[0] == 403
    status, body, _ = api_server.get("/pacsflow-audit/runs", "outsider")
    assert status == 200
    assert DAG_ID not in body.decode() and RUN_IDS[1] not in body.decode()
    # the same pages answer the auditor
    assert api_server.get(RUN_PATH, "auditor")[0] == 200
    status, body, _ = api_server.get("/pacsflow-audit/runs", "auditor")
    assert status == 200 and all(run_id in body.decode() for run_id in RUN_IDS)
