"""The fault proxy does what the fault suites rely on, measured against a plain echo server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.faults.proxy import Fault, FaultProxy


@pytest.fixture()
def echo() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def _echo(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass


def exchange(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """What came back before the peer closed; a reset (even while connecting: a refused connection is reset
    right after the accept, which can race the handshake) ends the exchange like a close."""
    received = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while data := sock.recv(65536):
                received += data
    except OSError:
        pass
    return received


def test_a_clean_proxy_passes_everything(echo):
    with FaultProxy(target=("127.0.0.1", echo)) as proxy:
        assert exchange(proxy.port, b"x" * 200_000) == b"x" * 200_000


def test_a_cut_ends_the_connection_after_that_many_bytes_on_every_second_connection(echo):
    with FaultProxy(target=("127.0.0.1", echo), fault=Fault(cut_after=1000, every=2)) as proxy:
        results = [len(exchange(proxy.port, b"y" * 50_000)) for _ in range(4)]
    assert results[0] == results[2] == 50_000
    assert results[1] < 1000 and results[3] < 1000  # the echo back counts against the same budget


def test_a_stall_delays_the_rest(echo):
    with FaultProxy(target=("127.0.0.1", echo), fault=Fault(stall_after=10, stall_seconds=0.5)) as proxy:
        started = time.monotonic()
        assert exchange(proxy.port, b"z" * 100) == b"z" * 100
    assert time.monotonic() - started >= 0.5


def test_a_refused_connection_gets_nothing_and_only_so_many_times(echo):
    with FaultProxy(target=("127.0.0.1", echo), fault=Fault(refuse=True, times=1)) as proxy:
        assert exchange(proxy.port, b"q") == b""
        assert exchange(proxy.port, b"q") == b"q"
