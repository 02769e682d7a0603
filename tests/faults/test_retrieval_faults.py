"""Retrieval under network faults: every fault of the proxy, between the PACS and the receiver and between
pacsflow's client and the PACS, on Orthanc and on pynetdicom's qrscp, into both receiver backends.

Each case ends with exactly the ground truth on disk: in one run, or in a run whose retrieval failed with a
transient error (Airflow's retry) followed by a second run that completes it. Which of the two happened is
asserted to be one of them and recorded (user property ``outcome`` in the JUnit XML); either way the audit counts are
true and the data root holds no duplicate, temporary or extra file.

Sized for CI: a hospital of 4 ANs (3 retrievable studies, 1 absent), 64x64 images; in the stall cases short
timeouts on the side of pacsflow that waits, so the stall outlasts them in seconds, as a long stall outlasts the
real ones.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pytest
from pacsflow.core.audit import AttemptState, AuditStore, SeriesStatus, Stage
from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import PacsConfig, ReceiverConfig
from pacsflow.core.dicom.dcmtk_receiver import STAGING_DIR
from pacsflow.core.dicom.errors import PacsTransientError
from pacsflow.core.dicom.receiver import open_receiver
from pacsflow.core.dicom.sharing import RECEIVER_LOCK
from pacsflow.core.pipeline import RunContext, extract_cohort, resolve_cohort, retrieve_batch, settle_run
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.core.settings import load_definition
from pacsflow.core.storage import LOCK_DIR, SOP_INDEX, TEMP_PREFIX, StorageLayout
from pacsflow.demo.environment import DEMO_DEFINITION, demo_cohort
from pacsflow.demo.hospital import Hospital, build_hospital, expected_instances, expected_outcomes, load_ground_truth
from pacsflow.demo.sandbox import SandboxPacs, orthanc, qrscp

from tests.faults.proxy import Fault, FaultProxy
from tests.helpers import free_port

pytestmark = pytest.mark.orthanc
DEMO = load_definition(DEMO_DEFINITION)
RECEIVER_AE = "PACSFLOW"
# Failures a retry of the task can fix: the first run may end with one of these, and then a second run must
# complete the retrieval.
RETRYABLE = (PacsTransientError,)
# The timeouts (ACSE, DIMSE, network) of the side of pacsflow a stall makes wait: its receiver, or its client
# when the stall is on the client's association. The defaults are minutes.
PEER_TIMEOUT = 4.0
PEER_TIMEOUTS = {"acse_timeout": PEER_TIMEOUT, "dimse_timeout": PEER_TIMEOUT, "network_timeout": PEER_TIMEOUT}
STALL_SECONDS = PEER_TIMEOUT + 3.0  # outlasts the side that waits, as a long stall outlasts real timeouts
FAULT_BYTES = {  # where a cut or a stall strikes, per placement: mid-stream, after some of it went through
    # Inside the first 64x64 instance (~10 kB) of a C-STORE stream: qrscp's series listing lacks the description
    # the rules need, so its series are fetched one instance per C-MOVE (header first), never 20 kB at once.
    "pacs-receiver": 6_000,
    "client-pacs": 1_500,  # the association, then a C-FIND or C-MOVE exchange or two
}


def faults(placement: str) -> dict[str, Fault]:
    size = FAULT_BYTES[placement]
    return {
        "cut-once": Fault(cut_after=size, times=1),
        "cut-every-2nd": Fault(cut_after=size, every=2),
        "stall": Fault(stall_after=size, stall_seconds=STALL_SECONDS, times=1),
        "first-byte-delay": Fault(first_byte_delay=1.0),
        "refuse": Fault(refuse=True, times=2),
        # Refusals outlasting what one task tries (3 attempts of a client operation, 3 fruitless passes of a
        # series): only Airflow's retry of the task can finish the job.
        "refuse-burst": Fault(refuse=True, times=3),
    }


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Hospital:
    return build_hospital(tmp_path_factory.mktemp("hospital"), accessions=4, seed=41, image_size=64)


@pytest.fixture(scope="module")
def receiver_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def proxy_port() -> int:
    """Where each PACS sends its C-STOREs: the proxy in front of the receiver (a fault or a pass-through)."""
    return free_port()


@pytest.fixture(scope="module", params=["orthanc", "qrscp"])
def pacs(request, hospital, proxy_port, tmp_path_factory) -> Iterator[SandboxPacs]:
    start = orthanc if request.param == "orthanc" else qrscp
    files = sorted(hospital.dicom_dir.rglob("*.dcm"))
    destinations = {RECEIVER_AE: ("127.0.0.1", proxy_port)}
    with start(tmp_path_factory.mktemp(request.param), move_destinations=destinations) as box:
        assert box.load(files) == len(files)
        yield box


@pytest.fixture(params=["pynetdicom", "dcmtk"])
def receiver(request, receiver_port) -> ReceiverConfig:
    return ReceiverConfig(ae_title=RECEIVER_AE, port=receiver_port, backend=request.param)


@dataclass(frozen=True)
class Peers:
    """One case's hospital, PACS (which sends its C-STOREs to ``proxy_port``) and receiver settings."""

    hospital: Hospital
    pacs_kind: str
    pacs: SandboxPacs
    receiver: ReceiverConfig
    proxy_port: int


@pytest.fixture()
def peers(request, hospital, pacs, receiver, proxy_port) -> Peers:
    return Peers(hospital, request.node.callspec.params["pacs"], pacs, receiver, proxy_port)


@dataclass
class Run:
    """What the runs of one case left: the audit, the data root, and whether a retry was needed."""

    store: AuditStore
    ctx: RunContext
    layout: StorageLayout
    counts: list[dict[str, int]]  # of the retrieval tasks of the run that completed
    first_error: BaseException | None = None
    before_last: int = 0  # instances on disk when the run that completed started


@pytest.mark.parametrize("placement", ["pacs-receiver", "client-pacs"])
@pytest.mark.parametrize("fault_name", list(faults("pacs-receiver")))
def test_retrieval_under_a_network_fault_ends_with_the_ground_truth(peers, placement, fault_name, tmp_path, request):
    hospital, pacs, receiver = peers.hospital, peers.pacs, peers.receiver
    # Only a stall needs the waiting side's timeouts short; elsewhere the defaults keep a loaded machine from
    # turning slowness into faults the case is not about.
    stall_waits_for = placement if fault_name == "stall" else None
    if stall_waits_for == "pacs-receiver":
        receiver = replace(receiver, **PEER_TIMEOUTS)
    truth = load_ground_truth(hospital.ground_truth_path)
    fault = faults(placement)[fault_name]
    layout = StorageLayout(tmp_path / "dicom")
    with ExitStack() as stack:
        to_receiver = stack.enter_context(
            FaultProxy(
                target=(receiver.host, receiver.port),
                fault=fault if placement == "pacs-receiver" else Fault(),
                port=peers.proxy_port,
            )
        )
        config = replace(
            pacs.config,
            calling_ae=RECEIVER_AE,
            acse_timeout=PEER_TIMEOUT,
            dimse_timeout=PEER_TIMEOUT,
            network_timeout=PEER_TIMEOUT,
        )
        proxy = to_receiver
        if placement == "client-pacs":
            proxy = stack.enter_context(FaultProxy(target=(config.host, config.port), fault=fault))
            config = replace(config, port=proxy.port)
        store = stack.enter_context(AuditStore.connect(f"sqlite:///{tmp_path / 'audit.sqlite'}"))
        run = Run(store, RunContext(store, "library/faults", Pseudonymizer(b"0123456789abcdef")), layout, [])
        extract_cohort(run.ctx, lambda: demo_cohort(hospital), batch_size=100)
        run.first_error = _resolve_and_retrieve(run, config, receiver)
        if run.first_error is not None:  # Airflow retries the failed task: it resumes and fetches what is missing
            _assert_clean_root(layout, truth)
            _assert_failed_attempt_recorded(store, run.ctx.run_key)
            run.ctx = replace(run.ctx, try_number=2)
            run.before_last = len(_assert_clean_root(layout, truth))
            run.counts = []
            assert _resolve_and_retrieve(run, config, receiver) is None, "the retry did not complete the retrieval"
        summary = settle_run(run.ctx)
    outcome = "one run" if run.first_error is None else f"retry after {run.first_error.__class__.__name__}"
    request.node.user_properties += [
        ("outcome", outcome),
        ("proxy", f"connections {proxy.connections}, faulted {proxy.faulted}, struck {proxy.fired}"),
    ]
    assert proxy.fired >= 1, "the fault never struck: the case tests nothing"
    on_disk = _assert_clean_root(layout, truth)
    assert on_disk == expected_instances(truth)  # every instance, once
    _assert_audit_counts(store, run, truth, len(on_disk))
    outcomes = {an: row["outcome"] for an, row in store.accession_outcomes(run.ctx.run_key).items()}
    assert outcomes == expected_outcomes(truth)
    assert summary.reconciled and summary.unfinished == 0


def _resolve_and_retrieve(run: Run, config: PacsConfig, receiver: ReceiverConfig) -> BaseException | None:
    """The resolution task, then each retrieval task of the run; the retryable failure that ended it, if any."""
    connect = partial(PacsClient, config)
    try:
        for batch in resolve_cohort(run.ctx, connect, DEMO.resolution, 100):
            run.counts.append(
                retrieve_batch(
                    run.ctx,
                    batch,
                    connect,
                    rules=DEMO.series_rules,
                    layout=run.layout,
                    destination_ae=receiver.ae_title,
                    receiver=partial(open_receiver, receiver, run.layout),
                )
            )
    except RETRYABLE as error:
        return error
    return None


def _assert_clean_root(layout: StorageLayout, truth: dict) -> set[tuple[str, str, str]]:
    """The instances in the data root; asserts nothing else is there: no temporary or staged file, no file
    outside ``<study>/<series>/<sop>.dcm`` of a kept series, no empty directory."""
    instances: list[tuple[str, str, str]] = []
    kept_series = {(study, series) for study, series, _ in expected_instances(truth)}
    for directory, subdirs, files in os.walk(layout.root):
        here = Path(directory).relative_to(layout.root)
        assert not [name for name in files if name.startswith(TEMP_PREFIX)], f"temporary files in {here}"
        if here.parts and here.parts[0] in (LOCK_DIR, SOP_INDEX):
            continue  # the layout's own bookkeeping
        if here.parts and here.parts[0] == STAGING_DIR:
            assert not files, "files left in the DCMTK receiver's staging directory"
            continue
        if len(here.parts) == 2:
            assert tuple(here.parts) in kept_series, "a series directory the ground truth does not keep"
            assert files and not subdirs and all(name.endswith(".dcm") for name in files), f"{here}: {files}"
            instances += [(here.parts[0], here.parts[1], name.removesuffix(".dcm")) for name in files]
        else:
            bookkeeping = {RECEIVER_LOCK} if not here.parts else set()  # the running receiver's lock
            assert set(files) <= bookkeeping, f"stray files in {here}"
            assert subdirs or not here.parts, f"empty directory {here}"
    assert len(instances) == len(set(instances))
    return set(instances)


def _assert_failed_attempt_recorded(store: AuditStore, run_key: str) -> None:
    failed = [a for a in store.attempts(run_key) if a["state"] == AttemptState.FAILED]
    assert failed and all(a["stage"] in (Stage.RESOLVE, Stage.RETRIEVE) for a in failed)


def _assert_audit_counts(store: AuditStore, run: Run, truth: dict, on_disk: int) -> None:
    expected_per_series: dict[str, int] = {}
    for _, series, _ in expected_instances(truth):
        expected_per_series[series] = expected_per_series.get(series, 0) + 1
    series = store.series_rows(run.ctx.run_key, kept=True)
    assert {row["series_uid"]: row["status"] for row in series} == dict.fromkeys(
        expected_per_series, SeriesStatus.COMPLETE
    )
    assert {row["series_uid"]: row["received"] for row in series} == expected_per_series
    assert {row["series_uid"]: row["expected"] for row in series} == expected_per_series
    # The completing run counts as fetched exactly what it added: a re-sent copy is not a new instance.
    assert sum(c["instances_fetched"] for c in run.counts) == on_disk - run.before_last
    if run.first_error is None:
        assert sum(row["fetched"] for row in series) == on_disk
