"""DICOM status codes and association outcomes, classified into what the caller should do.

Every failure becomes one of the typed errors of ``errors.py``: retry later (busy, out of resources, aborted,
timed out), fix the configuration (unknown AE titles, move destination unknown, unsupported SOP class) or give
up on the item (identifier mismatch, unable to process).
"""

from __future__ import annotations

from enum import StrEnum

from pynetdicom.status import STATUS_CANCEL, STATUS_PENDING, STATUS_SUCCESS, STATUS_WARNING, code_to_category

from pacsflow.core.dicom.errors import PacsConfigurationError, PacsError, PacsItemError, PacsTransientError

# The codes pacsflow answers or acts on by name (pynetdicom has their categories and descriptions, not names).
SUCCESS = 0x0000
CANCEL = 0xFE00
PENDING = (0xFF00, 0xFF01)
DUPLICATE_SOP_INSTANCE = 0x0111
OUT_OF_RESOURCES = 0xA700
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_MISMATCH = 0xA900  # C-STORE: "data set does not match SOP class"; Q/R: "identifier does not match"
CANNOT_UNDERSTAND = 0xC000


class StatusClass(StrEnum):
    SUCCESS = "success"
    PENDING = "pending"
    WARNING = "warning"
    CANCELLED = "cancelled"
    OUT_OF_RESOURCES = "out of resources"
    MOVE_DESTINATION_UNKNOWN = "move destination unknown"
    IDENTIFIER_MISMATCH = "identifier mismatch"
    UNABLE_TO_PROCESS = "unable to process"
    REFUSED = "refused"


_CATEGORIES = {
    STATUS_SUCCESS: StatusClass.SUCCESS,
    STATUS_PENDING: StatusClass.PENDING,
    STATUS_CANCEL: StatusClass.CANCELLED,
    STATUS_WARNING: StatusClass.WARNING,
}


def classify(status: int) -> StatusClass:
    """pynetdicom's category of ``status``; a failure is told apart further by what the caller should do."""
    category = _CATEGORIES.get(code_to_category(status))
    if category is not None:
        return category
    if status == MOVE_DESTINATION_UNKNOWN:
        return StatusClass.MOVE_DESTINATION_UNKNOWN
    if 0xA700 <= status <= 0xA7FF:
        return StatusClass.OUT_OF_RESOURCES
    if 0xA900 <= status <= 0xA9FF:
        return StatusClass.IDENTIFIER_MISMATCH
    if 0xC000 <= status <= 0xCFFF:
        return StatusClass.UNABLE_TO_PROCESS
    return StatusClass.REFUSED


def is_final_ok(status: int) -> bool:
    """A final status after which the answer can be used (success or warning)."""
    return classify(status) in (StatusClass.SUCCESS, StatusClass.WARNING)


def find_stopped_early(status: int) -> bool:
    """A final C-FIND status saying the PACS stopped matching before the end.

    pacsflow never sends C-CANCEL, so a "matching terminated due to cancel" answer comes from the PACS itself:
    Orthanc answers exactly this when it reaches LimitFindResults. The matches received are kept, marked capped.
    """
    return status == CANCEL


def error_for(status: int, operation: str) -> PacsError:
    """The exception for a failure status of ``operation`` (C-FIND, C-MOVE, C-GET), with what to do."""
    kind = classify(status)
    if kind is StatusClass.MOVE_DESTINATION_UNKNOWN:
        return PacsConfigurationError(
            f"{operation}: move destination unknown to the PACS; register pacsflow's receiver AE title, host and "
            "port as a DICOM node on the PACS (or fix receiver_ae in the dicom connection)",
            status=status,
        )
    if kind in (StatusClass.OUT_OF_RESOURCES, StatusClass.CANCELLED):
        return PacsTransientError(f"{operation}: {kind}", status=status)
    if kind in (StatusClass.IDENTIFIER_MISMATCH, StatusClass.UNABLE_TO_PROCESS):
        return PacsItemError(f"{operation}: {kind}", status=status)
    if 0x0100 <= status <= 0x01FF or status == 0x0211:  # SOP class not supported, unrecognised operation
        return PacsConfigurationError(f"{operation}: refused by the PACS (not supported)", status=status)
    return PacsItemError(f"{operation}: {kind}", status=status)


# Where a deployment sets the client's timeouts: the ``dicom`` connection's extra fields of the same names.
_SET_IN = "in the dicom connection's extra"


def association_lost(
    operation: str, *, peer_aborted: bool, dimse_timeout: float, network_timeout: float
) -> PacsTransientError:
    """No (final) response: the peer aborted or closed the connection, or a timeout expired."""
    if peer_aborted:
        return PacsTransientError(f"{operation}: no response, the PACS aborted the association")
    return PacsTransientError(
        f"{operation}: no response within dimse_timeout ({dimse_timeout:g} s) or the connection idle beyond "
        f"network_timeout ({network_timeout:g} s), association aborted; for a PACS that is slow to answer, raise "
        f"dimse_timeout (and network_timeout) {_SET_IN}"
    )


def association_not_established(
    *, connected: bool, aborted: bool, closed: bool, acse_timeout: float
) -> PacsTransientError:
    """No connection, an A-ASSOCIATE-RQ answered by an A-ABORT or a closed connection, or no answer within the
    ACSE timeout."""
    if not connected:
        return PacsTransientError(
            "cannot connect to the PACS (refused or unreachable): check that it is up, and its host and port in the "
            "dicom connection"
        )
    if aborted:
        return PacsTransientError("association aborted by the PACS before it was established")
    if closed:
        return PacsTransientError("the connection to the PACS failed or closed before the association was established")
    return PacsTransientError(
        f"the PACS did not accept the association within acse_timeout ({acse_timeout:g} s); for a PACS that is "
        f"slow to accept, raise acse_timeout {_SET_IN}"
    )


def rejection_error(result: int | None, source: int | None, reason: int | None) -> PacsError:
    """An A-ASSOCIATE-RJ: transient (busy, limits) is retried later; permanent means fix the configuration."""
    detail = f"association rejected (result {result}, source {source}, reason {reason})"
    # result 2 = rejected-transient; source 3 reasons 1/2 = temporary congestion / local limit exceeded.
    if result == 0x02 or (source == 0x03 and reason in (0x01, 0x02)):
        return PacsTransientError(f"{detail}: the PACS is busy or at its association limit")
    if source == 0x01 and reason == 0x03:
        return PacsConfigurationError(f"{detail}: the PACS does not accept our calling AE title")
    if source == 0x01 and reason == 0x07:
        return PacsConfigurationError(f"{detail}: the PACS does not recognise the called AE title")
    return PacsConfigurationError(detail)
