"""Retrieval under network faults between the PACS and the receiver: a C-MOVE whose C-STORE stream is cut
(Orthanc then answers a bare 0xC000 after some sub-operations) is finished inside the same task, instance by
instance, and the counts stay true."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from functools import partial

import pytest
from pacsflow.core.audit import AuditStore, SeriesStatus
from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.dicom.receiver import open_receiver
from pacsflow.core.pipeline import (
    RunContext,
    extract_cohort,
    resolve_cohort,
    retrieve_batch,
    settle_run,
)
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.core.settings import load_definition
from pacsflow.core.storage import TEMP_PREFIX, StorageLayout
from pacsflow.demo.environment import DEMO_DEFINITION, demo_cohort
from pacsflow.demo.hospital import (
    build_hospital,
    expected_instances,
    expected_outcomes,
    load_ground_truth,
)
from pacsflow.demo.sandbox import orthanc

from tests.faults.proxy import Fault, FaultProxy
from tests.helpers import free_port

pytestmark = pytest.mark.orthanc
DEMO = load_definition(DEMO_DEFINITION)
CUT_AFTER = 20_000  # bytes of one PACS -> receiver association: a few 64x64 instances, then a reset


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    return build_hospital(tmp_path_factory.mktemp("hospital"), accessions=24, seed=41, image_size=64)


@pytest.fixture(scope="module")
def receiver() -> ReceiverConfig:
    return ReceiverConfig(ae_title="PACSFLOW", port=free_port())


@pytest.fixture(scope="module")
def proxy_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def pacs(hospital, proxy_port, tmp_path_factory) -> Iterator:
    """Orthanc, which knows the receiver at the proxy's address."""
    with orthanc(tmp_path_factory.mktemp("orthanc"), move_destinations={"PACSFLOW": ("127.0.0.1", proxy_port)}) as box:
        box.load(sorted(hospital.dicom_dir.rglob("*.dcm")))
        yield box


class _Listening(FaultProxy):
    """The proxy on a port chosen before Orthanc started (Orthanc's move destination names it)."""

    def __init__(self, port: int, **kwargs) -> None:
        import socket

        super().__init__(**kwargs)
        self._listener.close()
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.2)


@pytest.mark.parametrize("fault", [Fault(cut_after=CUT_AFTER, times=1)], ids=["cut-once"])
def test_a_cut_c_store_stream_is_finished_in_the_same_task(pacs, hospital, receiver, proxy_port, tmp_path, fault):
    truth = load_ground_truth(hospital.ground_truth_path)
    layout = StorageLayout(tmp_path / "dicom")
    connect = partial(PacsClient, replace(pacs.config, calling_ae="PACSFLOW"))
    with (
        AuditStore.connect(f"sqlite:///{tmp_path / 'audit.sqlite'}") as store,
        _Listening(proxy_port, target=(receiver.host, receiver.port), fault=fault) as proxy,
    ):
        ctx = RunContext(store, "library/faults", Pseudonymizer(b"0123456789abcdef"))
        extract_cohort(ctx, lambda: demo_cohort(hospital), batch_size=100)
        counts = [
            retrieve_batch(
                ctx,
                batch,
                connect,
                rules=DEMO.series_rules,
                layout=layout,
                destination_ae=receiver.ae_title,
                receiver=partial(open_receiver, receiver, layout),
            )
            for batch in resolve_cohort(ctx, connect, DEMO.resolution, 100)
        ]
        summary = settle_run(ctx)
        series = store.series_rows(ctx.run_key, kept=True)
        outcomes = {an: row["outcome"] for an, row in store.accession_outcomes(ctx.run_key).items()}
    assert proxy.faulted >= 1  # the fault did happen
    on_disk = [(p.parent.parent.name, p.parent.name, p.stem) for p in layout.root.glob("*/*/*.dcm")]
    assert sorted(on_disk) == sorted(expected_instances(truth))  # each instance once, none missing
    assert not list(layout.root.glob(f"*/*/{TEMP_PREFIX}*"))
    assert {row["status"] for row in series} == {SeriesStatus.COMPLETE}
    assert sum(c["instances_fetched"] for c in counts) == len(on_disk)
    assert sum(row["received"] for row in series) == len(on_disk)
    assert outcomes == expected_outcomes(truth) and summary.reconciled and summary.unfinished == 0
