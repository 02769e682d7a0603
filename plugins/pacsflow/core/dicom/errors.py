"""What a PACS failure means for the caller: retry later, fix the configuration, or give up on the item.

Messages name statuses and counts, never identifiers from the query (they may be patient data).
"""

from __future__ import annotations

from enum import StrEnum


class Action(StrEnum):
    RETRY_LATER = "retry later"
    FIX_CONFIGURATION = "fix configuration"
    GIVE_UP_ITEM = "give up on this item"


class PacsError(Exception):
    """Base of every PACS failure; ``status`` is the DICOM status when there was one."""

    action: Action = Action.GIVE_UP_ITEM

    def __init__(self, message: str, *, status: int | None = None) -> None:
        suffix = f" (status 0x{status:04X})" if status is not None else ""
        super().__init__(f"{message}{suffix}; action: {self.action}")
        self.status = status


class PacsTransientError(PacsError):
    """Busy, out of resources, aborted, timed out: the same request may succeed later."""

    action = Action.RETRY_LATER


class PacsConfigurationError(PacsError):
    """Association rejected for AE title, move destination unknown, SOP class unsupported: fix the setup."""

    action = Action.FIX_CONFIGURATION


class PacsItemError(PacsError):
    """The PACS cannot process this identifier (identifier mismatch, unable to process): record and go on."""

    action = Action.GIVE_UP_ITEM
