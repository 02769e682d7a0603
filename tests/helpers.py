"""Helpers shared by the tests (fixtures are in the conftest.py files; real peers in tests/core/dicom/peers.py)."""

from __future__ import annotations

from pacsflow.demo.sandbox import free_port

__all__ = ["CHROMEDRIVER", "CHROMIUM", "CHROMIUM_FLAGS", "fits_latin1", "free_port"]

# Debian's Chromium, headless as root on a machine with no network but loopback: without the background-networking
# flags it keeps opening connections that this machine refuses.
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def fits_latin1(text: str) -> bool:
    """Whether a name survives a PACS that answers in ISO_IR 100."""
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True
