"""A finished demo extraction in an audit database, and a real ``airflow api-server`` serving its audit pages.

Two runs of the demo extraction go through the library (``run_extraction``) against Orthanc loaded with a demo
hospital: the first over half the cohort, the second over all of it, so a comparison has something to show.
The api-server runs alone (SQLite metadata DB, LocalExecutor settings, simple auth manager) with two users:
``auditor`` (role viewer: may read every DAG) and ``outsider`` (no role: may read nothing); the DAG is
serialized into the metadata DB so the UI can show its runs.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from pacsflow.core.audit import AuditStore
from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.dicom.receiver import StoreReceiver
from pacsflow.core.pipeline import ExtractionSettings, RunContext, run_extraction
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.core.settings import DATA_ROOT_ENV, load_definition
from pacsflow.core.storage import StorageLayout
from pacsflow.demo.deployment import api_healthy, service, wait_until
from pacsflow.demo.environment import (
    DEMO_DAG_ID,
    DEMO_DEFINITION,
    airflow_environment,
    demo_cohort,
)
from pacsflow.demo.hospital import build_hospital, load_ground_truth
from pacsflow.demo.sandbox import orthanc
from pydicom import dcmread

from tests.helpers import free_port

DEMO = load_definition(DEMO_DEFINITION)
DAG_ID = DEMO_DAG_ID
RUN_IDS = ("manual__2026-12-01T08:00:00+00:00", "manual__2026-12-02T08:00:00+00:00")
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
USERS = {"auditor": "viewer", "outsider": "", "operator": "admin"}  # operator: only to create a DAG run
STARTUP_SECONDS = 120


@dataclass(frozen=True)
class DemoAudit:
    audit_url: str
    data_root: Path
    truth: dict[str, Any]
    patient_names: frozenset[str]

    def run_key(self, index: int) -> str:
        return f"{DAG_ID}/{RUN_IDS[index]}"


@pytest.fixture(scope="session")
def demo_audit(tmp_path_factory) -> DemoAudit:
    work = tmp_path_factory.mktemp("audit-ui")
    hospital = build_hospital(work / "hospital", accessions=30, seed=5, image_size=64)
    data_root = work / "data"
    data_root.mkdir()
    audit_url = f"sqlite:///{data_root / 'audit.sqlite'}"
    layout = StorageLayout(data_root / "dicom")
    receiver = ReceiverConfig(ae_title="PACSFLOW", port=free_port())
    settings = ExtractionSettings(
        resolution=DEMO.resolution,
        rules=DEMO.series_rules,
        layout=layout,
        destination_ae=receiver.ae_title,
        metadata_dir=data_root / "metadata",
        batch_size=DEMO.retrieval.batch_size,
    )
    exams = demo_cohort(hospital)
    with orthanc(work / "orthanc", move_destinations={receiver.ae_title: (receiver.host, receiver.port)}) as pacs:
        pacs.load(sorted(hospital.dicom_dir.rglob("*.dcm")))
        config = replace(pacs.config, calling_ae="PACSFLOW")
        for run_id, cohort in zip(RUN_IDS, (exams[: len(exams) // 2], exams), strict=True):
            with AuditStore.connect(audit_url) as store:
                ctx = RunContext(
                    store, f"{DAG_ID}/{run_id}", Pseudonymizer.from_environment(data_root / ".pacsflow-key")
                )
                store.start_run(
                    ctx.run_key,
                    dag_id=DAG_ID,
                    run_id=run_id,
                    params={},
                    interval=hospital.interval,
                    run_type="manual",
                    triggered_by="auditor",
                )
                summary = run_extraction(
                    ctx,
                    cohort,
                    partial(PacsClient, config),
                    settings,
                    receiver=partial(StoreReceiver, receiver, layout),
                )
                assert summary.reconciled
    names = frozenset(
        str(dcmread(path, stop_before_pixels=True).PatientName) for path in hospital.dicom_dir.rglob("*.dcm")
    )
    return DemoAudit(audit_url, data_root, load_ground_truth(hospital.ground_truth_path), names)


@dataclass
class ApiServer:
    url: str
    passwords: dict[str, str]

    def token(self, user: str) -> str:
        body = json.dumps({"username": user, "password": self.passwords[user]}).encode()
        request = urllib.request.Request(
            f"{self.url}/auth/token", data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["access_token"]

    def get(
        self,
        path: str,
        user: str | None,
        *,
        data: bytes | None = None,
        content_type: str = "application/x-www-form-urlencoded",
    ) -> tuple[int, bytes, dict[str, str]]:
        """(status, body, headers) of a request as ``user`` (None: no credentials); with ``data`` a POST;
        redirects not followed."""
        headers = {"Authorization": f"Bearer {self.token(user)}"} if user else {}
        if data is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(
            self.url + path, data=data, headers=headers, method="POST" if data is not None else "GET"
        )
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(request, timeout=60) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, error.read(), dict(error.headers)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@pytest.fixture(scope="session")
def api_server(demo_audit, tmp_path_factory) -> Iterator[ApiServer]:
    work = tmp_path_factory.mktemp("api-server")
    home = work / "home"
    home.mkdir()
    passwords = {user: secrets.token_urlsafe(12) for user in USERS}
    password_file = work / "passwords.json"
    password_file.write_text(json.dumps(passwords))
    password_file.chmod(0o600)
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("AIRFLOW")}
    env.update(airflow_environment(home))
    env.update(
        {
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in USERS.items()),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(password_file),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW_CONN_PACSFLOW_AUDIT": json.dumps(
                {"conn_type": "generic", "extra": {"sqlalchemy_url": demo_audit.audit_url}}
            ),
            DATA_ROOT_ENV: str(demo_audit.data_root),
        }
    )
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([AIRFLOW, "dags", "reserialize"], env=env, check=True, stdout=subprocess.DEVNULL, cwd=home)
    command = [AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with service("api-server", command, work / "api-server.log", env, cwd=home) as server:
        wait_until(lambda: api_healthy(f"http://127.0.0.1:{port}"), "the api-server", STARTUP_SECONDS, (server,))
        yield ApiServer(f"http://127.0.0.1:{port}", passwords)
