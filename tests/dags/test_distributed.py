"""The DAG run the production way: api-server, scheduler, dag-processor and a Celery worker as separate
processes, a PostgreSQL metadata database and a Redis broker, against Orthanc loaded with a demo hospital.

Besides the ground truth, it checks what only a distributed executor can break: with one slot in the
``pacs`` pool, no two retrieval tasks ever held the PACS at the same time, although the worker could run
several at once.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from pacsflow.core.audit import AuditStore, Stage
from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.demo.environment import DEMO_DAG_ID, connection_environment
from pacsflow.demo.hospital import build_hospital, expected_instances, expected_outcomes, load_ground_truth
from pacsflow.demo.sandbox import orthanc
from tests.conftest import free_port
from tests.dags.celery_deployment import CeleryDeployment, celery_deployment, postgres_database, redis_server

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.orthanc]

DAG_ID = DEMO_DAG_ID
RUN_TIMEOUT_SECONDS = 300
WORKER_CONCURRENCY = 3  # more than the pool allows, so the pool (not the worker) is what serializes


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


@pytest.fixture(scope="module")
def distributed_run(postgres_url, tmp_path_factory) -> Iterator[DistributedRun]:
    workdir = tmp_path_factory.mktemp("distributed")
    try:
        yield from _distributed_run(workdir, postgres_url)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _distributed_run(workdir: Path, postgres_url: str) -> Iterator[DistributedRun]:
    hospital = build_hospital(workdir / "hospital", accessions=30, seed=23)
    receiver = ReceiverConfig(ae_title="PACSFLOW", port=free_port())
    suffix = secrets.token_hex(4)
    with (orthanc(workdir / "orthanc", move_destinations={receiver.ae_title: (receiver.host, receiver.port)}) as pacs,
          postgres_database(postgres_url, f"airflow_{suffix}") as metadata_url,
          postgres_database(postgres_url, f"audit_{suffix}") as audit_url,
          redis_server(workdir / "redis") as broker_url):
        pacs.load(sorted(hospital.dicom_dir.rglob("*.dcm")))
        data_root = workdir / "data"
        env = {**connection_environment(ris_url=hospital.ris_url, audit_url=audit_url,
                                        pacs=replace(pacs.config, calling_ae="PACSFLOW"), receiver=receiver),
               "PACSFLOW_DATA_ROOT": str(data_root)}
        with celery_deployment(workdir / "airflow", metadata_url=metadata_url, broker_url=broker_url,
                               pools={"pacs": 1}, worker_concurrency=WORKER_CONCURRENCY,
                               extra_env=env) as airflow:
            airflow.wait_for_dag(DAG_ID)
            airflow.unpause(DAG_ID)
            run_id = airflow.trigger(DAG_ID, data_interval=hospital.interval)
            state = airflow.wait_for_run(DAG_ID, run_id, RUN_TIMEOUT_SECONDS)
            yield DistributedRun(airflow, run_id, state, data_root, audit_url,
                                 load_ground_truth(hospital.ground_truth_path))


def test_the_run_succeeds_on_the_celery_worker(distributed_run):
    run = distributed_run
    assert run.state == "success", run.airflow.logs()
    instances = run.airflow.task_instances(DAG_ID, run.run_id)
    assert {ti["state"] for ti in instances} == {"success"}, run.airflow.logs()
    assert len([ti for ti in instances if ti["task_id"] == "retrieve_batch"]) >= 3


def test_the_right_instances_are_on_disk(distributed_run):
    run = distributed_run
    on_disk = {(p.parent.parent.name, p.parent.name, p.stem) for p in (run.data_root / "dicom").glob("*/*/*.dcm")}
    assert on_disk == expected_instances(run.truth), run.airflow.logs()


def test_every_accession_ends_in_its_true_outcome(distributed_run):
    run = distributed_run
    with AuditStore.connect(run.audit_url) as store:
        recorded = store.accession_outcomes(run.run_key)
        summary = store.summary(run.run_key)
    assert {an: row["outcome"] for an, row in recorded.items()} == expected_outcomes(run.truth), run.airflow.logs()
    assert summary.reconciled


def test_the_pacs_pool_lets_one_retrieval_at_a_time(distributed_run):
    run = distributed_run
    with AuditStore.connect(run.audit_url) as store:
        events = sorted((a["started_at"], a["finished_at"], a["batch"]) for a in store.attempts(run.run_key)
                        if a["stage"] == Stage.RETRIEVE)
    assert len(events) >= 3, run.airflow.logs()
    overlapping = [(earlier[2], later[2]) for earlier, later in zip(events, events[1:]) if later[0] < earlier[1]]
    assert overlapping == []
