"""The DCMTK receiver backend (storescp per association) fed by a C-MOVE from Orthanc. The checks it shares with
the pynetdicom receiver run on both backends in test_receiver.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.dicom.dcmtk import DCMTK_BIN_ENV, DcmtkNotFound, dcmtk_program
from pacsflow.core.dicom.dcmtk_receiver import DcmtkStoreReceiver
from pacsflow.core.storage import StorageLayout
from pydicom import Dataset, dcmread
from pynetdicom import AE

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


def test_a_staged_file_storescp_removed_before_its_ingest_is_no_rejection(tmp_path):
    """storescp closes the file of a failed C-STORE (a peer's abort), then removes it: an ingest pass may list it
    in between. Nothing was received, so nothing is counted."""
    with DcmtkStoreReceiver(ReceiverConfig(ae_title=RECEIVER_AE, port=0), StorageLayout(tmp_path / "root")) as receiver:
        receiver._ingest([receiver.staging_root / "gone.dcm"])
    assert receiver.stats.stored == receiver.stats.rejected == 0 and not receiver.stats.rejected_reasons


VENV_BIN = Path(sys.executable).parent  # where pynetdicom installed its own storescp console script


def _store_one(receiver: DcmtkStoreReceiver, instance: Dataset) -> int:
    """C-STORE ``instance`` to ``receiver`` and settle it; the status it was answered with."""
    sender = AE(ae_title="SENDER")
    sender.add_requested_context(instance.SOPClassUID, instance.file_meta.TransferSyntaxUID)
    assoc = sender.associate("127.0.0.1", receiver.port, ae_title=RECEIVER_AE)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(instance)
    finally:
        assoc.release()
    receiver.settle()
    assert status is not None
    return int(status.Status)


@pytest.mark.orthanc  # starts storescp
def test_the_dcmtk_backend_receives_with_the_virtual_environment_first_on_path(files, tmp_path, monkeypatch):
    """An activated virtual environment puts pynetdicom's storescp first on PATH: DCMTK's must still be run."""
    assert (VENV_BIN / "storescp").is_file()  # the shadowing script this test is about
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(DCMTK_BIN_ENV, raising=False)
    instance = dcmread(files[0])
    layout = StorageLayout(tmp_path / "root")
    config = ReceiverConfig(ae_title=RECEIVER_AE, port=0, backend="dcmtk")
    with DcmtkStoreReceiver(config, layout) as receiver:
        assert _store_one(receiver, instance) == 0x0000
        stored = layout.stored_sop_uids(instance.StudyInstanceUID, instance.SeriesInstanceUID)
        assert stored == {instance.SOPInstanceUID}
    assert receiver.stats.stored == 1


@pytest.mark.orthanc  # starts storescp
def test_storescp_stores_every_element_with_the_lean_dictionary_it_is_given(files, tmp_path):
    """storescp runs with a dictionary of the command and file meta groups only (``+B`` stores the data set
    unparsed); what lands in the layout is the data set that was sent, element for element."""
    instance = dcmread(files[0])
    layout = StorageLayout(tmp_path / "root")
    config = ReceiverConfig(ae_title=RECEIVER_AE, port=0, backend="dcmtk")
    with DcmtkStoreReceiver(config, layout) as receiver:
        dictionary = (receiver._profile.parent / "storescp.dic").read_text().splitlines()
        status = _store_one(receiver, instance)
    assert {line[1:5] for line in dictionary} == {"0000", "0002"}
    assert status == 0x0000
    stored = dcmread(
        layout.instance_path(instance.StudyInstanceUID, instance.SeriesInstanceUID, instance.SOPInstanceUID)
    )
    assert stored == instance and len(stored) == len(instance)


def test_a_storescp_that_is_not_dcmtks_is_refused_naming_the_package_and_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv(DCMTK_BIN_ENV, str(VENV_BIN))
    config = ReceiverConfig(ae_title=RECEIVER_AE, port=0, backend="dcmtk")
    with pytest.raises(DcmtkNotFound) as error, DcmtkStoreReceiver(config, StorageLayout(tmp_path / "root")):
        pass
    message = str(error.value)
    assert f"{VENV_BIN / 'storescp'} is not DCMTK's storescp" in message
    assert "Debian package dcmtk" in message and DCMTK_BIN_ENV in message


def test_a_missing_dcmtk_is_refused_naming_the_package_and_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv(DCMTK_BIN_ENV, str(tmp_path))  # no storescp there
    with pytest.raises(DcmtkNotFound, match=rf"storescp is not at .*dcmtk.*{DCMTK_BIN_ENV}"):
        dcmtk_program("storescp")
    monkeypatch.delenv(DCMTK_BIN_ENV)
    assert dcmtk_program("storescp") == "/usr/bin/storescp"  # Debian's DCMTK, checked
