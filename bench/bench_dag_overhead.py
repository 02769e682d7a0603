"""Airflow's overhead: the demo extraction through a real Airflow (scheduler, LocalExecutor, the ``pacs`` pool
of 4) vs the same stages called from the library in one process.

Same demo cohort, same Orthanc, fresh data roots for both, so both retrieve everything. The Airflow time runs
from the trigger to the run's end (deployment start-up excluded). Target: at most 1.5x the library's time
(``dag_overhead`` in bench/results.json, unit "x slower", lower is better).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import yaml
from pacsflow.core.audit import AuditStore
from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.dicom.receiver import StoreReceiver
from pacsflow.core.pipeline import ExtractionSettings, RunContext, run_extraction
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.core.ris import load_template, query_cohort
from pacsflow.core.settings import ExtractionDefinition, load_definition
from pacsflow.core.storage import StorageLayout
from pacsflow.demo.deployment import local_deployment
from pacsflow.demo.environment import DEMO_DAG_ID, DEMO_DEFINITION, REPO_ROOT, connection_environment
from pacsflow.demo.hospital import build_hospital
from pacsflow.demo.sandbox import free_port, orthanc
from sqlalchemy import create_engine

from bench.results import record

BATCH_SIZE = 100


def run_library(hospital, pacs_config, receiver: ReceiverConfig, demo: ExtractionDefinition, data_root: Path) -> float:
    data_root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    layout = StorageLayout(data_root / "dicom")
    settings = ExtractionSettings(
        resolution=demo.resolution,
        rules=demo.series_rules,
        layout=layout,
        destination_ae=receiver.ae_title,
        batch_size=BATCH_SIZE,
        metadata_dir=data_root / "metadata",
    )
    ris = create_engine(hospital.ris_url, hide_parameters=True)
    sql = load_template(demo.cohort.sql_template, REPO_ROOT / "include" / "sql")
    start, end = (value.replace(tzinfo=None) for value in hospital.interval)
    exams = query_cohort(ris, sql, interval_start=start, interval_end=end, params=demo.cohort.params)
    with AuditStore.connect(f"sqlite:///{data_root / 'audit.sqlite'}") as store:
        ctx = RunContext(
            store=store,
            run_key="bench/library",
            pseudonymizer=Pseudonymizer.from_environment(data_root / ".pacsflow-key"),
        )
        summary = run_extraction(
            ctx, exams, partial(PacsClient, pacs_config), settings, receiver=partial(StoreReceiver, receiver, layout)
        )
    ris.dispose()
    assert summary.succeeded
    return time.perf_counter() - started


def run_airflow(hospital, pacs_config, receiver: ReceiverConfig, work: Path) -> float:
    definitions = work / "extractions"
    definitions.mkdir()
    body = yaml.safe_load(DEMO_DEFINITION.read_text())
    body["retrieval"]["batch_size"] = BATCH_SIZE
    (definitions / DEMO_DEFINITION.name).write_text(yaml.safe_dump(body))
    data_root = work / "airflow-data"
    audit_url = f"sqlite:///{data_root / 'audit.sqlite'}"
    env = {
        **connection_environment(ris_url=hospital.ris_url, audit_url=audit_url, pacs=pacs_config, receiver=receiver),
        "PACSFLOW_EXTRACTIONS_DIR": str(definitions),
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
    }
    with local_deployment(work / "airflow", data_root=data_root, pool_slots=4, extra_env=env) as airflow:
        airflow.wait_for_dag(DEMO_DAG_ID)
        airflow.unpause(DEMO_DAG_ID)
        started = time.perf_counter()
        run_id = airflow.trigger(DEMO_DAG_ID, data_interval=hospital.interval)
        state = airflow.wait_for_run(DEMO_DAG_ID, run_id, 3600, fail_on_retry=False)
        elapsed = time.perf_counter() - started
    with AuditStore.connect(audit_url) as store:
        assert state == "success" and store.summary(f"{DEMO_DAG_ID}/{run_id}").succeeded
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--accessions", type=int, default=1000)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pacsflow-bench-dag-"))
    hospital = build_hospital(work / "hospital", accessions=args.accessions, seed=3)
    demo = load_definition(DEMO_DEFINITION)
    receiver = ReceiverConfig(ae_title="PACSFLOW", port=free_port(), allowed_calling_aes=("ORTHANC",))
    with orthanc(work / "orthanc", move_destinations={receiver.ae_title: (receiver.host, receiver.port)}) as pacs:
        pacs.load(sorted(hospital.dicom_dir.rglob("*.dcm")))
        pacs_config = replace(pacs.config, calling_ae="PACSFLOW")
        library = run_library(hospital, pacs_config, receiver, demo, work / "library")
        through_airflow = run_airflow(hospital, pacs_config, receiver, work)
    shutil.rmtree(work, ignore_errors=True)
    entry = record(
        "dag_overhead",
        "x slower (lower is better)",
        round(through_airflow, 2),
        round(library, 2),
        accessions=args.accessions,
        target_ratio_at_most=1.5,
    )
    print(
        f"{'dag_overhead':<16} airflow {through_airflow:8.1f} s   library {library:8.1f} s   "
        f"ratio {entry['ratio']:.2f} (target <= 1.5)"
    )


if __name__ == "__main__":
    main()
