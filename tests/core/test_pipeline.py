"""The stages called from the library against Orthanc loaded with a demo hospital: resolution classes,
a run killed in the middle of retrieval and resumed, and the PACS result cap."""

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
from pacsflow.core.audit import AuditStore
from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.dicom.errors import PacsConfigurationError
from pacsflow.core.dicom.receiver import StoreReceiver, open_receiver
from pacsflow.core.pipeline import (
    RunContext,
    extract_cohort,
    resolve_cohort,
    retrieve_batch,
    settle_run,
)
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.core.resolve import Resolution, ResolutionSettings, resolve_accession
from pacsflow.core.ris import RisExam
from pacsflow.core.settings import load_definition
from pacsflow.core.storage import TEMP_PREFIX, StorageLayout
from pacsflow.demo.environment import DEMO_DEFINITION, demo_cohort
from pacsflow.demo.hospital import (
    Quirk,
    build_hospital,
    expected_instances,
    expected_outcomes,
    load_ground_truth,
)
from pacsflow.demo.sandbox import orthanc

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
def pacs(hospital, receiver, tmp_path_factory) -> Iterator:
    with orthanc(
        tmp_path_factory.mktemp("orthanc"), move_destinations={receiver.ae_title: (receiver.host, receiver.port)}
    ) as sandbox:
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
