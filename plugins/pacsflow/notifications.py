"""Tell someone when a run fails: a JSON POST to the HTTP endpoint of an Airflow connection (chat webhook,
incident tool). Only identifiers of the run, never of a patient."""

from __future__ import annotations

import json
import logging
import urllib.request
from typing import Any

from airflow.sdk import BaseHook, BaseNotifier

log = logging.getLogger("pacsflow")
TIMEOUT_SECONDS = 10


class RunFailedWebhook(BaseNotifier):
    """``on_failure_callback`` of a pacsflow DAG. The connection's ``host`` is the full URL (``http://...``);
    its ``extra.headers`` (a mapping) are sent as they are, e.g. an authorization header."""

    def __init__(self, *, conn_id: str) -> None:
        super().__init__()
        self.conn_id = conn_id

    def notify(self, context: Any) -> None:
        conn = BaseHook.get_connection(self.conn_id)
        dag_run = context.get("dag_run")
        payload = {
            "event": "pacsflow.run_failed",
            "dag_id": context["dag"].dag_id,
            "run_id": getattr(dag_run, "run_id", None),
            "data_interval_start": str(getattr(dag_run, "data_interval_start", "") or ""),
            "data_interval_end": str(getattr(dag_run, "data_interval_end", "") or ""),
            "reason": str(context.get("reason") or "a task failed; see the audit_summary task log"),
        }
        headers = {"Content-Type": "application/json", **dict(conn.extra_dejson.get("headers") or {})}
        request = urllib.request.Request(
            str(conn.host), data=json.dumps(payload).encode(), headers=headers, method="POST"
        )
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            log.info("run failure sent to %s: HTTP %s", self.conn_id, response.status)
