"""Typed results of PACS operations, shared by the client, the receiver and the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

QueryLevel = Literal["STUDY", "SERIES", "IMAGE"]


@dataclass(frozen=True)
class FindResult:
    """Matches of one C-FIND, each a mapping of DICOM keyword to a plain Python value.

    Values: ``str`` for text and person names (decoded per SpecificCharacterSet), ``int`` for IS/US,
    ``list`` for multi-valued elements, ``None`` for empty. ``capped`` is True when the PACS stopped at its
    result limit, so "no more matches" cannot be concluded.
    """

    matches: list[dict[str, Any]]
    status: int = 0x0000
    capped: bool = False


@dataclass(frozen=True)
class RetrieveReport:
    """Outcome of one C-MOVE or C-GET as the PACS reported it (counts are the final sub-operation counts)."""

    status: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_sop_uids: tuple[str, ...] = field(default=())

    @property
    def suspicious(self) -> bool:
        """Success claimed with nothing transferred or with failures: verify against the disk, do not trust."""
        return self.completed == 0 or self.failed > 0


@dataclass
class ReceiverStats:
    """What the receiver accepted and refused since it started."""

    stored: int = 0
    bytes_stored: int = 0
    rejected: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.rejected += 1
        self.rejected_reasons[reason] = self.rejected_reasons.get(reason, 0) + 1
