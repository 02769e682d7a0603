"""Validation of the identifiers that travel between RIS, PACS and disk.

Incoming UIDs become path components and ANs become query keys: both are checked here, once, before use.
"""

from __future__ import annotations

import re
from typing import TypeGuard

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
UID_MAX_LENGTH = 64
AN_MAX_LENGTH = 16
# DICOM wildcard characters (*, ?) and the multi-value delimiter (\) would turn an exact key into a pattern.
_AN_FORBIDDEN = frozenset("*?\\")


class InvalidIdentifierError(ValueError):
    """An identifier failed validation. The message never contains the identifier itself."""


def is_valid_uid(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and len(value) <= UID_MAX_LENGTH and _UID.fullmatch(value) is not None


def require_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` if it is a well-formed DICOM UID, else raise (safe to use as a path component)."""
    if not is_valid_uid(value):
        raise InvalidIdentifierError(f"{what} is not a valid DICOM UID (digits and dots, at most 64 characters)")
    return value


def accession_problem(value: object) -> str | None:
    """Why ``value`` cannot be used as an exact Accession Number key, or None if it can."""
    if not isinstance(value, str):
        return "not a string"
    stripped = value.strip()
    if not stripped:
        return "empty"
    if len(stripped) > AN_MAX_LENGTH:
        return f"longer than {AN_MAX_LENGTH} characters"
    if any(ch in _AN_FORBIDDEN for ch in stripped):
        return "contains a DICOM wildcard or delimiter (*, ?, \\)"
    if any(ord(ch) < 0x20 for ch in stripped):
        return "contains control characters"
    return None
