"""The whole DAG through Airflow (``dag.test()``) against Orthanc loaded with a demo hospital, checked
against the generator's ground truth (never against numbers copied from a run)."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from sqlalchemy import create_engine, text

from pacsflow.core.audit import AuditStore
from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.storage import StorageLayout, run_token
from pacsflow.demo.environment import REPO_ROOT, connection_environment
from pacsflow.demo.hospital import (
    Hospital,
    build_hospital,
    dropped_series,
    expected_instances,
    expected_outcomes,
    load_ground_truth,
)
from pacsflow.demo.hospital.plan import INSTITUTIONS, OPERATORS, REFERRING_PHYSICIANS
from pacsflow.demo.sandbox import orthanc, qrscp
from tests.conftest import free_port

DAG_ID = "pacsflow_extract"


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Hospital:
    return build_hospital(tmp_path_factory.mktemp("hospital"), accessions=40, seed=11)


@pytest.fixture(scope="module")
def truth(hospital) -> dict:
    return load_ground_truth(hospital.ground_truth_path)


@pytest.fixture(scope="module", params=[orthanc, qrscp], ids=["orthanc", "qrscp"])
def deployment(request, hospital, tmp_path_factory) -> Iterator[dict]:
    """A real PACS (Orthanc, and qrscp as in `make demo`) serving the hospital, and the connections that
    point the DAG at it."""
    sandbox = request.param
    receiver = ReceiverConfig(ae_title="PACSFLOW", port=free_port())
    with sandbox(tmp_path_factory.mktemp(sandbox.__name__),
                 move_destinations={receiver.ae_title: (receiver.host, receiver.port)}) as pacs:
        pacs.load(sorted(hospital.dicom_dir.rglob("*.dcm")))
        data_root = tmp_path_factory.mktemp("data")
        audit_url = f"sqlite:///{data_root / 'audit.sqlite'}"
        env = connection_environment(ris_url=hospital.ris_url, audit_url=audit_url,
                                     pacs=replace(pacs.config, calling_ae="PACSFLOW"), receiver=receiver)
        yield {"env": env, "data_root": data_root, "audit_url": audit_url}


@pytest.fixture(scope="module")
def dag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO_ROOT / "dags")).dags[DAG_ID]


def run_dag(dag, deployment, hospital, logical_date: datetime, monkeypatch) -> str:
    for name, value in deployment["env"].items():
        monkeypatch.setenv(name, value)
    conf = json.loads((REPO_ROOT / "include" / "config" / "demo_run.json").read_text())
    start, end = hospital.interval
    conf.update(data_root=str(deployment["data_root"]), interval_start=start.isoformat(),
                interval_end=end.isoformat())
    dag_run = dag.test(logical_date=logical_date, run_conf=conf)
    assert dag_run.state == "success"
    return f"{DAG_ID}/{dag_run.run_id}"


@contextmanager
def captured_output(path: Path) -> Iterator[None]:
    """Everything the process writes goes to ``path`` as well: the file descriptors, the Python streams
    (pytest and structlog write to ``sys.stdout`` objects, not to fd 1) and every log record."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds, saved_streams = [os.dup(1), os.dup(2)], (sys.stdout, sys.stderr)
    with path.open("w", encoding="utf-8", errors="replace") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        sys.stdout = sys.stderr = sink
        handler = logging.StreamHandler(sink)
        logging.getLogger().addHandler(handler)
        try:
            yield
        finally:
            logging.getLogger().removeHandler(handler)
            sink.flush()
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)


@pytest.fixture(scope="module")
def run_output(deployment) -> Path:
    return deployment["data_root"].parent / f"{deployment['data_root'].name}-output.log"


@pytest.fixture(scope="module")
def first_run(dag, deployment, hospital, run_output) -> str:
    with pytest.MonkeyPatch.context() as monkeypatch, captured_output(run_output):
        return run_dag(dag, deployment, hospital, datetime(2025, 1, 1, tzinfo=timezone.utc), monkeypatch)


def test_no_patient_identifier_reaches_the_logs(first_run, run_output, hospital, airflow_db):
    logs = run_output.read_text(errors="replace")
    logs += "".join(p.read_text(errors="replace") for p in (airflow_db / "logs").rglob("*") if p.is_file())
    assert "resolve_accessions" in logs and "an:" in logs  # the task logs were captured, with pseudonyms
    engine = create_engine(hospital.ris_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT accession_number, patient_id, patient_name FROM exams")).all()
    engine.dispose()
    identifiers = {value for row in rows for value in row if value}
    identifiers |= {part for row in rows for part in row.patient_name.split("^") if len(part) > 3}
    truth = load_ground_truth(hospital.ground_truth_path)
    identifiers |= {uid for _, series_uid, sop_uid in expected_instances(truth) for uid in (series_uid, sop_uid)}
    identifiers |= {study["study_instance_uid"] for a in truth["accessions"] for study in a["studies"]}
    identifiers |= {text for pair in INSTITUTIONS for text in pair}
    identifiers |= {part for name in (*OPERATORS, *REFERRING_PHYSICIANS) for part in name.split("^")}
    leaked = {value for value in identifiers
              if re.search(rf"(?<![0-9A-Za-z.]){re.escape(value)}(?![0-9A-Za-z]|\.[0-9])", logs)}
    assert leaked == set()


def test_the_release_holds_every_retrieved_instance_de_identified(first_run, deployment, truth):
    release = deployment["data_root"] / "release" / "default"
    released = list((release / "dicom").glob("*/*/*.dcm"))
    assert len(released) == len(expected_instances(truth))  # the default rules keep no ultrasound
    source_uids = {uid for instance in expected_instances(truth) for uid in instance}
    assert not {p.parent.parent.name for p in released} & source_uids
    table = ds.dataset(release / "metadata" / "instances", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == len(released)
    assert {(pid[:2], len(pid)) for pid in table["patient_id"].to_pylist()} == {("PF", 16)}


def test_internal_data_is_readable_by_the_service_account_only(first_run, deployment):
    root = deployment["data_root"]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files) and any(p.name == "audit.sqlite" for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o600"}
    assert {oct(p.stat().st_mode & 0o777) for p in [root, *root.rglob("*")] if p.is_dir()} == {"0o700"}


def test_the_audit_is_exported_per_run_as_parquet(first_run, deployment):
    run_id = first_run.split("/", 1)[1]
    directory = deployment["data_root"] / "audit" / run_token(run_id)
    accessions = pq.read_table(directory / "accessions.parquet")
    with AuditStore.connect(deployment["audit_url"]) as store:
        summary = store.summary(first_run)
    assert accessions.num_rows == summary.cohort
    assert "patient_id" not in accessions.column_names
    assert pq.read_table(directory / "runs.parquet")["run_id"].to_pylist() == [run_id]


def files_on_disk(data_root: Path) -> set[tuple[str, str, str]]:
    return {(p.parent.parent.name, p.parent.name, p.stem) for p in (data_root / "dicom").glob("*/*/*.dcm")}


def test_the_right_instances_are_on_disk(first_run, deployment, truth):
    on_disk = files_on_disk(deployment["data_root"])
    assert on_disk == expected_instances(truth)
    dropped = set(dropped_series(truth))
    assert not {series for _, series, _ in on_disk} & dropped


def test_every_accession_ends_in_its_true_outcome(first_run, deployment, truth):
    with AuditStore.connect(deployment["audit_url"]) as store:
        recorded = store.accession_outcomes(first_run)
        summary = store.summary(first_run)
    assert {an: row["outcome"] for an, row in recorded.items()} == expected_outcomes(truth)
    in_cohort = [a for a in truth["accessions"] if a["in_cohort"]]
    assert {a["accession_number"]: a["resolved_by"] for a in in_cohort} == {
        an: row["resolved_by"] for an, row in recorded.items()}
    assert summary.reconciled and summary.cohort == len(in_cohort)
    assert summary.instances == len(expected_instances(truth))


def test_dropped_series_are_recorded_with_their_reason(first_run, deployment, truth):
    with AuditStore.connect(deployment["audit_url"]) as store:
        dropped = store.series_rows(first_run, kept=False)
    assert {row["series_uid"]: row["drop_reason"] for row in dropped} == dropped_series(truth)


def test_the_parquet_table_holds_one_row_per_retrieved_instance(first_run, deployment, truth):
    table = ds.dataset(deployment["data_root"] / "metadata" / "instances", format="parquet",
                       partitioning="hive").to_table()
    rows = set(zip(table["study_instance_uid"].to_pylist(), table["series_instance_uid"].to_pylist(),
                   table["sop_instance_uid"].to_pylist()))
    assert rows == expected_instances(truth)


def test_a_second_run_fetches_nothing_and_accounts_the_same(first_run, dag, deployment, hospital, truth,
                                                            monkeypatch):
    layout = StorageLayout(deployment["data_root"] / "dicom")
    mtimes = {p: p.stat().st_mtime_ns for p in layout.root.glob("*/*/*.dcm")}
    second = run_dag(dag, deployment, hospital, datetime(2025, 1, 2, tzinfo=timezone.utc), monkeypatch)
    assert {p: p.stat().st_mtime_ns for p in layout.root.glob("*/*/*.dcm")} == mtimes
    with AuditStore.connect(deployment["audit_url"]) as store:
        assert {an: row["outcome"] for an, row in store.accession_outcomes(second).items()} == expected_outcomes(truth)
        fetched = sum(row["fetched"] or 0 for row in store.series_rows(second, kept=True))
    assert fetched == 0
