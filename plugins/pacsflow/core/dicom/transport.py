"""Socket-level settings shared by the client and the receiver."""

from __future__ import annotations

import socket
from typing import Any


def set_nodelay(assoc: Any) -> None:
    """Disable Nagle on an association socket (small DIMSE messages otherwise wait for ACKs)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
