"""A loopback TCP proxy that breaks connections on purpose: the network faults no real PACS can be asked for.

    with FaultProxy(target=("127.0.0.1", pacs_port), fault=Fault(cut_after=40_000, every=2)) as proxy:
        ...  # point the peer at ("127.0.0.1", proxy.port)

Faults apply to the bytes flowing from the client side to the target side and back, per connection:
``cut_after`` bytes (either direction) then both sockets are closed abruptly; ``stall_after`` bytes then
``stall_seconds`` of silence; ``first_byte_delay`` before any byte is forwarded; ``refuse`` closes at once.
``every`` applies the fault to every n-th connection (1: all of them), ``times`` to at most that many.
``faulted`` counts the connections chosen for the fault, ``fired`` those on which it actually struck (a cut or a
stall needs its byte count to be reached; a delay or a refusal always strikes).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

CHUNK = 65536
IDLE_SECONDS = 120.0  # a connection silent this long in both directions is closed (bounded tests)


@dataclass(frozen=True)
class Fault:
    cut_after: int | None = None
    stall_after: int | None = None
    stall_seconds: float = 0.0
    first_byte_delay: float = 0.0
    refuse: bool = False
    every: int = 1
    times: int | None = None


class FaultProxy:
    def __init__(self, *, target: tuple[str, int], fault: Fault = Fault(), port: int = 0) -> None:
        """``port`` 0 picks a free one; a fixed port lets a peer configured before the proxy exists reach it."""
        self.target = target
        self.fault = fault
        self.connections = 0
        self.faulted = 0
        self.fired = 0
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            with self._lock:
                self.connections += 1
                faulty = self.connections % self.fault.every == 0 and (
                    self.fault.times is None or self.faulted < self.fault.times
                )
                self.faulted += faulty
            threading.Thread(target=self._serve, args=(client, faulty), daemon=True).start()

    def _serve(self, client: socket.socket, faulty: bool) -> None:
        fault = self.fault if faulty else Fault()
        if fault.refuse or fault.first_byte_delay:
            self._strike()
        if fault.refuse:
            _abort(client)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            _abort(client)
            return
        budget = _Budget(fault, self._strike)
        if fault.first_byte_delay:
            time.sleep(fault.first_byte_delay)
        for sock in (client, upstream):  # before either pump starts: one pump may abort both sockets at once
            sock.settimeout(IDLE_SECONDS)
        pumps = [
            threading.Thread(target=self._pump, args=(a, b, budget, (client, upstream)), daemon=True)
            for a, b in ((client, upstream), (upstream, client))
        ]
        for pump in pumps:
            pump.start()
        for pump in pumps:
            pump.join()

    def _strike(self) -> None:
        with self._lock:
            self.fired += 1

    def _pump(
        self, source: socket.socket, sink: socket.socket, budget: _Budget, both: tuple[socket.socket, socket.socket]
    ) -> None:
        try:
            while not self._stop.is_set():
                data = source.recv(CHUNK)
                if budget.dead:  # the other direction cut the connection while this one waited
                    return
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                allowed, action = budget.take(len(data))
                sink.sendall(data[:allowed])
                if action == "cut":
                    budget.dead = True
                    for sock in both:
                        _abort(sock)
                    return
                if action == "stall":
                    time.sleep(budget.fault.stall_seconds)
                    sink.sendall(data[allowed:])
        except OSError:
            budget.dead = True
            for sock in both:
                _abort(sock)


class _Budget:
    """Bytes forwarded on one connection (both directions), and which fault fires when."""

    def __init__(self, fault: Fault, strike: Callable[[], None]) -> None:
        self.fault = fault
        self._strike = strike
        self.sent = 0
        self.stalled = False
        self.cut = False
        self.dead = False  # set before the sockets are aborted: the other pump must not touch them
        self._lock = threading.Lock()

    def take(self, size: int) -> tuple[int, str | None]:
        with self._lock:
            start = self.sent
            self.sent += size
            if self.fault.cut_after is not None and self.sent >= self.fault.cut_after:
                if not self.cut:  # both directions may reach the limit before the sockets are gone
                    self.cut = True
                    self._strike()
                return max(0, self.fault.cut_after - start), "cut"
            if self.fault.stall_after is not None and not self.stalled and self.sent >= self.fault.stall_after:
                self.stalled = True
                self._strike()
                return max(0, self.fault.stall_after - start), "stall"
            return size, None


def _abort(sock: socket.socket) -> None:
    """Close with a reset, as a cable pulled or a firewall dropping the flow would look to the peer.

    ``close`` alone does not release a socket another thread is blocked reading (that read holds it open, so
    the peer would see nothing until the idle timeout): shutting the read side first wakes that thread, and the
    reset goes out when the last user lets go."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sock.close()
