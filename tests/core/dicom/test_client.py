"""The PACS client against a real Orthanc and pynetdicom's qrscp: queries, retrievals, each failure they produce."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest
from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import PacsConfig, ReceiverConfig
from pacsflow.core.dicom.errors import Action, PacsConfigurationError, PacsItemError, PacsTransientError
from pacsflow.core.dicom.receiver import StoreReceiver
from pacsflow.core.storage import StorageLayout
from pacsflow.demo.sandbox import orthanc
from pydicom import dcmread
from pynetdicom.dimse_primitives import C_FIND

from tests.core.dicom.conftest import RECEIVER_AE, UNWELCOMING_AE
from tests.helpers import fits_latin1, free_port


def test_echo_and_one_association_for_many_queries(pacs):
    with PacsClient(pacs.config) as client:
        client.echo()
        first = client._association()
        for _ in range(20):
            client.find("STUDY", {"StudyInstanceUID": ""})
        assert client._association() is first


def test_the_reactor_leaves_responses_to_the_waiting_request(pacs):
    """pynetdicom#875: the association's reactor thread could take a C-FIND response meant for ``send_c_find``
    (a race no peer can be made to produce on demand, so the reactor's step is played here by hand: its
    non-blocking ``get_msg``), and the marker of an ended association, which then waited for its DIMSE timeout."""
    with PacsClient(pacs.config) as client:
        client.echo()
        assoc = client._association()
        response = C_FIND()
        response.MessageIDBeingRespondedTo, response.Status = 7, 0xFF00
        for waiting in [(1, response), (None, None)]:
            assoc.dimse.msg_queue.put(waiting)
            assert assoc.dimse.get_msg(block=False) == (None, None)  # the reactor's call takes nothing
            assert assoc.dimse.get_msg(block=True) == waiting  # the waiting request's call gets it
        assert len(client.find("STUDY", {"StudyInstanceUID": ""}).matches) > 0  # and the association still works


def test_study_series_and_image_levels_agree_with_the_files(pacs, files, a_series):
    study, series, count = a_series
    with PacsClient(pacs.config) as client:
        studies = client.find("STUDY", {"StudyInstanceUID": study, "AccessionNumber": "", "PatientID": ""})
        listed = client.find(
            "SERIES",
            {"StudyInstanceUID": study, "SeriesInstanceUID": "", "Modality": "", "NumberOfSeriesRelatedInstances": ""},
        )
        images = client.find("IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": ""})
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
    with (
        StoreReceiver(
            ReceiverConfig(port=receiver_ports[RECEIVER_AE], allowed_calling_aes=("ORTHANC",)), layout
        ) as receiver,
        PacsClient(pacs.config) as client,
    ):
        report = client.move("SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": series}, RECEIVER_AE)
    assert (report.status, report.completed, report.failed, report.suspicious) == (0, count, 0, False)
    assert receiver.stats.stored == count and receiver.stats.rejected == 0
    assert len(layout.stored_sop_uids(study, series)) == count


def test_get_stores_on_the_same_association(pacs, a_series, tmp_path):
    study, series, count = a_series
    layout = StorageLayout(tmp_path)
    with PacsClient(replace(pacs.config, retrieve_method="c-get")) as client:
        report = client.retrieve(
            "SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": series}, destination_ae="unused", layout=layout
        )
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
    # Orthanc accepts associations in one thread and gives a silent peer DicomScpTimeout (30 s) first: a stray
    # connection to its port must not turn the rejection under test into this client's own ACSE timeout.
    with (
        PacsClient(replace(pacs.config, called_ae="NOT_ORTHANC", acse_timeout=45)) as client,
        pytest.raises(PacsConfigurationError, match="called AE"),
    ):
        client.echo()


def test_no_pacs_listening_is_transient():
    with PacsClient(replace_port(free_port())) as client, pytest.raises(PacsTransientError) as error:
        client.echo()
    assert "cannot connect to the PACS" in str(error.value)  # a refused connection is not blamed on a timeout


def test_a_pacs_that_never_answers_the_association_request_names_acse_timeout():
    """A peer that accepts the connection and stays silent: the message names the setting to raise and where."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        config = PacsConfig(host="127.0.0.1", port=silent.getsockname()[1], called_ae="ANY", acse_timeout=1)
        with PacsClient(config) as client, pytest.raises(PacsTransientError) as error:
            client.echo()
    assert "acse_timeout (1 s)" in str(error.value)
    assert "raise acse_timeout in the dicom connection's extra" in str(error.value)


def replace_port(port: int):
    from pacsflow.core.dicom.config import PacsConfig

    return PacsConfig(host="127.0.0.1", port=port, called_ae="ANY", acse_timeout=2, network_timeout=2)


@pytest.mark.parametrize(
    "keys", [{}, {"StudyInstanceUID": ""}, {"StudyInstanceUID": "1.2.*"}, {"StudyInstanceUID": "../../etc"}]
)
def test_a_retrieve_that_could_match_the_whole_archive_is_refused(pacs, keys):
    with PacsClient(pacs.config) as client, pytest.raises(ValueError, match="exact UIDs"):
        client.move("STUDY", keys, RECEIVER_AE)


def test_a_study_orthanc_does_not_hold_is_unable_to_process(pacs):
    # Orthanc 1.10 answers 0xC000 here; qrscp answers success with zero sub-operations (test below).
    with PacsClient(pacs.config) as client, pytest.raises(PacsItemError) as error:
        client.move("STUDY", {"StudyInstanceUID": "1.2.3.4.5.6.7.8.9"}, RECEIVER_AE)
    assert error.value.status == 0xC000


def test_a_destination_that_refuses_the_pacs_gets_nothing(pacs, receiver_ports, a_series, tmp_path):
    study, series, _ = a_series
    refusing = ReceiverConfig(
        ae_title=UNWELCOMING_AE, port=receiver_ports[UNWELCOMING_AE], allowed_calling_aes=("SOMEONE_ELSE",)
    )
    with (
        StoreReceiver(refusing, StorageLayout(tmp_path)) as receiver,
        PacsClient(pacs.config) as client,
        pytest.raises(PacsItemError) as error,
    ):
        client.move("SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": series}, UNWELCOMING_AE)
    assert error.value.status == 0xC000  # Orthanc 1.10's answer when its sub-association is rejected
    assert receiver.stats.stored == 0 and not list(tmp_path.rglob("*.dcm"))


@pytest.mark.orthanc
def test_orthanc_stopping_at_its_result_limit_is_capped_not_complete(files, tmp_path):
    with (
        orthanc(tmp_path / "orthanc", move_destinations={}, result_cap=3) as limited,
        PacsClient(replace(limited.config, result_cap=None)) as client,
    ):
        limited.load(files)
        result = client.find("STUDY", {"StudyInstanceUID": ""})
    # Orthanc answers 0xFE00 (matching terminated) after its limit: the matches are kept, flagged capped.
    assert (len(result.matches), result.status, result.capped) == (3, 0xFE00, True)


@pytest.mark.orthanc
def test_latin1_answers_are_decoded(files, headers, tmp_path):
    """Orthanc configured for Latin-1 answers in ISO_IR 100 whatever we ask."""
    expected = {h.PatientID: str(h.PatientName) for h in headers}
    with (
        orthanc(tmp_path / "orthanc", move_destinations={}, default_encoding="Latin1") as latin1,
        PacsClient(latin1.config) as client,
    ):
        latin1.load(files)
        found = client.find("STUDY", {"PatientID": "", "PatientName": "", "StudyInstanceUID": ""}).matches
    representable = {pid: name for pid, name in expected.items() if fits_latin1(name)}
    assert any(not name.isascii() for name in representable.values())
    assert {m["PatientID"]: m["PatientName"] for m in found if m["PatientID"] in representable} == representable


def test_values_come_back_as_plain_python(pacs, a_series):
    study, series, count = a_series
    with PacsClient(pacs.config) as client:
        [match] = client.find(
            "SERIES",
            {
                "StudyInstanceUID": study,
                "SeriesInstanceUID": series,
                "NumberOfSeriesRelatedInstances": "",
                "SeriesNumber": "",
                "ModalitiesInStudy": "",
                "SeriesDescription": "",
                "BodyPartExamined": "",
            },
        ).matches
    assert type(match["NumberOfSeriesRelatedInstances"]) is int and type(match["SeriesNumber"]) is int
    assert type(match["SeriesInstanceUID"]) is str and match["NumberOfSeriesRelatedInstances"] == count


def test_get_on_a_move_client_renegotiates_storage_roles(pacs, a_series, tmp_path):
    study, series, count = a_series
    layout = StorageLayout(tmp_path)
    with PacsClient(pacs.config) as client:  # retrieve_method c-move: no storage roles at first
        client.find("STUDY", {"StudyInstanceUID": study})
        report = client.get("SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": series}, layout)
        assert client.find("STUDY", {"StudyInstanceUID": study}).matches  # the new association serves queries
    assert (report.completed, report.failed, client.get_stats.stored) == (count, 0, count)
    assert len(layout.stored_sop_uids(study, series)) == count


# -- pynetdicom qrscp: a second, independent implementation ------------------------------------------


def test_qrscp_levels_agree_with_the_files(qr_pacs, headers, a_series):
    study, series, _ = a_series
    with PacsClient(qr_pacs.config) as client:
        studies = client.find("STUDY", {"StudyInstanceUID": "", "AccessionNumber": ""}).matches
        listed = client.find("SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": ""}).matches
        images = client.find(
            "IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": ""}
        ).matches
    # qrscp answers once per instance at study and series level: compare sets.
    assert {m["StudyInstanceUID"] for m in studies} == {h.StudyInstanceUID for h in headers}
    assert {m["SeriesInstanceUID"] for m in listed} == {
        h.SeriesInstanceUID for h in headers if h.StudyInstanceUID == study
    }
    assert {m["SOPInstanceUID"] for m in images} == {h.SOPInstanceUID for h in headers if h.SeriesInstanceUID == series}


def test_qrscp_latin1_names_are_decoded(qr_pacs, headers):
    # qrscp sends no SpecificCharacterSet: Latin-1 names survive (pydicom's default), UTF-8-only ones do not.
    expected = {h.PatientID: str(h.PatientName) for h in headers if fits_latin1(str(h.PatientName))}
    with PacsClient(qr_pacs.config) as client:
        found = client.find("STUDY", {"PatientID": "", "PatientName": ""}).matches
    assert {m["PatientID"]: m["PatientName"] for m in found if m["PatientID"] in expected} == expected


def test_qrscp_move_and_get_land_every_instance(qr_pacs, receiver_ports, a_series, tmp_path):
    study, series, count = a_series
    keys = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
    moved, got = StorageLayout(tmp_path / "moved"), StorageLayout(tmp_path / "got")
    with (
        StoreReceiver(ReceiverConfig(port=receiver_ports[RECEIVER_AE]), moved) as receiver,
        PacsClient(qr_pacs.config) as client,
    ):
        move = client.move("SERIES", keys, RECEIVER_AE)
        get = client.get("SERIES", keys, got)
    assert (move.status, move.completed, move.failed, receiver.stats.stored) == (0, count, 0, count)
    assert (get.status, get.completed, get.failed) == (0, count, 0)
    assert len(moved.stored_sop_uids(study, series)) == len(got.stored_sop_uids(study, series)) == count


def test_qrscp_unknown_move_destination_is_a_configuration_error(qr_pacs, a_series):
    with PacsClient(qr_pacs.config) as client, pytest.raises(PacsConfigurationError) as error:
        client.move("STUDY", {"StudyInstanceUID": a_series[0]}, "NOBODY")
    assert error.value.status == 0xA801 and error.value.action is Action.FIX_CONFIGURATION
    assert "register pacsflow's receiver AE title, host and port" in str(error.value)


def test_success_with_zero_sub_operations_is_flagged(qr_pacs, receiver_ports, tmp_path):
    # qrscp answers success with no sub-operations for a UID it does not hold (Orthanc answers 0xC000).
    with (
        StoreReceiver(ReceiverConfig(port=receiver_ports[RECEIVER_AE]), StorageLayout(tmp_path)),
        PacsClient(qr_pacs.config) as client,
    ):
        report = client.move("STUDY", {"StudyInstanceUID": "1.2.3.4.5.6.7.8.9"}, RECEIVER_AE)
    assert (report.status, report.completed, report.failed) == (0x0000, 0, 0) and report.suspicious
