"""What both receivers check before an instance enters the layout, and the status each outcome is answered with.

A received file is filed only when: its data set is not deflated (or was inflated, bounded, because Deflated is
configured), its three UIDs are valid and the SOP Instance UID is the one the C-STORE named, and every element is
there as its declared length says (a file cut short never enters the layout). Then the layout refuses a second
copy with other bytes and the same SOP Instance UID under another study or series.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.dicom.header import HeaderProblem, InstanceUids, complete_file_uids, is_deflated
from pacsflow.core.dicom.inflate import InflateError, inflate_file
from pacsflow.core.dicom.status import (
    CANNOT_UNDERSTAND,
    DUPLICATE_SOP_INSTANCE,
    IDENTIFIER_MISMATCH,
    OUT_OF_RESOURCES,
    SUCCESS,
)
from pacsflow.core.storage import Placement

_PROBLEM_STATUS = {
    HeaderProblem.INVALID_UID: CANNOT_UNDERSTAND,
    HeaderProblem.SOP_INSTANCE_MISMATCH: IDENTIFIER_MISMATCH,
    HeaderProblem.INCOMPLETE: CANNOT_UNDERSTAND,
}
UNDECODABLE = "undecodable dataset"
DEFLATED_REFUSED = "deflated data set (not in transfer_syntaxes)"


@dataclass(frozen=True)
class Verdict:
    """A received file examined: ``uids`` to file it under, or the failure ``status`` and ``reason``."""

    uids: InstanceUids | None
    status: int = SUCCESS
    reason: str = ""

    @classmethod
    def refuse(cls, status: int, reason: str) -> Verdict:
        return cls(None, status, reason)


def examine(path: Path, expected_sop_uid: object, config: ReceiverConfig) -> Verdict:
    """Check a complete received file before it is filed; inflates a deflated one in place (bounded). When
    ``expected_sop_uid`` is None the file meta's MediaStorageSOPInstanceUID (written from the request) is used."""
    with open(path, "rb") as handle:
        head = handle.read(64 * 1024)
    if is_deflated(head):
        if not config.accepts_deflated:
            return Verdict.refuse(CANNOT_UNDERSTAND, DEFLATED_REFUSED)
        try:
            inflate_file(path, config.max_inflated_bytes)
        except InflateError as error:
            return Verdict.refuse(OUT_OF_RESOURCES if error.too_large else CANNOT_UNDERSTAND, error.reason)
    try:
        meta_sop_uid, uids, complete = complete_file_uids(path)
    except Exception:  # an undecodable dataset from the peer
        return Verdict.refuse(CANNOT_UNDERSTAND, UNDECODABLE)
    problem = uids.problem(meta_sop_uid if expected_sop_uid is None else expected_sop_uid)
    if problem is None and not complete:
        problem = HeaderProblem.INCOMPLETE
    if problem is not None:
        return Verdict.refuse(_PROBLEM_STATUS[problem], problem.value)
    return Verdict(uids)


def placement_status(placement: Placement) -> int:
    """The C-STORE status for what the layout did with an examined file."""
    return DUPLICATE_SOP_INSTANCE if placement.refused else SUCCESS
