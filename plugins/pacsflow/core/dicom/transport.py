"""Association settings shared by the client and the receiver: pacsflow's adjustments of pynetdicom (per
application entity and association, never at import), TLS contexts; and what both receivers do with an accepted
socket before any association exists (the deadline for the A-ASSOCIATE-RQ and the TLS handshake, the bound on
PDU lengths).

The adjustments reach into pynetdicom's internals (the DIMSE provider of an association, its DUL thread's idle
delay), verified against pynetdicom 3.0.4 only: ``application_entity`` refuses any other version with a
``ConfigurationError`` naming it, before an association is made.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import tempfile
import time
import weakref
from collections.abc import Callable
from contextlib import suppress
from copy import copy
from pathlib import Path
from typing import TYPE_CHECKING

import pynetdicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dsutils import create_file_meta
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationServer

from pacsflow.core.dicom.config import TlsConfig
from pacsflow.core.errors import ConfigurationError
from pacsflow.core.storage import SUFFIX, TEMP_PREFIX

if TYPE_CHECKING:
    from pynetdicom.dimse import _QueueItem
    from pynetdicom.dul import _PDUPrimitiveType

VERIFIED_PYNETDICOM = "3.0.4"


class PynetdicomVersionError(ConfigurationError):
    """pacsflow's adjustments of pynetdicom were verified against another version than the one installed."""


def require_verified_pynetdicom() -> None:
    version = pynetdicom.__version__
    if version != VERIFIED_PYNETDICOM:
        raise PynetdicomVersionError(
            f"pacsflow's DICOM networking was verified against pynetdicom {VERIFIED_PYNETDICOM}, and adjusts its "
            f"internals; pynetdicom {version} is installed: install pynetdicom=={VERIFIED_PYNETDICOM} "
            "(requirements.txt)"
        )


def application_entity(ae_title: str) -> AE:
    """pynetdicom's AE for pacsflow's associations, once the installed pynetdicom is the verified one. Bind
    ``adjust_association`` to ``EVT_CONN_OPEN`` of each association it makes or accepts."""
    require_verified_pynetdicom()
    withhold_identifiers_from_logs()
    return AE(ae_title=ae_title)


def withhold_identifiers_from_logs() -> None:
    """Query identifiers hold patient data: pynetdicom must not log them, whatever the root logger level.

    Process-wide (pynetdicom 3.0.4 has no per-AE switch; upstream, the ask is one: "Per-AE option not to log
    identifiers", beside ``_config.LOG_*_IDENTIFIERS``): it only ever removes patient data from pynetdicom's log,
    for every AE in the process. Applied when pacsflow makes an AE, never at import.

    pynetdicom's standard handlers (``LOG_HANDLER_LEVEL``) are not bound either: they describe every PDU and
    DIMSE message, SOP Instance UIDs included, to whoever sets pynetdicom's logger below WARNING."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


# pynetdicom's DUL thread sleeps 1 ms each time it finds nothing to do, which adds up to ~2 ms to every
# request/response round trip; with 0.5 ms, C-FIND on one association went from 410 to 630 per second here.
# Upstream: pynetdicom#139 (open) / #120 propose a shorter loop delay; the ask is a documented per-AE setting
# (or an event-driven DUL), https://github.com/pydicom/pynetdicom/pull/139
DUL_IDLE_SLEEP_SECONDS = 0.0005
DUL_MAX_WAIT_SECONDS = 0.05  # how late the DUL thread may notice its timers (ARTIM) while it waits


def adjust_association(assoc: Association) -> None:
    """pacsflow's adjustments of one association, as its connection opens (bind it to ``EVT_CONN_OPEN``: it
    runs before any PDU): its DIMSE provider becomes ``_PacsflowDimse`` (responses stay with the waiting
    request; C-STORE data sets stream to a file once ``stream_to`` names a directory), its DUL thread waits for
    work instead of polling (``_WaitingDul``), and latency is cut."""
    assoc.dimse = _PacsflowDimse(assoc)
    _WaitingDul.adopt(assoc.dul)
    _cut_latency(assoc)


def tune_for_latency(assoc: Association) -> None:
    """Cut the latency of an association made by an AE other than ``application_entity``'s."""
    require_verified_pynetdicom()
    _cut_latency(assoc)


def _cut_latency(assoc: Association) -> None:
    """Disable Nagle on the association socket (small DIMSE messages otherwise wait for ACKs) and shorten the
    DUL thread's idle sleep."""
    assoc.dul._run_loop_delay = DUL_IDLE_SLEEP_SECONDS
    wrapper = assoc.dul.socket
    sock = wrapper.socket if wrapper is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _WaitingDul(DULServiceProvider):
    """pynetdicom 3.0.4's DUL thread, waiting on its socket instead of polling it.

    pynetdicom's DUL loop looks at its socket and queues every ``_run_loop_delay`` (0.5 ms here, for latency):
    about 7% of a core per open association, idle or not, and a task holds one for its whole batch. Here the
    look at the socket (``_is_transport_event``) first waits, up to ``DUL_MAX_WAIT_SECONDS``, until the socket
    has data or another thread hands the DUL work (``send_pdu``, ``kill_dul``, which ring a bell). With nothing to
    wait for (no connection yet, or closing) it looks at once, as pynetdicom does. Adopted by an association's
    running DUL: its class changes, the loop it runs stays pynetdicom's."""

    _bell: socket.socket
    _ringer: socket.socket

    @classmethod
    def adopt(cls, dul: DULServiceProvider) -> None:
        dul._bell, dul._ringer = socket.socketpair()  # type: ignore[attr-defined]  # set before the class change
        for end in (dul._bell, dul._ringer):  # type: ignore[attr-defined]
            end.setblocking(False)
            weakref.finalize(dul, end.close)  # a DUL that ends without closing its connection (an error)
        dul.__class__ = cls

    def send_pdu(self, primitive: _PDUPrimitiveType) -> None:
        super().send_pdu(primitive)
        self._ring()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._ring()

    def _is_transport_event(self) -> bool:
        self._await_work()
        return super()._is_transport_event()

    def _ring(self) -> None:
        with suppress(OSError):  # a full bell has rung already; a closed one has no listener
            self._ringer.send(b"\0")

    def _await_work(self) -> None:
        wrapper = self.socket
        sock = wrapper.socket if wrapper is not None else None
        if sock is None:  # the connection has closed: nothing more to wait for
            self._bell.close()
            self._ringer.close()
            return
        if (
            self.state_machine.current_state == "Sta13"
            or not self.to_provider_queue.empty()
            or not self.event_queue.empty()
            or (isinstance(sock, ssl.SSLSocket) and sock.pending())
        ):
            return
        with suppress(OSError, ValueError):  # a closed socket: pynetdicom's own look reports it
            select.select([sock, self._bell], [], [], DUL_MAX_WAIT_SECONDS)
        with suppress(OSError):
            while self._bell.recv(4096):
                pass


def park_reactor(assoc: Association) -> None:
    """Let the reactor thread of an association we requested sleep until our next request.

    Between requests pynetdicom's reactor wakes every millisecond (about 4% of a core per association) to serve
    what the peer sends unasked: a request, which a PACS does not send on an association pacsflow requested, or
    a release or an abort. pynetdicom hands the end of an association to the next request too (``send_*``
    returns no status), and ``PacsClient`` then opens a new one. Given up: pynetdicom's ``network_timeout`` on
    an association left idle between requests (the PACS's own idle timeout still ends it); a task closes its
    association when its batch is done. pynetdicom's ``send_*`` calls wake the reactor when they finish."""
    assoc._reactor_checkpoint.clear()


def copy_contexts_cheaply(server: AssociationServer) -> None:
    """Give ``server``'s supported presentation contexts a cheap copy for each association it accepts.

    pynetdicom deep-copies them for every accepted association (``RequestHandler._create_association``); with
    every storage SOP class and its transfer syntaxes (about 5,000 UIDs) that took 150-400 ms per association
    here, and a PACS opens one association per C-MOVE. Upstream, the ask: "Copy the supported contexts of an
    accepted association shallowly (deepcopy costs ~0.2 s with all storage contexts)"."""
    server.contexts = _CheaplyCopiedContexts(server.contexts)


class _CheaplyCopiedContexts(list[PresentationContext]):
    """What ``deepcopy`` makes of it: new contexts, each with its own transfer syntax list, sharing the UIDs
    (immutable strings). Negotiation only reads the acceptor's supported contexts."""

    def __deepcopy__(self, memo: dict[int, object]) -> list[PresentationContext]:
        return [_copy_context(context) for context in self]


def _copy_context(context: PresentationContext) -> PresentationContext:
    duplicate = copy(context)
    duplicate._transfer_syntax = list(context._transfer_syntax)
    return duplicate


def stream_to(assoc: Association, root: Path) -> None:
    """Stream the C-STORE data sets that arrive on ``assoc`` into temp files in ``root`` (which must exist).

    Streaming receive: the data set is written to a file as its PDUs arrive (memory stays flat whatever the size
    of an object), in ``root``: same file system as the final path (the handler's rename is atomic), swept with
    the layout's temp files, and no patient data outside the root. pynetdicom offers this only process-wide
    (``_config.STORE_RECV_CHUNKED_DATASET``) and into the system temp directory; upstream, the ask is a per-AE
    switch and directory for streamed data sets (the directory was discussed in pynetdicom#526's review,
    https://github.com/pydicom/pynetdicom/pull/526; the issue to file: "Per-AE option and directory for
    C-STORE data sets received in chunks")."""
    _provider(assoc).stream_root = root


def discard_unfinished_stream(assoc: Association) -> None:
    """Remove the data set ``assoc`` was receiving when it ended (a peer abort mid-instance): a partial file,
    patient data, must not wait for the next sweep. Call it when the connection closes."""
    dimse = assoc.dimse
    stream = dimse.receiving if isinstance(dimse, _PacsflowDimse) else None
    if stream is not None and not stream.closed and not stream.claimed:
        stream.close()
        Path(stream.name).unlink(missing_ok=True)


def claim_stream(assoc: Association, path: Path) -> OSError | None:
    """The C-STORE handler takes the data set streamed to ``path``: complete, it is no longer removed if the
    connection closes while the handler works on it. Returns the error that cut its writing short (a full
    disk), if any."""
    stream = _provider(assoc).streams.get(str(path))
    if stream is None:
        return None
    stream.claimed = True
    return stream.error


def _provider(assoc: Association) -> _PacsflowDimse:
    dimse = assoc.dimse
    if not isinstance(dimse, _PacsflowDimse):
        raise TypeError("adjust_association was not bound to EVT_CONN_OPEN of this association")
    return dimse


class _PacsflowDimse(DIMSEServiceProvider):
    """pynetdicom 3.0.4's DIMSE provider with two changes, for one association.

    - On an association we requested, the reactor no longer takes responses off the queue: it can pass its pause
      checkpoint just before ``send_c_find`` (or another send) clears it, and then took the peer's response and
      dropped it as "unexpected" (pynetdicom#875, https://github.com/pydicom/pynetdicom/issues/875): a pending
      C-FIND match lost, an existing AN reported "not found". A response belongs to the waiting ``send_*`` call,
      and so does the marker pynetdicom queues when the association ends (taken by the reactor, the call waited
      for its whole DIMSE timeout).
    - With ``stream_root`` set, a C-STORE data set is written to a file there as it arrives (``stream_to``).
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self.stream_root: Path | None = None
        self.receiving: _StreamedDataSet | None = None  # the latest data set streamed
        self.streams: weakref.WeakValueDictionary[str, _StreamedDataSet] = weakref.WeakValueDictionary()

    def get_msg(self, block: bool = False) -> _QueueItem:
        """``block=False`` is the reactor's call (``send_*`` calls block): it takes requests only, and leaves
        responses and the end-of-association marker (None) to the waiting ``send_*`` call."""
        if not block and self.assoc.is_requestor:
            waiting = self.msg_queue
            with waiting.mutex:
                if not waiting.queue:
                    return None, None
                _, head = waiting.queue[0]
                if head is None or not head.is_valid_request:
                    return None, None
        return super().get_msg(block)

    def receive_primitive(self, primitive: P_DATA) -> None:
        if self.stream_root is None:
            super().receive_primitive(primitive)
            return
        # One presentation data value at a time: the file must be open before the first data set fragment.
        for value in primitive.presentation_data_value_list:
            context_id, data = value
            single = P_DATA()
            # the setter checks for [ID, PDV] lists; the annotation says tuples
            single.presentation_data_value_list = [[context_id, data]]  # type: ignore[list-item]
            if not data[0] & 1:  # a data set fragment
                self._open_stream(context_id, self.stream_root)
            super().receive_primitive(single)

    def _open_stream(self, context_id: int, root: Path) -> None:
        """Start the file of the C-STORE data set being received, as pynetdicom does with
        ``STORE_RECV_CHUNKED_DATASET``: preamble and file meta, then the data set fragments as they come."""
        message = self.message
        if not isinstance(message, C_STORE_RQ) or message._data_set_file is not None:
            return
        command = message.command_set
        meta = DicomBytesIO()
        write_file_meta_info(
            meta,
            create_file_meta(
                sop_class_uid=command.AffectedSOPClassUID,
                sop_instance_uid=command.AffectedSOPInstanceUID,
                transfer_syntax=self.assoc._accepted_cx[context_id].transfer_syntax[0],
            ),
        )
        stream = _StreamedDataSet(root)
        stream.write(b"\x00" * 128 + b"DICM" + meta.getvalue())
        self.receiving = self.streams[stream.name] = stream
        # pynetdicom's NTF protocol asks for a BufferedWriter as .file; it calls only .file.flush()
        message._data_set_file = stream  # type: ignore[assignment]
        message._data_set_path = Path(stream.name)


class _StreamedDataSet:
    """The file one data set streams into (pynetdicom writes, calls ``.file.flush()``, closes, unlinks by
    ``.name``). A write error is kept for the C-STORE handler, which answers it with a failure status: raised
    here, it would escape into the DUL thread and abort the whole association."""

    def __init__(self, root: Path) -> None:
        # closed by pynetdicom after the C-STORE handler, or by discard_unfinished_stream
        self._handle = tempfile.NamedTemporaryFile(  # noqa: SIM115
            mode="wb", dir=root, prefix=TEMP_PREFIX, suffix=SUFFIX, delete=False
        )
        self.name = self._handle.name
        self.file = self
        self.error: OSError | None = None
        self.claimed = False  # by the C-STORE handler: the data set is complete

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

    def _keep_error(self, operation: Callable[..., object], *args: object) -> None:
        try:
            operation(*args)
        except OSError as error:
            self.error = self.error or error


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


def bound_pdu_reads(assoc: Association, max_pdu_length: int) -> None:
    """End ``assoc`` (as a closed connection) when the peer announces a PDU longer than ``max_pdu_length``:
    pynetdicom reads each PDU whole into memory, whatever length the peer writes in its header."""
    sock = assoc.dul.socket
    if sock is None:
        return
    receive = sock.recv

    def bounded_receive(nr_bytes: int) -> bytearray:
        if nr_bytes > max_pdu_length:
            raise OSError("PDU longer than the receiver's maximum")
        return receive(nr_bytes)

    sock.recv = bounded_receive  # type: ignore[method-assign]  # this association's socket only
