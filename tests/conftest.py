"""Session-wide real services for the tests: an isolated Airflow home, PostgreSQL, and a demo hospital.

Airflow reads its configuration at import time, so the environment is set here, before any test module
imports it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pacsflow.demo.environment import airflow_environment

AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="pacsflow-test-airflow-"))
os.environ.update(airflow_environment(AIRFLOW_HOME))
os.environ.setdefault("PACSFLOW_LOG_KEY", "test-key-not-secret-0123456789")

# Test tiers. A test that uses one of these fixtures, directly or through another fixture, gets the marker, so
# the quick tier `pytest -m "not orthanc and not postgres and not airflow"` starts none of these servers; tests
# that start such a peer themselves carry the marker explicitly (pyproject.toml describes each marker).
SERVER_FIXTURES = {
    "orthanc": {"pacs", "qr_pacs"},  # Orthanc or pynetdicom's qrscp holding a demo hospital
    "postgres": {"postgres_url"},
    "airflow": {"airflow_db"},
}
POSTGRES_BACKENDS = {"postgres", "postgresql"}  # a parameter that picks the PostgreSQL case of a backend matrix


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for marker, fixtures in SERVER_FIXTURES.items():
            if used & fixtures:
                item.add_marker(marker)
        callspec = getattr(item, "callspec", None)
        if callspec is not None and POSTGRES_BACKENDS & {v for v in callspec.params.values() if isinstance(v, str)}:
            item.add_marker("postgres")


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata database with the ``pacs`` pool."""
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], check=True, stdout=subprocess.DEVNULL, env=os.environ.copy())
    subprocess.run(
        [airflow, "pools", "set", "pacs", "4", "PACS associations"],
        check=True,
        stdout=subprocess.DEVNULL,
        env=os.environ.copy(),
    )
    return AIRFLOW_HOME


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A private PostgreSQL server on a free loopback port, with an empty database ``pacsflow``."""
    from tests.dags.celery_deployment import postgres_server

    try:
        with postgres_server(Path(tempfile.mkdtemp(prefix="pacsflow-pg-"))) as url:
            yield url
    except FileNotFoundError as error:
        pytest.fail(str(error))
