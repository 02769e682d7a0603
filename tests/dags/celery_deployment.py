"""The production topology on loopback: a PostgreSQL metadata database, a Redis broker, CeleryExecutor, and
``api-server``, ``scheduler``, ``dag-processor`` and ``celery worker`` as separate processes (built on
``pacsflow.demo.deployment``, which runs the same processes for the LocalExecutor).

    with redis_server(tmp / "redis") as broker, postgres_database(server_url, "airflow") as db_url, \\
            celery_deployment(tmp / "airflow", metadata_url=db_url, broker_url=broker) as airflow:
        airflow.wait_for_dag("my_dag")
        run_id = airflow.trigger("my_dag", data_interval=(start, end))
        state = airflow.wait_for_run("my_dag", run_id, timeout=300)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from pacsflow.demo.deployment import (
    AIRFLOW,
    Deployment,
    base_environment,
    core_commands,
    deployment,
    free_port,
    service,
    wait_until,
)

REDIS_SERVER = "/usr/bin/redis-server"
CeleryDeployment = Deployment


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throw-away Redis (no persistence) on a free loopback port; yields the broker URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(workdir)]
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


def celery_environment(home: Path, api_port: int, password_file: Path, extra: dict[str, str], *,
                       metadata_url: str, broker_url: str, worker_concurrency: int) -> dict[str, str]:
    """The one environment every process of the Celery deployment shares."""
    result_backend = "db+" + make_url(metadata_url).set(drivername="postgresql").render_as_string(
        hide_password=False)
    env = base_environment(home, api_port=api_port, password_file=password_file, extra={})
    env.update({
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": result_backend,
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(worker_concurrency),
        # Only the runs we trigger: no scheduled run of a freshly unpaused DAG.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
    })
    env.update(extra)
    return env


@contextmanager
def celery_deployment(workdir: Path, *, metadata_url: str, broker_url: str, pools: Mapping[str, int] | None = None,
                      worker_concurrency: int = 2, extra_env: Mapping[str, str] | None = None) -> Iterator[Deployment]:
    """Migrate the metadata database, set the pools, start the four processes and wait until they serve."""
    def env_for(home: Path, api_port: int, password_file: Path, extra: dict[str, str]) -> dict[str, str]:
        return celery_environment(home, api_port, password_file, extra, metadata_url=metadata_url,
                                  broker_url=broker_url, worker_concurrency=worker_concurrency)

    def commands_for(api_port: int) -> dict[str, list[str]]:
        return {**core_commands(api_port),
                "celery-worker": [AIRFLOW, "celery", "worker", "--concurrency", str(worker_concurrency),
                                  "--without-mingle", "--without-gossip", "--skip-serve-logs"]}

    with deployment(workdir, env_for=env_for, commands_for=commands_for, pools=pools,
                    extra_env=extra_env) as airflow:
        yield airflow
