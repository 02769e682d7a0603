"""The deployment's topology, described once: which long-running services exist, the command each runs and
the environment variables each reads.

``docker-compose.yaml`` and the natively run deployment of the tests (``tests/dags/celery_deployment.py``)
are both checked against this description (``tests/test_deployment.py``), so the containers and what the
tests prove cannot drift apart. Values differ per deployment (ports, hosts, paths); names and commands do not.
"""

from __future__ import annotations

from dataclasses import dataclass

# Where the shared data root is mounted in the containers; every service with ``data_root`` sees the same
# files there (DICOM written by the receiver, read by the workers' verification and export).
CONTAINER_DATA_ROOT = "/var/lib/pacsflow"
DATA_ROOT_ENV = "PACSFLOW_DATA_ROOT"
PACS_POOL = "pacs"

# What every Airflow process of a CeleryExecutor deployment must agree on.
AIRFLOW_ENV = frozenset(
    {
        "AIRFLOW__CORE__EXECUTOR",
        "AIRFLOW__CORE__LOAD_EXAMPLES",
        "AIRFLOW__CORE__DAGS_FOLDER",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
        "AIRFLOW__CORE__TEST_CONNECTION",  # "Enabled": the dicom connection's C-ECHO test button
        "AIRFLOW__CORE__FERNET_KEY",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__CELERY__BROKER_URL",
        "AIRFLOW__CELERY__RESULT_BACKEND",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY",
        "AIRFLOW__API__BASE_URL",
        "AIRFLOW__API__SECRET_KEY",
        "AIRFLOW__API_AUTH__JWT_SECRET",
        # The DAG reads the data root at parse time (its default) and the tasks at run time.
        DATA_ROOT_ENV,
        "PACSFLOW_LOG_KEY",
        "AIRFLOW_CONN_PACSFLOW_RIS",
        "AIRFLOW_CONN_PACSFLOW_PACS",
        "AIRFLOW_CONN_PACSFLOW_AUDIT",
    }
)

# The standalone receiver (``python -m pacsflow.core.dicom``) reads these when no option is given.
RECEIVER_ENV = frozenset(
    {
        DATA_ROOT_ENV,
        "PACSFLOW_RECEIVER_AE_TITLE",
        "PACSFLOW_RECEIVER_HOST",
        "PACSFLOW_RECEIVER_PORT",
        "PACSFLOW_RECEIVER_BACKEND",
        "PACSFLOW_RECEIVER_ALLOWED_AES",
        "PACSFLOW_RECEIVER_ALLOWED_ADDRESSES",
        "PACSFLOW_RECEIVER_MAX_ASSOCIATIONS",
    }
)


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # the compose service name
    command: tuple[str, ...]  # argv: the same in a container and natively
    environment: frozenset[str]  # names of the variables it reads; values are per deployment
    data_root: bool = False  # mounts the shared data root
    scalable: bool = False  # several replicas may run (``docker compose up --scale NAME=N``)


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("airflow-apiserver", ("airflow", "api-server"), AIRFLOW_ENV),
    ServiceSpec("airflow-scheduler", ("airflow", "scheduler"), AIRFLOW_ENV),
    ServiceSpec("airflow-dag-processor", ("airflow", "dag-processor"), AIRFLOW_ENV),
    ServiceSpec("airflow-triggerer", ("airflow", "triggerer"), AIRFLOW_ENV),
    # mingle and gossip only add broker chatter between workers that share nothing
    ServiceSpec(
        "airflow-worker",
        ("airflow", "celery", "worker", "--without-mingle", "--without-gossip"),
        AIRFLOW_ENV,
        data_root=True,
        scalable=True,
    ),
    ServiceSpec("pacsflow-receiver", ("python", "-m", "pacsflow.core.dicom"), RECEIVER_ENV, data_root=True),
)

# One-shot steps before the services start, in order; ``{pool_slots}`` is the ``pacs`` pool size.
INIT_STEPS: tuple[tuple[str, ...], ...] = (
    ("airflow", "db", "migrate"),
    ("airflow", "pools", "set", PACS_POOL, "{pool_slots}", "Concurrent associations to the PACS"),
    ("pacsflow", "db", "upgrade"),
)


def service(name: str) -> ServiceSpec:
    for spec in SERVICES:
        if spec.name == name:
            return spec
    raise KeyError(f"no service {name!r} in the topology")


def init_steps(*, pool_slots: int | str) -> list[list[str]]:
    return [[part.format(pool_slots=pool_slots) for part in step] for step in INIT_STEPS]
