"""Every status class the client can meet. Real PACS cannot be made to answer these on demand, so a
scripted pynetdicom SCP (a real peer on a real socket, with handlers returning chosen statuses) does."""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from pacsflow.core.dicom import client as client_module
from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import PacsConfig, ReceiverConfig
from pacsflow.core.dicom.errors import Action, PacsConfigurationError, PacsItemError, PacsTransientError
from pacsflow.core.dicom.receiver import StoreReceiver
from pacsflow.core.dicom.status import (
    StatusClass,
    association_lost,
    classify,
    error_for,
    find_stopped_early,
    rejection_error,
)
from pacsflow.core.storage import StorageLayout
from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from tests.helpers import free_port

SCRIPTED_AE = "SCRIPTED"


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (0x0000, StatusClass.SUCCESS),
        (0xFF00, StatusClass.PENDING),
        (0xFF01, StatusClass.PENDING),
        (0xB000, StatusClass.WARNING),
        (0xB007, StatusClass.WARNING),
        (0xFE00, StatusClass.CANCELLED),
        (0xA700, StatusClass.OUT_OF_RESOURCES),
        (0xA702, StatusClass.OUT_OF_RESOURCES),
        (0xA801, StatusClass.MOVE_DESTINATION_UNKNOWN),
        (0xA900, StatusClass.IDENTIFIER_MISMATCH),
        (0xC000, StatusClass.UNABLE_TO_PROCESS),
        (0xCFFF, StatusClass.UNABLE_TO_PROCESS),
        (0x0122, StatusClass.REFUSED),
        (0x0107, StatusClass.WARNING),  # pynetdicom's category: attribute list error
        (0x0116, StatusClass.WARNING),  # attribute value out of range
        (0x0001, StatusClass.WARNING),
    ],
)
def test_status_classes(status, expected):
    assert classify(status) is expected


@pytest.mark.parametrize(
    ("status", "error", "action"),
    [
        (0xA700, PacsTransientError, Action.RETRY_LATER),
        (0xFE00, PacsTransientError, Action.RETRY_LATER),
        (0xA801, PacsConfigurationError, Action.FIX_CONFIGURATION),
        (0x0122, PacsConfigurationError, Action.FIX_CONFIGURATION),
        (0xA900, PacsItemError, Action.GIVE_UP_ITEM),
        (0xC123, PacsItemError, Action.GIVE_UP_ITEM),
    ],
)
def test_each_failure_says_what_to_do(status, error, action):
    failure = error_for(status, "C-FIND")
    assert isinstance(failure, error) and failure.action is action
    assert f"0x{status:04X}" in str(failure) and str(action) in str(failure)


def test_association_loss_is_transient_and_a_timeout_names_its_settings():
    assert isinstance(
        association_lost("C-MOVE", peer_aborted=True, dimse_timeout=300, network_timeout=300), PacsTransientError
    )
    message = str(association_lost("C-FIND", peer_aborted=False, dimse_timeout=2.5, network_timeout=300))
    assert "dimse_timeout (2.5 s)" in message and "network_timeout (300 s)" in message
    assert "dicom connection's extra" in message


def test_a_cancelled_find_is_a_capped_answer_not_a_failure():
    assert find_stopped_early(0xFE00) and not find_stopped_early(0x0000) and not find_stopped_early(0xA700)


def test_rejections_tell_busy_from_misconfigured():
    assert isinstance(rejection_error(0x02, 0x03, 0x02), PacsTransientError)
    assert isinstance(rejection_error(0x01, 0x03, 0x01), PacsTransientError)  # congestion, even if "permanent"
    assert isinstance(rejection_error(0x01, 0x01, 0x03), PacsConfigurationError)
    assert "called AE" in str(rejection_error(0x01, 0x01, 0x07))


@contextmanager
def scripted_pacs(find: Callable | None = None, move: Callable | None = None) -> Iterator[PacsConfig]:
    ae = AE(ae_title=SCRIPTED_AE)
    ae.add_supported_context(Verification)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
    ae.add_requested_context(CTImageStorage)  # for the C-MOVE sub-association
    handlers = [
        (evt.EVT_C_FIND, find or (lambda event: iter([(0x0000, None)]))),
        (evt.EVT_C_MOVE, move or (lambda event: iter([(None, None)]))),
    ]
    port = free_port()
    server = ae.make_server(("127.0.0.1", port), evt_handlers=handlers)
    ae._servers.append(server)  # as AE.start_server does
    # socketserver's default poll of 0.5 s would be paid at every shutdown
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield PacsConfig(host="127.0.0.1", port=port, called_ae=SCRIPTED_AE, dimse_timeout=1, acse_timeout=5)
    finally:
        server.shutdown()


def answering(*statuses: int) -> Callable:
    def handler(event):
        for status in statuses:
            match = Dataset()
            match.StudyInstanceUID = "1.2.3"
            yield status, match if status in (0xFF00, 0xFF01) else None

    return handler


@pytest.mark.parametrize(
    ("final", "error"),
    [
        (0xA700, PacsTransientError),
        (0xA702, PacsTransientError),
        (0xA900, PacsItemError),
        (0xC001, PacsItemError),
        (0x0122, PacsConfigurationError),
    ],
)
def test_find_failure_statuses_raise_their_class(final, error):
    with (
        scripted_pacs(find=answering(0xFF00, final)) as config,
        PacsClient(config) as client,
        pytest.raises(error) as raised,
    ):
        client.find("STUDY", {"StudyInstanceUID": ""})
    assert raised.value.status == final


def test_find_warning_keeps_the_matches():
    with scripted_pacs(find=answering(0xFF00, 0xFF01, 0xB000)) as config, PacsClient(config) as client:
        result = client.find("STUDY", {"StudyInstanceUID": ""})
    assert len(result.matches) == 2 and result.status == 0xB000


def test_find_terminated_by_the_pacs_keeps_the_matches_and_says_capped():
    # We never send C-CANCEL: 0xFE00 means the PACS stopped matching (Orthanc at LimitFindResults).
    with scripted_pacs(find=answering(0xFF00, 0xFF00, 0xFE00)) as config, PacsClient(config) as client:
        result = client.find("STUDY", {"StudyInstanceUID": ""})
    assert (len(result.matches), result.status, result.capped) == (2, 0xFE00, True)


def test_a_malformed_value_in_an_answer_is_not_quoted_in_warnings_or_logs(monkeypatch, caplog):
    """pydicom warns with the value it finds malformed, and Airflow copies warnings into the task log: a PACS
    answering a malformed UID (patient data) must not put it there."""
    malformed = "1.2.840.PATIENT7"
    monkeypatch.setattr(pydicom_config.settings, "reading_validation_mode", pydicom_config.WARN)
    caplog.set_level(logging.DEBUG, logger="pydicom")

    def answers_a_malformed_uid(event):
        match = Dataset()
        match[0x0020000D] = DataElement(0x0020000D, "UI", malformed, validation_mode=pydicom_config.IGNORE)
        yield 0xFF00, match
        yield 0x0000, None

    with (
        scripted_pacs(find=answers_a_malformed_uid) as config,
        PacsClient(config) as client,
        warnings.catch_warnings(record=True) as warned,
    ):
        warnings.simplefilter("always")
        result = client.find("STUDY", {"StudyInstanceUID": ""})
    assert [match["StudyInstanceUID"] for match in result.matches] == [malformed]  # pacsflow still sees it
    said = [str(warning.message) for warning in warned] + [record.getMessage() for record in caplog.records]
    assert not [text for text in said if "PATIENT7" in text]


def test_a_reused_association_the_peer_dropped_is_reopened_once():
    seen = []

    def drops_the_second_request(event):
        seen.append(event.assoc)
        if len(seen) == 2:
            event.assoc.abort()  # e.g. an idle timeout firing just as our request arrives
            return
        yield from answering(0xFF00, 0x0000)(event)

    with scripted_pacs(find=drops_the_second_request) as config, PacsClient(config) as client:
        client.find("STUDY", {"StudyInstanceUID": ""})
        assert len(client.find("STUDY", {"StudyInstanceUID": ""}).matches) == 1
    assert len(seen) == 3 and seen[2] is not seen[0]


def test_an_association_the_pacs_aborts_between_requests_is_reopened():
    """Between requests the reactor of pacsflow's association sleeps (``park_reactor``): an abort that arrives
    meanwhile (a PACS's idle timeout) reaches the next request, which opens a new association and is answered."""
    seen = []

    def answers(event):
        seen.append(event.assoc)
        yield from answering(0xFF00, 0x0000)(event)

    with scripted_pacs(find=answers) as config, PacsClient(config) as client:
        client.find("STUDY", {"StudyInstanceUID": ""})
        ours = client._association()
        seen[0].abort()
        deadline = time.monotonic() + 5
        while ours.dul.is_alive() and time.monotonic() < deadline:  # our DUL has taken the abort
            time.sleep(0.01)
        assert not ours.dul.is_alive()
        assert len(client.find("STUDY", {"StudyInstanceUID": ""}).matches) == 1
    assert len(seen) == 2 and seen[1] is not seen[0]


def test_a_fresh_association_aborted_by_the_peer_is_not_retried():
    seen = []

    def always_aborts(event):
        seen.append(event.assoc)
        event.assoc.abort()
        yield from ()

    with (
        scripted_pacs(find=always_aborts) as config,
        PacsClient(config) as client,
        pytest.raises(PacsTransientError, match="aborted"),
    ):
        client.find("STUDY", {"StudyInstanceUID": ""})
    assert len(seen) == 1


def test_pending_responses_that_stop_coming_time_out_and_the_client_recovers():
    calls = []

    def stalls_once(event):
        calls.append(1)
        yield 0xFF00, answering(0xFF00).__call__(event).__next__()[1]
        if len(calls) == 1:
            time.sleep(3)  # longer than the 1 s DIMSE timeout
        yield 0x0000, None

    with scripted_pacs(find=stalls_once) as config, PacsClient(config) as client:
        with pytest.raises(PacsTransientError, match=r"no response within dimse_timeout \(1 s\)"):
            client.find("STUDY", {"StudyInstanceUID": ""})
        assert len(client.find("STUDY", {"StudyInstanceUID": ""}).matches) == 1  # a new association


def test_move_warning_with_failed_sub_operations_is_reported_with_the_failed_uids(tmp_path):
    receiver = ReceiverConfig(port=free_port())

    def partial_move(event):
        yield receiver.host, receiver.port
        yield 2
        status = Dataset()
        status.Status = 0xB000
        status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations = 1, 1
        status.NumberOfWarningSuboperations = 0
        failed = Dataset()
        failed.FailedSOPInstanceUIDList = "1.2.3.4"
        yield status, failed

    with (
        StoreReceiver(receiver, StorageLayout(tmp_path)),
        scripted_pacs(move=partial_move) as config,
        PacsClient(config) as client,
    ):
        report = client.move("SERIES", {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3"}, receiver.ae_title)
    # pynetdicom's SCP recounts the sub-operations it never ran as failed.
    assert (report.status, report.completed, report.failed, report.failed_sop_uids) == (0xB000, 0, 2, ("1.2.3.4",))
    assert report.suspicious


def test_move_destination_unknown_status_is_a_configuration_error_after_two_more_tries(monkeypatch):
    monkeypatch.setattr(client_module, "UNKNOWN_DESTINATION_PAUSES_SECONDS", (0.0, 0.0))
    asked = []

    def unknown(event):
        asked.append(event.move_destination)
        yield None, None

    with (
        scripted_pacs(move=unknown) as config,
        PacsClient(config) as client,
        pytest.raises(PacsConfigurationError, match="move destination unknown"),
    ):
        client.move("STUDY", {"StudyInstanceUID": "1.2"}, "NOBODY")
    assert len(asked) == 3  # a receiver the PACS could not reach this once gets two more chances
