"""Association settings shared by the client and the receiver: latency, TLS contexts, quiet pynetdicom, where
received data sets stream to; and what both receivers do with an accepted socket before any association exists
(the deadline for the A-ASSOCIATE-RQ and the TLS handshake, the bound on PDU lengths)."""

from __future__ import annotations

import logging
import select
import socket
import ssl
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from pynetdicom import _config, dimse_messages
from pynetdicom.association import Association

from pacsflow.core.dicom.config import TlsConfig
from pacsflow.core.storage import SUFFIX, TEMP_PREFIX

# Query identifiers hold patient data: pynetdicom must not log them, whatever the root logger level.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

_serve_request = Association._serve_request


def _serve_request_or_hand_back(assoc: Any, msg: Any, context_id: int) -> None:
    """pynetdicom 3.0.4's reactor can pass its pause checkpoint just before ``send_c_find`` (or another send)
    clears it, and then takes the peer's response off the DIMSE queue and drops it as "unexpected"
    (pynetdicom#875): a pending C-FIND match lost, an existing AN reported "not found". On an association we
    requested, a message that is not a request belongs to the waiting ``send_*`` call: put it back, in front."""
    if not (assoc.is_requestor and not msg.is_valid_request):
        _serve_request(assoc, msg, context_id)
        return
    waiting = assoc.dimse.msg_queue
    with waiting.mutex:
        waiting.queue.appendleft((context_id, msg))
        waiting.unfinished_tasks += 1
        waiting.not_empty.notify()


Association._serve_request = _serve_request_or_hand_back  # type: ignore[method-assign]


# Streaming receive: pynetdicom writes each incoming C-STORE data set to a file as its PDUs arrive (memory stays
# flat whatever the size of an object), by default in the system temp directory. pacsflow's associations
# stream into their layout's root instead: same file system as the final path (the handler's rename is atomic),
# swept with the layout's temp files, and no patient data outside the root.
_config.STORE_RECV_CHUNKED_DATASET = True
_STREAM_ROOTS: weakref.WeakKeyDictionary[Any, Path] = weakref.WeakKeyDictionary()
_STREAMS: weakref.WeakValueDictionary[str, _StreamedDataSet] = weakref.WeakValueDictionary()
_RECEIVING: weakref.WeakKeyDictionary[Any, _StreamedDataSet] = weakref.WeakKeyDictionary()  # latest per assoc


def stream_to(assoc: Any, root: Path) -> None:
    """Stream the C-STORE data sets that arrive on ``assoc`` into temp files in ``root`` (which must exist)."""
    _STREAM_ROOTS[assoc] = root


def discard_unfinished_stream(assoc: Any) -> None:
    """Remove the data set ``assoc`` was receiving when it ended (a peer abort mid-instance): a partial file,
    patient data, must not wait for the next sweep. Call it when the connection closes."""
    stream = _RECEIVING.pop(assoc, None)
    if stream is not None and not stream.closed and not stream.claimed:
        stream.close()
        Path(stream.name).unlink(missing_ok=True)


def claim_stream(path: Path) -> OSError | None:
    """The C-STORE handler takes the data set streamed to ``path``: complete, it is no longer removed if the
    connection closes while the handler works on it. Returns the error that cut its writing short (a full
    disk), if any."""
    stream = _STREAMS.get(str(path))
    if stream is None:
        return None
    stream.claimed = True
    return stream.error


class _StreamedDataSet:
    """The file pynetdicom streams one data set into (it writes, calls ``.file.flush()``, closes, unlinks by
    ``.name``). A write error is kept for the C-STORE handler, which answers it with a failure status: raised
    here, it would escape into the DUL thread and abort the whole association."""

    def __init__(self, root: Path) -> None:
        self._handle = tempfile.NamedTemporaryFile(mode="wb", dir=root, prefix=TEMP_PREFIX, suffix=SUFFIX, delete=False)
        self.name = self._handle.name
        self.file = self
        self.error: OSError | None = None
        self.claimed = False  # by the C-STORE handler: the data set is complete
        _STREAMS[self.name] = self

    @property
    def closed(self) -> bool:
        return bool(self._handle.closed)

    def write(self, data: bytes) -> int:
        if self.error is None:
            self._keep_error(self._handle.write, data)
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            self._keep_error(self._handle.flush)

    def close(self) -> None:
        self._keep_error(self._handle.close)

    def _keep_error(self, operation: Any, *args: Any) -> None:
        try:
            operation(*args)
        except OSError as error:
            self.error = self.error or error


def _streamed_data_set_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's ``NamedTemporaryFile`` for a data set being received, called on the association's DUL thread."""
    assoc = getattr(threading.current_thread(), "assoc", None)
    root = _STREAM_ROOTS.get(assoc)
    if root is None:  # not one of pacsflow's associations: pynetdicom's own behaviour
        return tempfile.NamedTemporaryFile(*args, **kwargs)
    stream = _RECEIVING[assoc] = _StreamedDataSet(root)
    return stream


dimse_messages.NamedTemporaryFile = _streamed_data_set_file  # type: ignore[attr-defined]


# pynetdicom's DUL thread sleeps 1 ms each time it finds nothing to do, which adds up to ~2 ms to every
# request/response round trip; with 0.5 ms, C-FIND on one association went from 410 to 630 per second here.
DUL_IDLE_SLEEP_SECONDS = 0.0005


def tune_for_latency(assoc: Any) -> None:
    """Disable Nagle on an association socket (small DIMSE messages otherwise wait for ACKs) and shorten the
    DUL thread's idle sleep."""
    assoc.dul._run_loop_delay = DUL_IDLE_SLEEP_SECONDS
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def client_tls(tls: TlsConfig | None, host: str) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for an association to ``host``: the server is verified against ``ca_file``."""
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    context.check_hostname = tls.check_hostname
    if tls.cert_file:  # mutual TLS: the PACS may want to see who we are
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context, host


def server_tls(tls: TlsConfig | None) -> ssl.SSLContext | None:
    """The receiver's context: presents ``cert_file`` and accepts only peers with a certificate from ``ca_file``."""
    if tls is None:
        return None
    if not tls.cert_file:
        raise ValueError("a TLS receiver needs cert_file (and key_file)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca_file)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


# -- what a receiver does with an accepted socket before any association exists ------------------------------
ASSOCIATE_RQ = 0x01
ASSOCIATE_RQ_HEAD = 74  # PDU header, protocol version, reserved, called and calling AE titles
MAX_ASSOCIATE_RQ = 1024 * 1024  # far above any real request (128 contexts with every transfer syntax: ~130 KB)
_PEEK_WINDOW = 64 * 1024  # how much of the request is waited for before the hand-over (fits any socket buffer)


class RefusedConnection(Exception):
    """The peer did not present an A-ASSOCIATE-RQ in time, or presented something else; close without a word."""


def await_associate_rq(connection: socket.socket, deadline: float) -> bytes:
    """The head of the peer's A-ASSOCIATE-RQ, left unread, once it has arrived (up to 64 KiB of it): a peer
    that trickles bytes or stays silent is dropped at ``deadline`` and never holds an association slot."""
    wanted = 6
    data = b""
    while True:
        data = _peek(connection, wanted, deadline)
        if len(data) >= 6:
            if data[0] != ASSOCIATE_RQ:
                raise RefusedConnection("the first PDU is not an A-ASSOCIATE-RQ")
            length = int.from_bytes(data[2:6], "big")
            if length > MAX_ASSOCIATE_RQ:
                raise RefusedConnection("A-ASSOCIATE-RQ longer than any real one")
            wanted = min(6 + length, _PEEK_WINDOW)
            if len(data) >= wanted:
                return data
        time.sleep(0.005)  # a partial request: the rest is on its way


def _peek(connection: socket.socket, size: int, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise RefusedConnection("no A-ASSOCIATE-RQ in time")
    connection.settimeout(remaining)
    try:
        data = connection.recv(size, socket.MSG_PEEK)
    except TimeoutError as error:
        raise RefusedConnection("no A-ASSOCIATE-RQ in time") from error
    except OSError as error:
        raise RefusedConnection("connection failed") from error
    if not data:
        raise RefusedConnection("closed before an A-ASSOCIATE-RQ")
    return data


def tls_handshake(connection: socket.socket, context: ssl.SSLContext, deadline: float) -> ssl.SSLSocket:
    """The server side of a TLS handshake, finished by ``deadline`` or abandoned (a peer that never sends its
    ClientHello costs one thread until then, never the accept loop)."""
    tls = context.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
    tls.setblocking(False)
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                _wait(tls, deadline, read=True)
            except ssl.SSLWantWriteError:
                _wait(tls, deadline, read=False)
            except (ssl.SSLError, OSError) as error:
                raise RefusedConnection("TLS handshake failed") from error
        _wait_for_data(tls, deadline)
    except BaseException:
        tls.close()
        raise
    tls.setblocking(True)
    return tls


def _wait(connection: socket.socket, deadline: float, *, read: bool) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise RefusedConnection("TLS handshake not finished in time")
    readable, writable, _ = select.select([connection] if read else [], [] if read else [connection], [], remaining)
    if not (readable or writable):
        raise RefusedConnection("TLS handshake not finished in time")


def _wait_for_data(tls: ssl.SSLSocket, deadline: float) -> None:
    """After the handshake: wait for the first application bytes (an encrypted request cannot be peeked)."""
    if tls.pending():
        return
    _wait(tls, deadline, read=True)


def bound_pdu_reads(assoc: Any, max_pdu_length: int) -> None:
    """End ``assoc`` (as a closed connection) when the peer announces a PDU longer than ``max_pdu_length``:
    pynetdicom reads each PDU whole into memory, whatever length the peer writes in its header."""
    sock = assoc.dul.socket
    receive = sock.recv

    def bounded_receive(nr_bytes: int) -> Any:
        if nr_bytes > max_pdu_length:
            raise OSError("PDU longer than the receiver's maximum")
        return receive(nr_bytes)

    sock.recv = bounded_receive
