"""Airflow's overhead: the DAG end to end through Airflow vs the same stages called from the library.

Same demo cohort, same Orthanc, fresh data roots for both, so both retrieve everything. Target: the DAG
takes at most 1.5x the library's time (``dag_overhead`` in bench/results.json, unit "x slower", lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from bench.results import record
from pacsflow.core.audit import AuditStore
from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.dicom.receiver import StoreReceiver
from pacsflow.core.pipeline import ExtractionSettings, RunContext, run_extraction
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.core.resolve import ResolutionSettings
from pacsflow.core.ris import load_template, query_cohort
from pacsflow.core.series_rules import SeriesRules
from pacsflow.core.storage import StorageLayout
from pacsflow.demo.environment import REPO_ROOT, airflow_environment, connection_environment
from pacsflow.demo.hospital import build_hospital
from pacsflow.demo.run import free_port
from pacsflow.demo.sandbox import orthanc
from sqlalchemy import create_engine

DAG_ID = "pacsflow_extract"


def run_library(hospital, pacs_config, receiver: ReceiverConfig, conf: dict, data_root: Path) -> float:
    data_root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    layout = StorageLayout(data_root / "dicom")
    settings = ExtractionSettings(
        resolution=ResolutionSettings.from_mapping(conf["resolution"]),
        rules=SeriesRules.from_mapping(conf["series_rules"]), layout=layout,
        destination_ae=receiver.ae_title, batch_size=conf["batch_size"], metadata_dir=data_root / "metadata")
    ris = create_engine(hospital.ris_url, hide_parameters=True)
    sql = load_template(conf["sql_template"], REPO_ROOT / "include" / "sql")
    start, end = (value.replace(tzinfo=None) for value in hospital.interval)
    exams = query_cohort(ris, sql, interval_start=start, interval_end=end, params=conf["cohort_params"])
    with AuditStore.connect(f"sqlite:///{data_root / 'audit.sqlite'}") as store:
        ctx = RunContext(store=store, run_key="bench/library",
                         pseudonymizer=Pseudonymizer.from_environment(data_root / ".pacsflow-key"))
        summary = run_extraction(ctx, exams, partial(PacsClient, pacs_config), settings,
                                 receiver=partial(StoreReceiver, receiver, layout))
    ris.dispose()
    assert summary.reconciled
    return time.perf_counter() - started


def run_airflow(hospital, pacs_config, receiver: ReceiverConfig, conf: dict, data_root: Path,
                airflow_home: Path) -> float:
    env = {**os.environ, **airflow_environment(airflow_home),
           **connection_environment(ris_url=hospital.ris_url, audit_url=f"sqlite:///{data_root / 'audit.sqlite'}",
                                    pacs=pacs_config, receiver=receiver),
           "PACSFLOW_DATA_ROOT": str(data_root)}
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([airflow, "pools", "set", "pacs", "4", "PACS"], env=env, check=True, stdout=subprocess.DEVNULL)
    run_conf = {**conf, "data_root": str(data_root)}
    log = airflow_home / "dags_test.log"
    started = time.perf_counter()
    with log.open("w") as handle:
        completed = subprocess.run([airflow, "dags", "test", DAG_ID, "--conf", json.dumps(run_conf)], env=env,
                                   stdout=handle, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - started
    if completed.returncode:
        raise SystemExit(f"the DAG run failed; see {log}")
    with AuditStore.connect(f"sqlite:///{data_root / 'audit.sqlite'}") as store:
        assert store.summary(store.latest_run_key(DAG_ID)).reconciled
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--accessions", type=int, default=1000)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pacsflow-bench-dag-"))
    hospital = build_hospital(work / "hospital", accessions=args.accessions, seed=3)
    start, end = hospital.interval
    conf = json.loads((REPO_ROOT / "include" / "config" / "demo_run.json").read_text())
    conf.update(interval_start=start.isoformat(), interval_end=end.isoformat(), batch_size=100)
    receiver = ReceiverConfig(ae_title="PACSFLOW", port=free_port(), allowed_calling_aes=("ORTHANC",))
    with orthanc(work / "orthanc", move_destinations={receiver.ae_title: (receiver.host, receiver.port)}) as pacs:
        pacs.load(sorted(hospital.dicom_dir.rglob("*.dcm")))
        pacs_config = replace(pacs.config, calling_ae="PACSFLOW")
        library = run_library(hospital, pacs_config, receiver, conf, work / "library")
        through_airflow = run_airflow(hospital, pacs_config, receiver, conf, work / "airflow-data", work / "airflow")
    shutil.rmtree(work, ignore_errors=True)
    entry = record("dag_overhead", "x slower (lower is better)", round(through_airflow, 2), round(library, 2),
                   accessions=args.accessions, target_ratio_at_most=1.5)
    print(f"{'dag_overhead':<16} airflow {through_airflow:8.1f} s   library {library:8.1f} s   "
          f"ratio {entry['ratio']:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
