"""The DCMTK receiver backend (storescp per association) against real senders: pynetdicom, DCMTK, Orthanc."""

from __future__ import annotations

import subprocess

import pytest
from pydicom import dcmread

from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.dicom.dcmtk_receiver import STAGING_DIR, DcmtkStoreReceiver, settle_receivers
from pacsflow.core.storage import StorageLayout
from tests.conftest import free_port
from tests.core.dicom.conftest import RECEIVER_AE
from tests.core.dicom.test_receiver import DCMTK_ENV, _invalid_values_allowed, send


@pytest.fixture
def receiver_config() -> ReceiverConfig:
    return ReceiverConfig(ae_title=RECEIVER_AE, port=free_port())


def _files_under(root) -> list:
    return [path for path in root.rglob("*") if path.is_file()]


def test_dcmtk_storescu_into_the_backend_stores_identical_instances(files, receiver_config, tmp_path):
    layout = StorageLayout(tmp_path / "root")
    batch = files[:10]
    with DcmtkStoreReceiver(receiver_config, layout) as receiver:
        subprocess.run(["storescu", "-aet", "DCMTK", "-aec", RECEIVER_AE, "127.0.0.1", str(receiver.port),
                        *map(str, batch)], check=True, env=DCMTK_ENV, capture_output=True)
    assert receiver.stats.stored == len(batch) and receiver.stats.rejected == 0
    for path in batch:
        original = dcmread(path)
        stored = dcmread(layout.instance_path(original.StudyInstanceUID, original.SeriesInstanceUID,
                                              original.SOPInstanceUID))
        assert stored.PixelData == original.PixelData and stored.PatientName == original.PatientName
    assert not (layout.root / STAGING_DIR).exists()


def test_a_move_through_orthanc_is_in_the_layout_when_settled(pacs, receiver_ports, a_series, tmp_path):
    study, series, count = a_series
    layout = StorageLayout(tmp_path / "root")
    config = ReceiverConfig(ae_title=RECEIVER_AE, port=receiver_ports[RECEIVER_AE])
    with DcmtkStoreReceiver(config, layout) as receiver, PacsClient(pacs.config) as client:
        report = client.move("SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": series}, RECEIVER_AE)
        settle_receivers()
        # Verified while the receiver still runs: what the PACS reports as sent is durable in the layout.
        assert report.completed == count == len(layout.stored_sop_uids(study, series))
    assert receiver.stats.stored == count


def test_a_hostile_sop_instance_uid_never_reaches_a_path(files, receiver_config, tmp_path):
    dataset = dcmread(files[0])
    dataset.SOPInstanceUID = "../../../../elsewhere/x"
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    layout = StorageLayout(tmp_path / "root")
    with _invalid_values_allowed(), DcmtkStoreReceiver(receiver_config, layout) as receiver:
        send(receiver_config.port, dataset)
        receiver.settle()
    # storescp stores it under a generated name; the ingest refuses it before it becomes a path.
    assert receiver.stats.stored == 0 and receiver.stats.rejected_reasons == {"invalid UID": 1}
    assert _files_under(tmp_path) == []

