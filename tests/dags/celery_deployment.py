"""A real Airflow 3 deployment on loopback, the production way and with the topology of docker-compose.yaml:
PostgreSQL metadata database, Redis broker, CeleryExecutor, and the services of ``pacsflow.deployment``
(``api-server``, ``scheduler``, ``dag-processor``, ``triggerer``, N ``celery worker`` replicas and the
pacsflow receiver service) as separate processes, each started with the command the topology names and
given every environment variable it lists (one JWT secret, one execution API URL, one data root).

    with redis_server(tmp / "redis") as broker, postgres_database(server_url, "airflow") as db_url, \\
            celery_deployment(tmp / "airflow", metadata_url=db_url, broker_url=broker, data_root=tmp / "data",
                              receiver=ReceiverConfig(port=free_port()), extra_env=connections) as airflow:
        airflow.wait_for_dag("my_dag")
        run_id = airflow.trigger("my_dag", conf={...})
        state = airflow.wait_for_run("my_dag", run_id, timeout=300)

Every service listens on 127.0.0.1 on a free port and runs in its own process group, which is terminated
when its context closes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.demo.deployment import (
    Deployment,
    Process,
    base_environment,
    deployment,
    native_command,
    service,
    wait_until,
)
from pacsflow.deployment import SERVICES, ServiceSpec
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.helpers import free_port

REDIS_SERVER = "/usr/bin/redis-server"
CeleryDeployment = Deployment


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throw-away Redis (no persistence) on a free loopback port; yields the broker URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [
        REDIS_SERVER,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
    ]
    with service("redis", command, workdir / "redis.log", cwd=workdir) as redis:
        wait_until(lambda: _answers_ping(port), "redis", 30, (redis,))
        yield f"redis://127.0.0.1:{port}/0"


def _answers_ping(port: int) -> bool:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


def _postgres_bin() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not candidates:
        raise FileNotFoundError("PostgreSQL is not installed: run `make test` (it installs the Debian packages)")
    return candidates[-1].parent


@contextmanager
def postgres_server(workdir: Path) -> Iterator[str]:
    """A private PostgreSQL server (no fsync) on a free loopback port, with an empty database ``pacsflow``;
    yields its URL and removes ``workdir`` afterwards."""
    bindir = _postgres_bin()
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(workdir, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = workdir / "data"
    subprocess.run(
        [*as_postgres, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [
            *as_postgres,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-w",
            "-l",
            str(workdir / "server.log"),
            "start",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        subprocess.run(
            [*as_postgres, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "pacsflow"],
            check=True,
        )
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/pacsflow"
    finally:
        subprocess.run(
            [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
            stdout=subprocess.DEVNULL,
            check=False,  # clean-up: a server that already stopped is fine
        )
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def postgres_database(server_url: str, name: str) -> Iterator[str]:
    """A fresh database ``name`` on the server of ``server_url`` (dropped afterwards); yields its URL."""
    if not name.replace("_", "").isalnum():
        raise ValueError("database names are letters, digits and underscores")
    admin = create_engine(make_url(server_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:  # FORCE: celery and Airflow keep pooled connections until they exit
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def celery_environment(
    home: Path,
    api_port: int,
    password_file: Path,
    *,
    metadata_url: str,
    broker_url: str,
    worker_concurrency: int,
    data_root: Path,
    receiver: ReceiverConfig,
    extra: Mapping[str, str],
) -> dict[str, str]:
    """The one environment every process of the deployment shares."""
    result_backend = "db+" + make_url(metadata_url).set(drivername="postgresql").render_as_string(hide_password=False)
    return base_environment(
        home,
        api_port=api_port,
        password_file=password_file,
        data_root=data_root,
        extra={
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CELERY__BROKER_URL": broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": result_backend,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(worker_concurrency),
            # Only the runs we trigger: no scheduled (cron) run of a freshly unpaused DAG.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            **receiver_environment(receiver),
            **extra,
        },
    )


def receiver_environment(receiver: ReceiverConfig) -> dict[str, str]:
    """The receiver service's settings as the ``PACSFLOW_RECEIVER_*`` variables it reads."""
    return {
        "PACSFLOW_RECEIVER_AE_TITLE": receiver.ae_title,
        "PACSFLOW_RECEIVER_HOST": receiver.host,
        "PACSFLOW_RECEIVER_PORT": str(receiver.port),
        "PACSFLOW_RECEIVER_BACKEND": receiver.backend,
        "PACSFLOW_RECEIVER_ALLOWED_AES": ",".join(receiver.allowed_calling_aes),
        "PACSFLOW_RECEIVER_ALLOWED_ADDRESSES": ",".join(receiver.allowed_addresses),
        "PACSFLOW_RECEIVER_MAX_ASSOCIATIONS": str(receiver.max_associations),
    }


def checked_environment(spec: ServiceSpec, env: Mapping[str, str]) -> dict[str, str]:
    """``env``, once every variable the topology says ``spec`` reads is set: a service never silently runs on a
    default the containers would not have."""
    missing = sorted(name for name in spec.environment if not env.get(name))
    if missing:
        raise ValueError(f"{spec.name}: the topology needs {', '.join(missing)}")
    return dict(env)


def receiver_answers(airflow: Deployment) -> bool:
    """The receiver's container health check: ``pacsflow echo`` in the receiver's environment."""
    done = subprocess.run(native_command(("pacsflow", "echo")), env=airflow.env, capture_output=True, check=False)
    return done.returncode == 0


@contextmanager
def celery_deployment(
    workdir: Path,
    *,
    metadata_url: str,
    broker_url: str,
    data_root: Path,
    receiver: ReceiverConfig,
    pacs_pool_slots: int = 4,
    workers: int = 1,
    worker_concurrency: int = 2,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[Deployment]:
    """Run the topology's init steps, start every service of ``pacsflow.deployment.SERVICES`` (``workers``
    replicas of the scalable one) and wait until the api-server serves and the receiver answers C-ECHO."""

    def env_for(home: Path, api_port: int, password_file: Path) -> dict[str, str]:
        return celery_environment(
            home,
            api_port,
            password_file,
            metadata_url=metadata_url,
            broker_url=broker_url,
            worker_concurrency=worker_concurrency,
            data_root=data_root,
            receiver=receiver,
            extra=extra_env or {},
        )

    def processes_for(env: dict[str, str]) -> list[Process]:
        processes = []
        for spec in SERVICES:
            for replica in range(1, (workers if spec.scalable else 1) + 1):
                name = f"{spec.name}-{replica}" if spec.scalable else spec.name
                # each worker on this host serves its task logs on a port of its own
                replica_env = {**env, "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())}
                processes.append(Process(name, spec.command, checked_environment(spec, replica_env)))
        return processes

    with deployment(
        workdir, env_for=env_for, processes_for=processes_for, pool_slots=pacs_pool_slots, ready=receiver_answers
    ) as airflow:
        yield airflow
