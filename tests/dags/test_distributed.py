"""The DAG run the production way, with the topology of docker-compose.yaml: api-server, scheduler,
dag-processor, triggerer, TWO Celery workers and the standalone receiver service
(``receiver_mode: service``) as separate processes, a PostgreSQL metadata database, a PostgreSQL audit database and
a Redis broker, against Orthanc loaded with a demo hospital.

Besides the ground truth (every SOP Instance UID on disk once), it checks what only a distributed executor
can break: the ``pacs`` pool of 4 caps the retrieval tasks holding the PACS at once although the two workers
could run more, and both workers took tasks.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import yaml
from pacsflow.core.audit import AuditStore, Stage
from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.demo.environment import DEMO_DAG_ID, DEMO_DEFINITION, connection_environment
from pacsflow.demo.hospital import build_hospital, expected_instances, expected_outcomes, load_ground_truth
from pacsflow.demo.sandbox import orthanc
from pacsflow.deployment import DATA_ROOT_ENV, SERVICES

from tests.dags.celery_deployment import CeleryDeployment, celery_deployment, postgres_database, redis_server
from tests.helpers import free_port

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.orthanc]

DAG_ID = DEMO_DAG_ID
RUN_TIMEOUT_SECONDS = 420
BATCH_SIZE = 3
PACS_POOL_SLOTS = 4
WORKERS = 2
WORKER_CONCURRENCY = 3  # 2 x 3 task slots: more than the pool allows, so the pool is what caps


@dataclass(frozen=True)
class DistributedRun:
    airflow: CeleryDeployment
    run_id: str
    state: str
    data_root: Path
    audit_url: str
    truth: dict

    @property
    def run_key(self) -> str:
        return f"{DAG_ID}/{self.run_id}"


def definitions(folder: Path) -> Path:
    """The one place this test shapes the extraction: the demo definition with smaller batches, so that there
    are more retrieval tasks than pool slots. The data root is the deployment's ($PACSFLOW_DATA_ROOT)."""
    folder.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_load(DEMO_DEFINITION.read_text())
    body["retrieval"]["batch_size"] = BATCH_SIZE
    (folder / DEMO_DEFINITION.name).write_text(yaml.safe_dump(body))
    return folder


@pytest.fixture(scope="module")
def distributed_run(postgres_url, tmp_path_factory) -> Iterator[DistributedRun]:
    workdir = tmp_path_factory.mktemp("distributed")
    try:
        yield from _distributed_run(workdir, postgres_url)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _distributed_run(workdir: Path, postgres_url: str) -> Iterator[DistributedRun]:
    hospital = build_hospital(workdir / "hospital", accessions=40, seed=23)
    receiver = ReceiverConfig(ae_title="PACSFLOW", port=free_port(), allowed_calling_aes=("ORTHANC",), mode="service")
    data_root = workdir / "data"
    suffix = secrets.token_hex(4)
    with (
        orthanc(workdir / "orthanc", move_destinations={receiver.ae_title: (receiver.host, receiver.port)}) as pacs,
        postgres_database(postgres_url, f"airflow_{suffix}") as metadata_url,
        postgres_database(postgres_url, f"audit_{suffix}") as audit_url,
        redis_server(workdir / "redis") as broker_url,
    ):
        pacs.load(sorted(hospital.dicom_dir.rglob("*.dcm")))
        connections = {
            **connection_environment(
                ris_url=hospital.ris_url,
                audit_url=audit_url,
                pacs=replace(pacs.config, calling_ae="PACSFLOW"),
                receiver=receiver,
            ),
            "PACSFLOW_EXTRACTIONS_DIR": str(definitions(workdir / "extractions")),
        }
        with celery_deployment(
            workdir / "airflow",
            metadata_url=metadata_url,
            broker_url=broker_url,
            data_root=data_root,
            receiver=receiver,
            pacs_pool_slots=PACS_POOL_SLOTS,
            workers=WORKERS,
            worker_concurrency=WORKER_CONCURRENCY,
            extra_env=connections,
        ) as airflow:
            airflow.wait_for_dag(DAG_ID)
            airflow.unpause(DAG_ID)
            run_id = airflow.trigger(DAG_ID, data_interval=hospital.interval)
            state = airflow.wait_for_run(DAG_ID, run_id, RUN_TIMEOUT_SECONDS)
            yield DistributedRun(
                airflow, run_id, state, data_root, audit_url, load_ground_truth(hospital.ground_truth_path)
            )


def test_the_run_succeeds_on_the_celery_worker(distributed_run):
    run = distributed_run
    assert run.state == "success", run.airflow.logs()
    instances = run.airflow.task_instances(DAG_ID, run.run_id)
    assert {ti["state"] for ti in instances} == {"success"}, run.airflow.logs()
    assert len([ti for ti in instances if ti["task_id"] == "retrieve_batch"]) >= 3


def test_the_right_instances_are_on_disk(distributed_run):
    run = distributed_run
    files = list((run.data_root / "dicom").glob("*/*/*.dcm"))
    on_disk = {(p.parent.parent.name, p.parent.name, p.stem) for p in files}
    assert on_disk == expected_instances(run.truth), run.airflow.logs()
    assert len({p.stem for p in files}) == len(files)  # every SOP Instance UID once


def test_every_accession_ends_in_its_true_outcome(distributed_run):
    run = distributed_run
    with AuditStore.connect(run.audit_url) as store:
        recorded = store.accession_outcomes(run.run_key)
        summary = store.summary(run.run_key)
    assert {an: row["outcome"] for an, row in recorded.items()} == expected_outcomes(run.truth), run.airflow.logs()
    assert summary.reconciled


def test_the_deployment_is_the_topology_of_the_compose_file(distributed_run):
    started = {svc.name: svc for svc in distributed_run.airflow.services}
    expected = {
        f"{spec.name}-{n}" if spec.scalable else spec.name: spec
        for spec in SERVICES
        for n in range(1, (WORKERS if spec.scalable else 1) + 1)
    }
    assert sorted(started) == sorted(expected)
    for name, spec in expected.items():
        program, *args = started[name].command
        assert (Path(program).name, *args) == spec.command, name
        assert spec.environment <= set(started[name].env), name
    roots = {started[name].env[DATA_ROOT_ENV] for name, spec in expected.items() if spec.data_root}
    assert roots == {str(distributed_run.data_root)}


def test_the_pacs_pool_caps_the_retrievals_and_both_workers_work(distributed_run):
    run = distributed_run
    with AuditStore.connect(run.audit_url) as store:
        events = [a for a in store.attempts(run.run_key) if a["stage"] == Stage.RETRIEVE]
    assert len(events) > PACS_POOL_SLOTS, run.airflow.logs()
    most_at_once = max(
        sum(1 for other in events if other["started_at"] <= event["started_at"] < other["finished_at"])
        for event in events
    )
    assert most_at_once <= PACS_POOL_SLOTS
    executed = {
        name: log.count("Executing workload in Celery")
        for name, log in run.airflow.service_logs("airflow-worker").items()
    }
    assert len(executed) == WORKERS and all(executed.values()), executed
