"""The PACS client against a real Orthanc: queries, retrievals and each failure class it can produce."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pydicom import dcmread

from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.dicom.errors import Action, PacsConfigurationError, PacsItemError, PacsTransientError
from pacsflow.core.dicom.receiver import StoreReceiver
from pacsflow.core.storage import StorageLayout
from pacsflow.demo.sandbox import qrscp
from tests.core.dicom.conftest import RECEIVER_AE, UNWELCOMING_AE
from tests.conftest import free_port


def test_echo_and_one_association_for_many_queries(pacs):
    with PacsClient(pacs.config) as client:
        client.echo()
        first = client._association()
        for _ in range(20):
            client.find("STUDY", {"StudyInstanceUID": ""})
        assert client._association() is first


def test_study_series_and_image_levels_agree_with_the_files(pacs, files, a_series):
    study, series, count = a_series
    with PacsClient(pacs.config) as client:
        studies = client.find("STUDY", {"StudyInstanceUID": study, "AccessionNumber": "", "PatientID": ""})
        listed = client.find("SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": "", "Modality": "",
                                        "NumberOfSeriesRelatedInstances": ""})
        images = client.find("IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": series,
                                       "SOPInstanceUID": ""})
    assert [m["StudyInstanceUID"] for m in studies.matches] == [study]
    assert {m["SeriesInstanceUID"]: m["NumberOfSeriesRelatedInstances"] for m in listed.matches}[series] == count
    on_disk = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files if p.parent.name == series}
    assert {m["SOPInstanceUID"] for m in images.matches} == on_disk


def test_person_names_are_decoded_per_character_set(pacs, files):
    expected = {}
    for path in files:
        header = dcmread(path, stop_before_pixels=True)
        expected[header.PatientID] = str(header.PatientName)
    assert any(not name.isascii() for name in expected.values()), "the demo hospital must hold accented names"
    with PacsClient(pacs.config) as client:
        found = client.find("STUDY", {"PatientID": "", "PatientName": "", "StudyInstanceUID": ""}).matches
    assert {m["PatientID"]: m["PatientName"] for m in found} == expected


def test_an_is_an_exact_key(pacs, files):
    header = next(h for h in (dcmread(p, stop_before_pixels=True) for p in files) if h.AccessionNumber)
    with PacsClient(pacs.config) as client:
        exact = client.find("STUDY", {"AccessionNumber": header.AccessionNumber, "StudyInstanceUID": ""})
        prefix = client.find("STUDY", {"AccessionNumber": header.AccessionNumber[:-1], "StudyInstanceUID": ""})
    assert {m["StudyInstanceUID"] for m in exact.matches} >= {header.StudyInstanceUID}
    assert header.StudyInstanceUID not in {m["StudyInstanceUID"] for m in prefix.matches}


def test_move_into_the_receiver_lands_every_instance_at_its_layout_path(pacs, receiver_ports, a_series, tmp_path):
    study, series, count = a_series
    layout = StorageLayout(tmp_path)
    with StoreReceiver(ReceiverConfig(port=receiver_ports[RECEIVER_AE], allowed_calling_aes=("ORTHANC",)),
                       layout) as receiver, PacsClient(pacs.config) as client:
        report = client.move("SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": series}, RECEIVER_AE)
    assert (report.status, report.completed, report.failed, report.suspicious) == (0, count, 0, False)
    assert receiver.stats.stored == count and receiver.stats.rejected == 0
    assert len(layout.stored_sop_uids(study, series)) == count


def test_get_stores_on_the_same_association(pacs, a_series, tmp_path):
    study, series, count = a_series
    layout = StorageLayout(tmp_path)
    with PacsClient(replace(pacs.config, retrieve_method="c-get")) as client:
        report = client.retrieve("SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": series},
                                 destination_ae="unused", layout=layout)
    assert (report.completed, report.failed) == (count, 0)
    assert len(layout.stored_sop_uids(study, series)) == count


def test_unknown_move_destination_is_refused(pacs, a_series):
    # Orthanc 1.10 answers a bare 0xC000 (not 0xA801): the pipeline turns repeated refusals into a
    # configuration error (tests/core/test_pipeline.py).
    study, _, _ = a_series
    with PacsClient(pacs.config) as client, pytest.raises(PacsItemError) as error:
        client.move("STUDY", {"StudyInstanceUID": study}, "NOBODY")
    assert error.value.status == 0xC000


def test_unknown_called_ae_is_a_configuration_error(pacs):
    with PacsClient(replace(pacs.config, called_ae="NOT_ORTHANC")) as client, \
            pytest.raises(PacsConfigurationError, match="called AE"):
        client.echo()


def test_no_pacs_listening_is_transient():
    with PacsClient(replace_port(free_port())) as client, pytest.raises(PacsTransientError):
        client.echo()


def replace_port(port: int):
    from pacsflow.core.dicom.config import PacsConfig

    return PacsConfig(host="127.0.0.1", port=port, called_ae="ANY", acse_timeout=2, network_timeout=2)


@pytest.mark.parametrize("keys", [{}, {"StudyInstanceUID": ""}, {"StudyInstanceUID": "1.2.*"},
                                  {"StudyInstanceUID": "../../etc"}])
def test_a_retrieve_that_could_match_the_whole_archive_is_refused(pacs, keys):
    with PacsClient(pacs.config) as client, pytest.raises(ValueError, match="exact UIDs"):
        client.move("STUDY", keys, RECEIVER_AE)


def test_success_with_zero_sub_operations_is_flagged(receiver_ports, tmp_path):
    # qrscp answers success with no sub-operations for a UID it does not hold (Orthanc answers 0xC000).
    port = receiver_ports[RECEIVER_AE]
    with qrscp(tmp_path / "qrscp", move_destinations={RECEIVER_AE: ("127.0.0.1", port)}) as sandbox, \
            StoreReceiver(ReceiverConfig(port=port), StorageLayout(tmp_path / "received")), \
            PacsClient(sandbox.config) as client:
        report = client.move("STUDY", {"StudyInstanceUID": "1.2.3.4.5.6.7.8.9"}, RECEIVER_AE)
    assert (report.status, report.completed) == (0x0000, 0) and report.suspicious


def test_a_destination_that_refuses_the_pacs_gets_nothing(pacs, receiver_ports, a_series, tmp_path):
    study, series, _ = a_series
    refusing = ReceiverConfig(ae_title=UNWELCOMING_AE, port=receiver_ports[UNWELCOMING_AE],
                              allowed_calling_aes=("SOMEONE_ELSE",))
    with StoreReceiver(refusing, StorageLayout(tmp_path)) as receiver, PacsClient(pacs.config) as client, \
            pytest.raises(PacsItemError) as error:
        client.move("SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": series}, UNWELCOMING_AE)
    assert error.value.status == 0xC000  # Orthanc 1.10's answer when its sub-association is rejected
    assert receiver.stats.stored == 0 and not list(tmp_path.rglob("*.dcm"))
