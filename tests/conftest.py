"""Session-wide real services for the tests: an isolated Airflow home, PostgreSQL, and a demo hospital.

Airflow reads its configuration at import time, so the environment is set here, before any test module
imports it.
"""

from __future__ import annotations

import os
import shutil
import socket
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


def fits_latin1(text: str) -> bool:
    """Whether a name survives a PACS that answers in ISO_IR 100."""
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata database with the ``pacs`` pool."""
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], check=True, stdout=subprocess.DEVNULL, env=os.environ.copy())
    subprocess.run([airflow, "pools", "set", "pacs", "4", "PACS associations"], check=True,
                   stdout=subprocess.DEVNULL, env=os.environ.copy())
    return AIRFLOW_HOME


def _postgres_bin() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not candidates:
        pytest.fail("PostgreSQL is not installed: run `make test` (it installs the Debian packages)")
    return candidates[-1].parent


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A private PostgreSQL server on a free loopback port, with an empty database ``pacsflow``."""
    bindir = _postgres_bin()
    workdir = Path(tempfile.mkdtemp(prefix="pacsflow-pg-"))
    workdir.chmod(0o755)
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(workdir, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = workdir / "data"
    subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                    "--no-sync"], check=True, stdout=subprocess.DEVNULL)
    options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-l",
                    str(workdir / "server.log"), "start"], check=True, stdout=subprocess.DEVNULL)
    try:
        subprocess.run([*as_postgres, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
                        "postgres", "pacsflow"], check=True)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/pacsflow"
    finally:
        subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       stdout=subprocess.DEVNULL)
        shutil.rmtree(workdir, ignore_errors=True)
