"""Runs the way users make them, on a real scheduler: api-server, scheduler and dag-processor with the
LocalExecutor and the README's ``pacs`` pool of 4, against Orthanc, every DAG built from an extraction
definition. Each run is checked against the ground truth of its own data interval.

One deployment serves the whole module (starting Airflow costs about a minute on two cores); the tests run in
file order and each drives its own extraction, on the one data root the deployment shares.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from pacsflow.core.audit import RETRIEVAL_FAILED, AuditStore, Stage
from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.pipeline import PACS_DOWN_AFTER
from pacsflow.core.storage import StorageLayout, run_token
from pacsflow.demo.deployment import Deployment, local_deployment, wait_until
from pacsflow.demo.environment import DEMO_DEFINITION, connection_environment
from pacsflow.demo.hospital import (
    Hospital,
    build_hospital,
    expected_instances,
    expected_outcomes,
    load_ground_truth,
    within,
)
from pacsflow.demo.hospital.plan import INSTITUTIONS, OPERATORS, REFERRING_PHYSICIANS
from pacsflow.demo.sandbox import orthanc
from sqlalchemy import create_engine, text

from tests.helpers import free_port

pytestmark = [pytest.mark.airflow, pytest.mark.orthanc]

POOL_SLOTS = 4  # the README's pool
RUN_SECONDS = 600
WEEK = timedelta(days=7)


def last_sunday(today: date) -> date:
    """``@weekly`` intervals start and end on Sundays at 00:00 UTC."""
    return today - timedelta(days=(today.weekday() + 1) % 7)


@dataclass
class Site:
    airflow: Deployment
    hospital: Hospital
    failing_hospital: Hospital
    data_root: Path
    audit_url: str
    start: datetime  # of the first of three complete weekly intervals
    alerts: list[dict]
    workdir: Path

    def truth(self, hospital: Hospital | None = None) -> dict:
        return load_ground_truth((hospital or self.hospital).ground_truth_path)

    def audit(self) -> AuditStore:
        return AuditStore.connect(self.audit_url)


def definition(folder: Path, id: str, **changes) -> None:
    """The demo definition with ``changes`` (nested mappings merged one level deep), as ``<id>.yaml``."""
    body = yaml.safe_load(DEMO_DEFINITION.read_text())
    body.update(id=id, description=f"test extraction {id}")
    for key, value in changes.items():
        body[key] = {**body[key], **value} if isinstance(value, dict) and isinstance(body.get(key), dict) else value
    (folder / f"{id}.yaml").write_text(yaml.safe_dump(body))


class _AlertSink(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []  # one list for every handler instance (one per request)

    def do_POST(self) -> None:
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("scheduler")
    sunday = last_sunday(datetime.now(UTC).date())
    first_day = sunday - 3 * WEEK
    start = datetime(first_day.year, first_day.month, first_day.day, tzinfo=UTC)
    hospital = build_hospital(
        workdir / "hospital", accessions=30, seed=31, first_day=first_day, last_day=sunday - timedelta(days=1)
    )
    failing = build_hospital(
        workdir / "failing", accessions=12, seed=32, first_day=first_day, last_day=sunday - timedelta(days=1)
    )
    definitions = workdir / "extractions"
    definitions.mkdir()
    fast = {"retries": 1, "retry_delay_seconds": 2, "max_retry_delay_seconds": 5}
    start_date = first_day.isoformat()
    definition(
        definitions,
        "weekly",
        schedule="@weekly",
        start_date=start_date,
        catchup=True,
        retrieval={"batch_size": 2},
        run=fast,
    )
    definition(
        definitions,
        "backfilled",
        schedule="@weekly",
        start_date=start_date,
        catchup=False,
        retrieval={"batch_size": 3},
        run=fast,
    )
    definition(definitions, "pooled", schedule=None, start_date=start_date, retrieval={"batch_size": 3}, run=fast)
    definition(
        definitions,
        "ris_down",
        schedule=None,
        start_date=start_date,
        connections={"ris": "ris_down"},
        run={**fast, "alert_conn_id": "pacsflow_alerts"},
    )
    definition(definitions, "over_limit", schedule=None, start_date=start_date, cohort={"max_size": 3}, run=fast)
    definition(
        definitions,
        "failing_batch",
        schedule=None,
        start_date=start_date,
        connections={"ris": "ris_failing", "pacs": "pacs_failing"},
        retrieval={"batch_size": 6},
        run=fast,
    )

    alerts = HTTPServer(("127.0.0.1", 0), _AlertSink)
    threading.Thread(target=alerts.serve_forever, daemon=True).start()
    receiver = ReceiverConfig(ae_title="PACSFLOW", port=free_port())  # receiver_mode: shared, the default
    data_root = workdir / "data"
    audit_url = f"sqlite:///{data_root / 'audit.sqlite'}"
    destinations = {receiver.ae_title: (receiver.host, receiver.port)}
    try:
        # The two hospitals number their ANs alike: each has a PACS of its own.
        with (
            orthanc(workdir / "orthanc", move_destinations=destinations) as pacs,
            orthanc(workdir / "orthanc-failing", move_destinations=destinations) as failing_pacs,
        ):
            pacs.load(sorted(hospital.dicom_dir.rglob("*.dcm")))
            failing_pacs.load(sorted(failing.dicom_dir.rglob("*.dcm")))
            failing_env = connection_environment(
                ris_url=failing.ris_url,
                audit_url=audit_url,
                receiver=receiver,
                pacs=replace(failing_pacs.config, calling_ae="PACSFLOW"),
            )
            env = {
                **connection_environment(
                    ris_url=hospital.ris_url,
                    audit_url=audit_url,
                    pacs=replace(pacs.config, calling_ae="PACSFLOW"),
                    receiver=receiver,
                ),
                "AIRFLOW_CONN_PACS_FAILING": failing_env["AIRFLOW_CONN_PACSFLOW_PACS"],
                "AIRFLOW_CONN_RIS_DOWN": json.dumps(
                    {
                        "conn_type": "generic",
                        "extra": {"sqlalchemy_url": f"postgresql+psycopg2://nobody@127.0.0.1:{free_port()}/ris"},
                    }
                ),
                "AIRFLOW_CONN_RIS_FAILING": failing_env["AIRFLOW_CONN_PACSFLOW_RIS"],
                "AIRFLOW_CONN_PACSFLOW_ALERTS": json.dumps(
                    {"conn_type": "http", "host": f"http://127.0.0.1:{alerts.server_port}/hook"}
                ),
                "PACSFLOW_EXTRACTIONS_DIR": str(definitions),
            }
            with local_deployment(
                workdir / "airflow", data_root=data_root, pool_slots=POOL_SLOTS, extra_env=env
            ) as airflow:
                for extraction in ("weekly", "backfilled", "pooled", "ris_down", "over_limit", "failing_batch"):
                    airflow.wait_for_dag(f"pacsflow__{extraction}")
                yield Site(airflow, hospital, failing, data_root, audit_url, start, _AlertSink.received, workdir)
    finally:
        alerts.shutdown()


def interval_of(run: dict) -> tuple[datetime, datetime]:
    return (datetime.fromisoformat(run["data_interval_start"]), datetime.fromisoformat(run["data_interval_end"]))


def assert_run_extracted_its_interval(site: Site, dag_id: str, run: dict) -> None:
    """The run succeeded, the audit recorded its interval, and every AN of that interval (and only those)
    ended in its true outcome."""
    assert run["state"] == "success", site.airflow.logs()
    start, end = interval_of(run)
    with site.audit() as store:
        row = store.run_row(f"{dag_id}/{run['dag_run_id']}")
        outcomes = {an: r["outcome"] for an, r in store.accession_outcomes(f"{dag_id}/{run['dag_run_id']}").items()}
        summary = store.summary(f"{dag_id}/{run['dag_run_id']}")
    assert (row["interval_start"].replace(tzinfo=UTC), row["interval_end"].replace(tzinfo=UTC)) == (start, end)
    assert row["run_type"] == run["run_type"]  # "scheduled", "backfill", "manual", as Airflow's API says
    assert outcomes == expected_outcomes(within(site.truth(), start, end))
    assert summary.succeeded and summary.verdict.state == "success"


def files_on_disk(data_root: Path) -> list[tuple[str, str, str]]:
    return [(p.parent.parent.name, p.parent.name, p.stem) for p in (data_root / "dicom").glob("*/*/*.dcm")]


def test_a_backfill_and_an_overlapping_manual_run_each_extract_their_interval(site):
    """A backfill over two weeks created through the REST API the UI uses, and a manual run over all three
    weeks started while it runs, on one data root: every run gets its own interval's ground truth and no
    run deletes what another fetched."""
    dag_id = "pacsflow__backfilled"
    site.airflow.unpause(dag_id)  # catch-up off: one scheduled run, of the latest complete week
    site.airflow.backfill(dag_id, site.start, site.start + WEEK)
    manual = site.airflow.trigger(dag_id, data_interval=(site.start, site.start + 3 * WEEK))
    runs = site.airflow.wait_for_runs(dag_id, 4, RUN_SECONDS)
    intervals = sorted((interval_of(run), run["run_type"]) for run in runs)
    assert intervals == sorted(
        [
            ((site.start, site.start + WEEK), "backfill"),
            ((site.start + WEEK, site.start + 2 * WEEK), "backfill"),
            ((site.start + 2 * WEEK, site.start + 3 * WEEK), "scheduled"),
            ((site.start, site.start + 3 * WEEK), "manual"),
        ]
    )
    for run in runs:
        assert_run_extracted_its_interval(site, dag_id, run)
    on_disk = files_on_disk(site.data_root)
    assert sorted(on_disk) == sorted(expected_instances(site.truth()))  # each instance once, none lost
    assert any(run["dag_run_id"] == manual for run in runs)


def test_scheduled_catch_up_runs_extract_each_interval(site):
    dag_id = "pacsflow__weekly"
    site.airflow.unpause(dag_id)
    runs = site.airflow.wait_for_runs(dag_id, 3, RUN_SECONDS)
    assert sorted(interval_of(run) for run in runs) == [
        (site.start + k * WEEK, site.start + (k + 1) * WEEK) for k in range(3)
    ]
    assert {run["run_type"] for run in runs} == {"scheduled"}
    for run in runs:
        assert_run_extracted_its_interval(site, dag_id, run)


def test_a_trigger_with_only_a_logical_date_extracts_the_last_complete_interval(site):
    """What the UI's trigger form sends by default: a logical date (now) and no interval."""
    dag_id = "pacsflow__weekly"
    run_id = site.airflow.trigger(dag_id, logical_date=datetime.now(UTC))
    site.airflow.wait_for_run(dag_id, run_id, RUN_SECONDS)
    run = site.airflow.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
    assert interval_of(run) == (site.start + 2 * WEEK, site.start + 3 * WEEK)
    assert_run_extracted_its_interval(site, dag_id, run)


def test_the_pool_of_four_runs_four_retrievals_at_once_and_never_more(site):
    dag_id = "pacsflow__pooled"
    site.airflow.unpause(dag_id)
    run_id = site.airflow.trigger(dag_id, data_interval=(site.start, site.start + 3 * WEEK))
    site.airflow.wait_for_run(dag_id, run_id, RUN_SECONDS)
    run = site.airflow.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
    assert_run_extracted_its_interval(site, dag_id, run)
    with site.audit() as store:
        attempts = [a for a in store.attempts(f"{dag_id}/{run_id}") if a["stage"] == Stage.RETRIEVE]
    assert len(attempts) >= 2 * POOL_SLOTS
    edges = sorted([(a["started_at"], 1) for a in attempts] + [(a["finished_at"], -1) for a in attempts])
    running, most = 0, 0
    for _, step in edges:
        running += step
        most = max(most, running)
    assert most == POOL_SLOTS


def test_a_run_whose_ris_is_down_fails_and_its_audit_says_where(site):
    dag_id = "pacsflow__ris_down"
    site.airflow.unpause(dag_id)
    run_id = site.airflow.trigger(dag_id, data_interval=(site.start, site.start + WEEK))
    assert site.airflow.wait_for_run(dag_id, run_id, RUN_SECONDS, fail_on_retry=False) == "failed"
    states = {ti["task_id"]: ti["state"] for ti in site.airflow.task_instances(dag_id, run_id)}
    assert states["ris_cohort"] == "failed" and states["audit_summary"] == "failed"
    with site.audit() as store:
        summary = store.summary(f"{dag_id}/{run_id}")
        cohort_tries = [a for a in store.attempts(f"{dag_id}/{run_id}") if a["stage"] == Stage.COHORT]
    assert (summary.verdict.state, summary.verdict.failed_stage) == ("failed", "cohort")
    assert "OperationalError" in summary.verdict.reason
    assert not summary.reconciled and summary.cohort == 0
    assert [a["try_number"] for a in cohort_tries] == [1, 2]  # a database error is transient: retried once
    wait_until(lambda: any(a["dag_id"] == dag_id for a in site.alerts), "the failure alert", 120)
    alert = next(a for a in site.alerts if a["dag_id"] == dag_id)
    assert alert["run_id"] == run_id and alert["event"] == "pacsflow.run_failed"


def test_a_configuration_mistake_fails_once_with_what_to_change(site):
    """A cohort over its definition's limit (an interval typo, not a cohort): no retry, the setting named."""
    dag_id = "pacsflow__over_limit"
    site.airflow.unpause(dag_id)
    run_id = site.airflow.trigger(dag_id, data_interval=(site.start, site.start + 3 * WEEK))
    assert site.airflow.wait_for_run(dag_id, run_id, RUN_SECONDS, fail_on_retry=False) == "failed"
    cohort = next(ti for ti in site.airflow.task_instances(dag_id, run_id) if ti["task_id"] == "ris_cohort")
    assert (cohort["state"], cohort["try_number"]) == ("failed", 1)
    with site.audit() as store:
        verdict = store.summary(f"{dag_id}/{run_id}").verdict
    assert verdict.failed_stage == "cohort" and "cohort.max_size" in verdict.reason


def test_a_batch_that_fails_for_good_fails_the_run_and_the_rest_is_complete(site):
    """One batch's studies cannot be written (a file stands where their directories go): the receiver answers
    "out of resources", the batch gives up, the other batch completes, and the audit tells them apart."""
    dag_id = "pacsflow__failing_batch"
    truth = site.truth(site.failing_hospital)
    cohort = sorted(a["accession_number"] for a in truth["accessions"] if a["in_cohort"])
    kept_series = {
        an: [s for st in a["studies"] for s in st["series"] if s["kept"]]
        for a in truth["accessions"]
        if a["in_cohort"]
        for an in [a["accession_number"]]
    }
    batches = [cohort[i : i + 6] for i in range(0, len(cohort), 6)]
    doomed = max(range(len(batches)), key=lambda b: sum(len(kept_series[an]) for an in batches[b]))
    assert sum(len(kept_series[an]) for an in batches[doomed]) >= PACS_DOWN_AFTER
    layout_root = site.data_root / "dicom"
    layout_root.mkdir(parents=True, exist_ok=True)
    for accession in truth["accessions"]:
        if accession["accession_number"] in batches[doomed]:
            for study in accession["studies"]:
                blocker = layout_root / study["study_instance_uid"]
                blocker.write_bytes(b"")
                blocker.chmod(0o600)  # whatever the umask of this process: the permission test checks the root

    site.airflow.unpause(dag_id)
    run_id = site.airflow.trigger(dag_id, data_interval=(site.start, site.start + 3 * WEEK))
    assert site.airflow.wait_for_run(dag_id, run_id, RUN_SECONDS, fail_on_retry=False) == "failed"
    retrievals = {
        ti["map_index"]: ti["state"]
        for ti in site.airflow.task_instances(dag_id, run_id)
        if ti["task_id"] == "retrieve_batch"
    }
    assert retrievals == {b: "failed" if b == doomed else "success" for b in range(len(batches))}
    with site.audit() as store:
        rows = store.accession_outcomes(f"{dag_id}/{run_id}")
        summary = store.summary(f"{dag_id}/{run_id}")
    expected = expected_outcomes(truth)
    for an, row in rows.items():
        if an in batches[doomed] and kept_series[an] and expected[an] == "retrieved":
            assert (row["outcome"], row["outcome_reason"]) in {
                ("failed", "series failed"),
                ("failed", RETRIEVAL_FAILED),
            }, an
        else:
            assert row["outcome"] == expected[an], an
    assert (summary.verdict.state, summary.verdict.failed_stage) == ("failed", "retrieve")
    assert summary.reconciled and summary.unfinished == sum(
        1 for row in rows.values() if row["outcome_reason"] == RETRIEVAL_FAILED
    )
    healthy = {
        key
        for key in expected_instances(truth)
        if key[0]
        not in {
            st["study_instance_uid"]
            for a in truth["accessions"]
            if a["accession_number"] in batches[doomed]
            for st in a["studies"]
        }
    }
    assert healthy <= set(files_on_disk(site.data_root))
    assert not list(StorageLayout(layout_root).root.glob("*/*/.incoming-*"))


def test_each_run_exports_its_metadata_and_its_audit_as_parquet(site):
    dag_id = "pacsflow__pooled"  # one manual run over the three weeks
    [run] = site.airflow.runs(dag_id)
    table = ds.dataset(
        site.data_root / "metadata" / dag_id / "instances", format="parquet", partitioning="hive"
    ).to_table()
    rows = set(
        zip(
            table["study_instance_uid"].to_pylist(),
            table["series_instance_uid"].to_pylist(),
            table["sop_instance_uid"].to_pylist(),
            strict=True,
        )
    )
    assert rows == expected_instances(site.truth())
    audit = site.data_root / "audit" / dag_id / run_token(run["dag_run_id"])
    accessions = pq.read_table(audit / "accessions.parquet")
    with site.audit() as store:
        assert accessions.num_rows == store.summary(f"{dag_id}/{run['dag_run_id']}").cohort
    assert "patient_id" not in accessions.column_names
    assert pq.read_table(audit / "runs.parquet")["run_id"].to_pylist() == [run["dag_run_id"]]


def test_the_release_holds_every_retrieved_instance_de_identified(site):
    release = site.data_root / "release" / "pooled"  # the project defaults to the extraction's id
    released = list((release / "dicom").glob("*/*/*.dcm"))
    truth = site.truth()
    assert len(released) == len(expected_instances(truth))  # the demo rules keep no ultrasound
    source_uids = {uid for instance in expected_instances(truth) for uid in instance}
    assert not {p.parent.parent.name for p in released} & source_uids
    table = ds.dataset(release / "metadata" / "instances", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == len(released)
    assert {(pid[:2], len(pid)) for pid in table["patient_id"].to_pylist()} == {("PF", 16)}


def test_internal_data_is_readable_by_the_service_account_only(site):
    root = site.data_root
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files) and any(p.name == "audit.sqlite" for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o600"}
    assert {oct(p.stat().st_mode & 0o777) for p in [root, *root.rglob("*")] if p.is_dir()} == {"0o700"}


def test_no_patient_identifier_reaches_any_log(site):
    """Every log a user or operator reads after all the runs above, failures included: task logs, the
    scheduler's, api-server's and dag-processor's, and the shared receiver's."""
    paths = [p for p in site.workdir.rglob("*.log") if p.is_file() and "orthanc" not in p.parts[-2]]
    paths.append(site.data_root / "dicom" / ".receiver.log")
    logs = "".join(p.read_text(errors="replace") for p in paths if p.exists())
    assert "resolution of" in logs and "retrieve_batch" in logs  # the task logs are there
    identifiers: set[str] = {text for pair in INSTITUTIONS for text in pair}
    identifiers |= {part for name in (*OPERATORS, *REFERRING_PHYSICIANS) for part in name.split("^")}
    for hospital in (site.hospital, site.failing_hospital):
        engine = create_engine(hospital.ris_url)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT accession_number, patient_id, patient_name FROM exams")).all()
        engine.dispose()
        identifiers |= {value for row in rows for value in row if value}
        identifiers |= {part for row in rows for part in row.patient_name.split("^") if len(part) > 3}
        truth = site.truth(hospital)
        identifiers |= {uid for instance in expected_instances(truth) for uid in instance}
    leaked = {
        value
        for value in identifiers
        if re.search(rf"(?<![0-9A-Za-z.]){re.escape(value)}(?![0-9A-Za-z]|\.[0-9])", logs)
    }
    assert leaked == set()
