"""The DCMTK receiver backend (storescp per association) fed by a C-MOVE from Orthanc. The checks it shares with
the pynetdicom receiver run on both backends in test_receiver.py."""

from __future__ import annotations

from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.dicom.dcmtk_receiver import DcmtkStoreReceiver
from pacsflow.core.storage import StorageLayout

from tests.core.dicom.conftest import RECEIVER_AE


def test_a_move_through_orthanc_is_in_the_layout_when_settled(pacs, receiver_ports, a_series, tmp_path):
    study, series, count = a_series
    layout = StorageLayout(tmp_path / "root")
    config = ReceiverConfig(ae_title=RECEIVER_AE, port=receiver_ports[RECEIVER_AE])
    with DcmtkStoreReceiver(config, layout) as receiver, PacsClient(pacs.config) as client:
        report = client.move("SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": series}, RECEIVER_AE)
        receiver.settle()
        # Verified while the receiver still runs: what the PACS reports as sent is durable in the layout.
        assert report.completed == count == len(layout.stored_sop_uids(study, series))
    assert receiver.stats.stored == count
