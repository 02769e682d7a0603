"""The stages called from the library against Orthanc loaded with a demo hospital: resolution classes,
a run killed in the middle of retrieval and resumed, the PACS result cap, series left incomplete for a reason a
retry can fix (the task fails, its retry finishes) or cannot fix (recorded, the task succeeds), and a PACS
(pynetdicom's qrscp) whose series listing lacks the SeriesDescription the rules need."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import requests
from pacsflow.core.audit import AttemptState, AuditStore, SeriesStatus, Stage
from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.dicom.errors import PacsConfigurationError
from pacsflow.core.dicom.receiver import StoreReceiver, open_receiver
from pacsflow.core.export import open_dataset
from pacsflow.core.pipeline import (
    RunContext,
    export_metadata,
    extract_cohort,
    resolve_cohort,
    retrieve_batch,
    settle_run,
)
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.core.resolve import Resolution, ResolutionSettings, resolve_accession
from pacsflow.core.retrieval import RetrievalSettings, RetryableSeriesError
from pacsflow.core.ris import RisExam
from pacsflow.core.settings import load_definition
from pacsflow.core.storage import TEMP_PREFIX, StorageLayout
from pacsflow.demo.environment import DEMO_DEFINITION, demo_cohort
from pacsflow.demo.hospital import (
    Quirk,
    build_hospital,
    dropped_series,
    expected_instances,
    expected_outcomes,
    load_ground_truth,
)
from pacsflow.demo.sandbox import orthanc, qrscp
from pydicom import dcmread

from tests.faults.proxy import Fault, FaultProxy
from tests.helpers import free_port

DEMO = load_definition(DEMO_DEFINITION)
RUN_KEY = "library/interrupted"


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    return build_hospital(tmp_path_factory.mktemp("hospital"), accessions=30, seed=5, image_size=64)


@pytest.fixture(scope="module")
def truth(hospital) -> dict:
    return load_ground_truth(hospital.ground_truth_path)


@pytest.fixture(scope="module")
def receiver() -> ReceiverConfig:
    return ReceiverConfig(ae_title="PACSFLOW", port=free_port())


@pytest.fixture(scope="module")
def proxied_receiver() -> ReceiverConfig:
    """A second move destination, which Orthanc reaches through ``receiver_proxy`` (no fault until a test sets one)."""
    return ReceiverConfig(ae_title="PROXIED", port=free_port())


@pytest.fixture(scope="module")
def receiver_proxy(proxied_receiver) -> Iterator[FaultProxy]:
    with FaultProxy(target=(proxied_receiver.host, proxied_receiver.port)) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def pacs(hospital, receiver, proxied_receiver, receiver_proxy, tmp_path_factory) -> Iterator:
    destinations = {
        receiver.ae_title: (receiver.host, receiver.port),
        proxied_receiver.ae_title: ("127.0.0.1", receiver_proxy.port),
    }
    with orthanc(tmp_path_factory.mktemp("orthanc"), move_destinations=destinations) as sandbox:
        sandbox.load(sorted(hospital.dicom_dir.rglob("*.dcm")))
        yield sandbox


def test_each_quirk_resolves_by_its_rule(pacs, hospital, truth):
    settings = DEMO.resolution
    by_an = {a["accession_number"]: a for a in truth["accessions"] if a["in_cohort"]}
    with PacsClient(pacs.config) as client:
        results = {exam.accession_number: resolve_accession(client, exam, settings) for exam in demo_cohort(hospital)}
    assert set(results) == set(by_an)
    for an, result in results.items():
        expected = by_an[an]
        assert (result.rule.value if result.rule else None) == expected["resolved_by"], expected["quirk"]
        if expected["expected_outcome"] == "not_found":
            assert result.resolution is Resolution.NOT_FOUND
        else:
            assert result.resolution is Resolution.RESOLVED
            assert set(result.study_uids) == {s["study_instance_uid"] for s in expected["studies"]}


def test_a_capped_answer_is_reported_as_capped_not_as_a_match(pacs, truth):
    multi = next(a for a in truth["accessions"] if a["quirk"] == Quirk.MULTI_STUDY)
    with PacsClient(replace(pacs.config, result_cap=1)) as client:
        result = resolve_accession(client, RisExam(multi["accession_number"]), ResolutionSettings())
    assert result.resolution is Resolution.CAPPED


CHILD = """
import json, sys
from functools import partial
from pathlib import Path
from pacsflow.core.audit import AuditStore
from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import PacsConfig, ReceiverConfig
from pacsflow.core.dicom.receiver import StoreReceiver, open_receiver
from pacsflow.core.pipeline import RunContext, retrieve_batch
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.core.series_rules import SeriesRules
from pacsflow.core.storage import StorageLayout
args = json.loads(sys.argv[1])
layout = StorageLayout(Path(args["root"]))
receiver = ReceiverConfig(**args["receiver"])
with AuditStore.connect(args["audit_url"]) as store:
    ctx = RunContext(store, args["run_key"], Pseudonymizer(b"0123456789abcdef"))
    for batch in args["batches"]:
        retrieve_batch(ctx, batch, partial(PacsClient, PacsConfig(**args["pacs"])),
                       rules=SeriesRules.parse(args["rules"]), layout=layout,
                       destination_ae=receiver.ae_title, receiver=partial(StoreReceiver, receiver, layout))
"""


def _stored_files(layout: StorageLayout) -> list[Path]:
    """Instances at their final path (a receive killed mid-write leaves a temp file the next receiver sweeps)."""
    return [p for p in layout.root.glob("*/*/*.dcm") if not p.name.startswith(TEMP_PREFIX)]


def test_a_run_killed_mid_retrieval_resumes_without_refetching(pacs, hospital, truth, receiver, tmp_path):
    layout = StorageLayout(tmp_path / "dicom")
    audit_url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    rules = DEMO.series_rules
    connect = partial(PacsClient, pacs.config)
    with AuditStore.connect(audit_url) as store:
        ctx = RunContext(store, RUN_KEY, Pseudonymizer(b"0123456789abcdef"))
        extract_cohort(ctx, lambda: demo_cohort(hospital), batch_size=100)
        batches = resolve_cohort(ctx, connect, DEMO.resolution, 100)
    wanted = expected_instances(truth)

    args = {
        "root": str(layout.root),
        "audit_url": audit_url,
        "run_key": RUN_KEY,
        "batches": batches,
        "rules": DEMO.series_rules.model_dump(mode="json"),
        "receiver": {"ae_title": receiver.ae_title, "port": receiver.port},
        "pacs": {"host": pacs.config.host, "port": pacs.config.port, "called_ae": pacs.config.called_ae},
    }
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(args)], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    )
    deadline = time.monotonic() + 120
    while len(_stored_files(layout)) < len(wanted) // 3 and time.monotonic() < deadline:
        assert child.poll() is None, "the retrieval finished before it could be interrupted"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    survivors = {p: p.stat().st_mtime_ns for p in _stored_files(layout)}
    assert 0 < len(survivors) < len(wanted)

    with AuditStore.connect(audit_url) as store:
        ctx = RunContext(store, RUN_KEY, Pseudonymizer(b"0123456789abcdef"))
        fetched = sum(
            retrieve_batch(
                ctx,
                batch,
                connect,
                rules=rules,
                layout=layout,
                destination_ae=receiver.ae_title,
                receiver=partial(StoreReceiver, receiver, layout),
            )["instances_fetched"]
            for batch in batches
        )
        summary = settle_run(ctx)
        outcomes = {an: row["outcome"] for an, row in store.accession_outcomes(RUN_KEY).items()}

    on_disk = {(p.parent.parent.name, p.parent.name, p.stem) for p in _stored_files(layout)}
    assert on_disk == wanted
    assert fetched == len(wanted) - len(survivors)
    assert {p: p.stat().st_mtime_ns for p in survivors} == survivors
    assert not list(layout.root.glob("*/*/.incoming-*"))
    assert outcomes == expected_outcomes(truth) and summary.reconciled


def test_a_pacs_that_cannot_reach_the_receiver_fails_the_task_with_the_fix(pacs, hospital, tmp_path):
    layout = StorageLayout(tmp_path / "dicom")
    connect = partial(PacsClient, pacs.config)
    with AuditStore.connect(f"sqlite:///{tmp_path / 'audit.sqlite'}") as store:
        ctx = RunContext(store, "library/unknown-destination", Pseudonymizer(b"0123456789abcdef"))
        extract_cohort(ctx, lambda: demo_cohort(hospital), batch_size=100)
        batches = resolve_cohort(ctx, connect, DEMO.resolution, 100)
        with pytest.raises(PacsConfigurationError, match="move destination"):
            retrieve_batch(ctx, batches[0], connect, rules=DEMO.series_rules, layout=layout, destination_ae="NOBODY")


def test_the_dcmtk_receiver_backend_retrieves_the_cohort_verified(pacs, hospital, truth, receiver, tmp_path):
    layout = StorageLayout(tmp_path / "dicom")
    connect = partial(PacsClient, pacs.config)
    incoming = partial(open_receiver, replace(receiver, backend="dcmtk"), layout)
    with AuditStore.connect(f"sqlite:///{tmp_path / 'audit.sqlite'}") as store:
        ctx = RunContext(store, "library/dcmtk-backend", Pseudonymizer(b"0123456789abcdef"))
        extract_cohort(ctx, lambda: demo_cohort(hospital), batch_size=100)
        batches = resolve_cohort(ctx, connect, DEMO.resolution, 100)
        counts = [
            retrieve_batch(
                ctx,
                batch,
                connect,
                rules=DEMO.series_rules,
                layout=layout,
                destination_ae=receiver.ae_title,
                receiver=incoming,
            )
            for batch in batches
        ]
        summary = settle_run(ctx)
        outcomes = {an: row["outcome"] for an, row in store.accession_outcomes(ctx.run_key).items()}
    on_disk = {(p.parent.parent.name, p.parent.name, p.stem) for p in _stored_files(layout)}
    assert on_disk == expected_instances(truth)
    assert sum(c["instances_fetched"] for c in counts) == len(on_disk)  # one pass each: nothing fetched twice
    assert sum(c["partial"] + c["failed"] for c in counts) == 0
    assert outcomes == expected_outcomes(truth) and summary.reconciled


# -- series a retry can finish, series no retry can fix -------------------------------------------------
CUT_AFTER = 60_000  # bytes of one PACS -> receiver association: a few 64x64 instances (9.6 kB each), then a reset
KEY = b"0123456789abcdef"


def _largest_retrieved(truth: dict, count: int) -> set[str]:
    """The ``count`` in-cohort ANs with the most instances to retrieve."""

    def size(accession: dict) -> int:
        return sum(len(s["sop_instance_uids"]) for st in accession["studies"] for s in st["series"] if s["kept"])

    retrieved = [a for a in truth["accessions"] if a["in_cohort"] and a["expected_outcome"] == "retrieved"]
    return {a["accession_number"] for a in sorted(retrieved, key=size, reverse=True)[:count]}


def _truth_of(truth: dict, accession_numbers: set[str]) -> dict:
    return {**truth, "accessions": [a for a in truth["accessions"] if a["accession_number"] in accession_numbers]}


def _identifiers(truth: dict) -> set[str]:
    """Every AN, patient ID and UID of a ground truth (none may appear in an exception text)."""
    found = set()
    for accession in truth["accessions"]:
        found |= {accession["accession_number"], accession["patient_id"]}
        for study in accession["studies"]:
            found.add(study["study_instance_uid"])
            for series in study["series"]:
                found |= {series["series_instance_uid"], *series["sop_instance_uids"]}
    return found


def _start_run(store: AuditStore, run_key: str, hospital, connect, accession_numbers: set[str] | None = None):
    ctx = RunContext(store, run_key, Pseudonymizer(KEY))
    exams = [e for e in demo_cohort(hospital) if accession_numbers is None or e.accession_number in accession_numbers]
    extract_cohort(ctx, lambda: exams, batch_size=100)
    return ctx, resolve_cohort(ctx, connect, DEMO.resolution, 100)


def _retrieve_first_batch(ctx, batches, client: PacsClient, receiver: ReceiverConfig, layout: StorageLayout):
    """The demo's series rules, ``client`` (closed after the batch) and an embedded receiver."""
    return retrieve_batch(
        ctx,
        batches[0],
        lambda: client,
        rules=DEMO.series_rules,
        layout=layout,
        destination_ae=receiver.ae_title,
        receiver=partial(StoreReceiver, receiver, layout),
    )


def _parquet_statuses(metadata: Path) -> dict[str, str]:
    table = open_dataset(metadata, "series").to_table(columns=["series_instance_uid", "series_status"])
    return dict(zip(table["series_instance_uid"].to_pylist(), table["series_status"].to_pylist(), strict=True))


def test_series_a_retry_can_finish_fail_the_task_after_the_batch_and_the_retry_completes_them(
    pacs, hospital, proxied_receiver, receiver_proxy, tmp_path
):
    truth = load_ground_truth(hospital.ground_truth_path)
    chosen = _largest_retrieved(truth, 2)
    wanted = expected_instances(_truth_of(truth, chosen))
    layout, metadata = StorageLayout(tmp_path / "dicom"), tmp_path / "metadata"
    connect = partial(PacsClient, pacs.config)
    retrieve = partial(
        retrieve_batch,
        rules=DEMO.series_rules,
        layout=layout,
        destination_ae=proxied_receiver.ae_title,
        receiver=partial(StoreReceiver, proxied_receiver, layout),
        settings=RetrievalSettings(pass_pauses=(0.0,)),  # one pass: the cut cannot be healed within the task
    )
    receiver_proxy.fault, receiver_proxy.faulted = Fault(cut_after=CUT_AFTER, times=1), 0
    with AuditStore.connect(f"sqlite:///{tmp_path / 'audit.sqlite'}") as store:
        ctx, batches = _start_run(store, "library/retryable", hospital, connect, chosen)
        assert len(batches) == 1
        with pytest.raises(RetryableSeriesError) as failure:
            retrieve(ctx, batches[0], connect)
        assert receiver_proxy.faulted == 1
        kept = store.series_rows(ctx.run_key, kept=True)
        incomplete = [row for row in kept if row["status"] != SeriesStatus.COMPLETE]
        assert any(
            row["status"] == SeriesStatus.PARTIAL and 0 < row["received"] < row["expected"] for row in incomplete
        ), [(r["status"], r["received"], r["expected"], r["error"]) for r in kept]
        attempt = store.attempts(ctx.run_key)[-1]
        assert attempt["state"] == AttemptState.FAILED and attempt["counts"]["retryable"] == len(incomplete)
        assert not any(identifier in str(failure.value) for identifier in _identifiers(truth))
        after_first_try = len(_stored_files(layout))

        # The last try, as far as this run knows: audit, summary and Parquet agree on what stayed incomplete.
        export_metadata(ctx, layout, metadata, "retryable")
        summary = settle_run(ctx)
        assert not summary.succeeded and summary.verdict.failed_stage == Stage.RETRIEVE
        assert summary.series.get(SeriesStatus.PARTIAL, 0) + summary.series.get(SeriesStatus.FAILED, 0) == len(
            incomplete
        )
        assert _parquet_statuses(metadata) == {row["series_uid"]: row["status"] for row in kept if row["received"]}

        # Airflow's retry of the task: fetches only what is missing.
        counts = retrieve(ctx, batches[0], connect)
        export_metadata(ctx, layout, metadata, "retryable")
        summary = settle_run(ctx)
        outcomes = {an: row["outcome"] for an, row in store.accession_outcomes(ctx.run_key).items()}
    on_disk = {(p.parent.parent.name, p.parent.name, p.stem) for p in _stored_files(layout)}
    assert on_disk == wanted
    assert counts["instances_fetched"] == len(wanted) - after_first_try and counts["retryable"] == 0
    assert summary.succeeded and outcomes == expected_outcomes(_truth_of(truth, chosen))
    assert _parquet_statuses(metadata) == {row["series_uid"]: SeriesStatus.COMPLETE.value for row in kept}


def _orthanc_series_id(pacs, series_uid: str) -> str:
    answer = requests.post(f"{pacs.http_url}/tools/lookup", data=series_uid, timeout=30)
    answer.raise_for_status()
    return next(item["ID"] for item in answer.json() if item["Type"] == "Series")


def test_a_series_the_pacs_no_longer_holds_is_recorded_and_does_not_fail_the_task(
    pacs, hospital, truth, receiver, tmp_path
):
    chosen = _largest_retrieved(truth, 1)
    (accession,) = _truth_of(truth, chosen)["accessions"]
    study_uid, gone = next(
        (st["study_instance_uid"], s) for st in accession["studies"] for s in st["series"] if s["kept"]
    )
    gone_files = [
        path
        for path in sorted(hospital.dicom_dir.rglob("*.dcm"))
        if dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID
        == gone["series_instance_uid"]
    ]
    orthanc_id = _orthanc_series_id(pacs, gone["series_instance_uid"])

    class SeriesDeletedAfterListing(PacsClient):
        """Another user deletes the series on the PACS (Orthanc's REST API) between its listing and retrieval."""

        def find(self, level, query):
            result = super().find(level, query)
            if level == "SERIES" and query["StudyInstanceUID"] == study_uid:
                requests.delete(f"{pacs.http_url}/series/{orthanc_id}", timeout=30).raise_for_status()
            return result

    layout = StorageLayout(tmp_path / "dicom")
    try:
        with AuditStore.connect(f"sqlite:///{tmp_path / 'audit.sqlite'}") as store:
            ctx, batches = _start_run(store, "library/final", hospital, partial(PacsClient, pacs.config), chosen)
            counts = _retrieve_first_batch(ctx, batches, SeriesDeletedAfterListing(pacs.config), receiver, layout)
            export_metadata(ctx, layout, tmp_path / "metadata", "final")
            summary = settle_run(ctx)
            rows = {row["series_uid"]: row for row in store.series_rows(ctx.run_key, kept=True)}
            outcome = store.accession_outcomes(ctx.run_key)[accession["accession_number"]]
    finally:
        assert pacs.load(gone_files) == len(gone_files)  # the other tests' PACS holds the hospital again
    row = rows.pop(gone["series_instance_uid"])
    assert row["status"] == SeriesStatus.FAILED and row["received"] == 0 and row["error"]
    assert {r["status"] for r in rows.values()} == {SeriesStatus.COMPLETE}, [
        (r["received"], r["error"]) for r in rows.values()
    ]
    assert counts["failed"] == 1 and counts["retryable"] == 0
    assert summary.succeeded  # recorded with its reason, and the run is green: no retry could fix it
    assert _parquet_statuses(tmp_path / "metadata") == dict.fromkeys(rows, SeriesStatus.COMPLETE.value)
    assert (outcome["outcome"], outcome["outcome_reason"]) == ("failed", "series failed")


# -- a PACS whose series listing lacks what the rules need ------------------------------------------------
@pytest.fixture(scope="module")
def qr_pacs(hospital, receiver, tmp_path_factory) -> Iterator:
    """pynetdicom's qrscp holding the hospital: it answers series-level C-FIND without SeriesDescription."""
    with qrscp(
        tmp_path_factory.mktemp("qrscp"), move_destinations={receiver.ae_title: (receiver.host, receiver.port)}
    ) as sandbox:
        sandbox.load(sorted(hospital.dicom_dir.rglob("*.dcm")))
        yield sandbox


def test_a_listing_without_the_description_costs_one_instance_per_dropped_series(
    pacs, qr_pacs, hospital, receiver, tmp_path
):
    truth = load_ground_truth(hospital.ground_truth_path)
    layout = StorageLayout(tmp_path / "dicom")
    receivers: list[StoreReceiver] = []

    def incoming() -> StoreReceiver:
        receivers.append(StoreReceiver(receiver, layout))
        return receivers[-1]

    with AuditStore.connect(f"sqlite:///{tmp_path / 'audit.sqlite'}") as store:
        # ANs are resolved on Orthanc (the same files); series are listed and retrieved from qrscp.
        ctx, batches = _start_run(store, "library/qrscp-probe", hospital, partial(PacsClient, pacs.config))
        counts = [
            retrieve_batch(
                ctx,
                batch,
                partial(PacsClient, qr_pacs.config),
                rules=DEMO.series_rules,
                layout=layout,
                destination_ae=receiver.ae_title,
                receiver=incoming,
            )
            for batch in batches
        ]
        summary = settle_run(ctx)
        rows = {row["series_uid"]: row for row in store.series_rows(ctx.run_key)}
        outcomes = {an: row["outcome"] for an, row in store.accession_outcomes(ctx.run_key).items()}
    wanted = expected_instances(truth)
    probed = {uid for uid, reason in dropped_series(truth).items() if reason == "description"}
    assert probed, "the hospital has no series that only its description drops"
    assert all(rows[uid]["description"] is None for uid in probed)  # qrscp did leave the key out

    files = _stored_files(layout)
    assert {(p.parent.parent.name, p.parent.name, p.stem) for p in files} == wanted
    transferred = sum(r.stats.stored for r in receivers)
    assert transferred == len(wanted) + len(probed)  # one instance per series dropped on its header
    assert sum(c["instances_fetched"] for c in counts) == len(wanted)
    assert sum(c["instances_discarded"] for c in counts) == len(probed)
    for uid in probed:
        row = rows[uid]
        assert (row["status"], row["drop_reason"], row["fetched"], row["received"]) == ("dropped", "description", 1, 0)
    discarded_bytes = sum(rows[uid]["bytes"] for uid in probed)
    assert discarded_bytes == sum(c["bytes_discarded"] for c in counts) > 0
    assert sum(r.stats.bytes_stored for r in receivers) == sum(p.stat().st_size for p in files) + discarded_bytes
    directories = [
        d for d in layout.root.rglob("*") if d.is_dir() and not d.relative_to(layout.root).parts[0].startswith(".")
    ]
    assert directories and all(any(d.iterdir()) for d in directories)  # no empty study or series directory
    assert outcomes == expected_outcomes(truth) and summary.reconciled


# -- verification by the listing's count -------------------------------------------------------------------
class ImageQueriesCounted(PacsClient):
    """A real client that counts its image-level C-FINDs per Series Instance UID, and can answer a series listing
    with a wrong instance count for some series (a PACS whose count is stale)."""

    def __init__(self, config, miscounted: set[str]) -> None:
        super().__init__(config)
        self.image_finds: dict[str, int] = {}
        self.miscounted = miscounted

    def find(self, level, query):
        result = super().find(level, query)
        if level == "IMAGE":
            uid = query["SeriesInstanceUID"]
            self.image_finds[uid] = self.image_finds.get(uid, 0) + 1
        elif level == "SERIES":
            for match in result.matches:
                if match["SeriesInstanceUID"] in self.miscounted:
                    match["NumberOfSeriesRelatedInstances"] += 1
        return result


def _retrieve_counting_image_queries(pacs, hospital, receiver, tmp_path, *, chosen, miscounted):
    layout = StorageLayout(tmp_path / "dicom")
    client = ImageQueriesCounted(pacs.config, miscounted)
    with AuditStore.connect(f"sqlite:///{tmp_path / 'audit.sqlite'}") as store:
        ctx, batches = _start_run(store, "library/by-count", hospital, partial(PacsClient, pacs.config), chosen)
        counts = _retrieve_first_batch(ctx, batches, client, receiver, layout)
        rows = {row["series_uid"]: row for row in store.series_rows(ctx.run_key, kept=True)}
    return layout, counts, rows, client.image_finds


def _assert_complete_with_true_counts(layout: StorageLayout, row: dict) -> None:
    on_disk = len(layout.stored_sop_uids(row["study_uid"], row["series_uid"]))
    assert row["status"] == SeriesStatus.COMPLETE and row["expected"] == row["received"] == on_disk


def test_series_moved_with_their_study_are_verified_by_the_listed_count(pacs, hospital, truth, receiver, tmp_path):
    chosen = _largest_retrieved(truth, 4)
    layout, counts, rows, image_finds = _retrieve_counting_image_queries(
        pacs, hospital, receiver, tmp_path, chosen=chosen, miscounted=set()
    )
    wanted = expected_instances(_truth_of(truth, chosen))
    assert {(p.parent.parent.name, p.parent.name, p.stem) for p in _stored_files(layout)} == wanted
    assert counts["complete"] == len(rows) and counts["instances_fetched"] == len(wanted)
    by_count = {uid for uid, row in rows.items() if "verify" in row["seconds"]}
    assert by_count, "no series was moved with its study"
    for uid in rows:
        assert image_finds.get(uid, 0) == (0 if uid in by_count else 1)
        _assert_complete_with_true_counts(layout, rows[uid])


def test_a_listed_count_the_instances_do_not_match_is_verified_against_the_instance_list(
    pacs, hospital, truth, receiver, tmp_path
):
    chosen = _largest_retrieved(truth, 4)
    series = [
        s["series_instance_uid"]
        for accession in _truth_of(truth, chosen)["accessions"]
        for study in accession["studies"]
        for s in study["series"]
        if s["kept"]
    ]
    miscounted = set(series[1::2])
    layout, counts, rows, image_finds = _retrieve_counting_image_queries(
        pacs, hospital, receiver, tmp_path, chosen=chosen, miscounted=miscounted
    )
    assert {(p.parent.parent.name, p.parent.name, p.stem) for p in _stored_files(layout)} == expected_instances(
        _truth_of(truth, chosen)
    )
    assert counts["complete"] == len(rows)
    verified_by_count = {row["study_uid"] for row in rows.values() if "verify" in row["seconds"]}
    assert any(rows[uid]["study_uid"] in verified_by_count for uid in miscounted), "none was moved with its study"
    for uid in miscounted:  # the PACS's instance list decides, and the recorded count is the true one
        assert image_finds[uid] == 1 and "verify" not in rows[uid]["seconds"]
        _assert_complete_with_true_counts(layout, rows[uid])
