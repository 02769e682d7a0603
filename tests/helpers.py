"""Helpers shared by the tests (fixtures are in the conftest.py files; real peers in tests/core/dicom/peers.py)."""

from __future__ import annotations

from pacsflow.demo.sandbox import free_port

__all__ = ["fits_latin1", "free_port"]


def fits_latin1(text: str) -> bool:
    """Whether a name survives a PACS that answers in ISO_IR 100."""
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True
