"""pacsflow's C-STORE SCP: the move destination that writes each instance durably before answering success.

Stateless with respect to moves: an instance lands at ``<root>/<Study>/<Series>/<SOP>.dcm`` whoever asked for
it, and callers verify what arrived against the disk. Incoming UIDs are validated before they become paths.
pynetdicom streams each data set into a temp file in the layout root as its PDUs arrive (``transport.stream_to``),
so no instance is held in memory; the handler checks that file (``intake.examine``), fsyncs it and links it into
place. The bytes stay as received (no decode and re-encode), except a configured Deflated data set, inflated.

The network side faces a hospital network: each accepted connection gets a thread of its own (at most
``config.max_connections``, more are closed at once), where the TLS handshake and the wait for the peer's
A-ASSOCIATE-RQ run with a deadline (``acse_timeout``); only then does pynetdicom see the connection, with a
timeout on its socket (``network_timeout``) and a bound on the length of every PDU it reads.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import
from pynetdicom.transport import ThreadedAssociationServer

from pacsflow.core.dicom.config import STORAGE_SOP_CLASSES, ReceiverConfig
from pacsflow.core.dicom.dcmtk_receiver import DcmtkStoreReceiver
from pacsflow.core.dicom.header import withhold_values_from_pydicom_log
from pacsflow.core.dicom.intake import examine, placement_status
from pacsflow.core.dicom.results import ReceiverStats
from pacsflow.core.dicom.sharing import port_unavailable, receiver_lock, shared_receiver
from pacsflow.core.dicom.status import OUT_OF_RESOURCES, SUCCESS
from pacsflow.core.dicom.transport import (
    MAX_ASSOCIATE_RQ,
    RefusedConnection,
    adjust_association,
    application_entity,
    await_associate_rq,
    bound_pdu_reads,
    claim_stream,
    copy_contexts_cheaply,
    discard_unfinished_stream,
    server_tls,
    stream_to,
    tls_handshake,
)
from pacsflow.core.privacy import make_private_dir, redact_uids_in_library_logs, use_private_umask
from pacsflow.core.storage import StorageLayout, write_failure_reason

log = logging.getLogger("pacsflow.receiver")

DRAIN_SECONDS = 10.0
# How often the accept loop looks for a shutdown request (socketserver polls; its default is 0.5 s per stop).
SHUTDOWN_POLL_SECONDS = 0.05
_Request = socket.socket | tuple[bytes, socket.socket]  # what socketserver hands a TCP server
_Address = tuple[str, int] | str


def store_handler(layout: StorageLayout, stats: ReceiverStats, config: ReceiverConfig) -> Callable[[Event], int]:
    """The EVT_C_STORE handler for both C-MOVE (receiver) and C-GET (client) stores."""
    lock = threading.Lock()

    def handle(event: Event) -> int:
        status, reason, size = _store(event, layout, config)
        with lock:
            if status == SUCCESS:
                stats.stored += 1
                stats.bytes_stored += size
            else:
                stats.reject(reason)
        return status

    return handle


def _store(event: Event, layout: StorageLayout, config: ReceiverConfig) -> tuple[int, str, int]:
    """(status, reject reason, bytes stored). Success only once the file is at its final path."""
    request = event.request
    assert isinstance(request, C_STORE), "bound to EVT_C_STORE only"
    streamed = Path(event.dataset_path)  # the data set as received, with file meta: no decode/re-encode
    try:
        error = claim_stream(event.assoc, streamed)
        if error is not None:
            raise error
        verdict = examine(streamed, request.AffectedSOPInstanceUID, config)
        if verdict.uids is None:
            return verdict.status, verdict.reason, 0  # pynetdicom removes the streamed file
        size = streamed.stat().st_size
        uids = verdict.uids
        placement = layout.commit(streamed, str(uids.study), str(uids.series), str(uids.sop))
    except OSError as error:
        reason = write_failure_reason(error)
        log.error("cannot store an instance: %s", reason)
        return OUT_OF_RESOURCES, reason, 0
    if placement.refused:
        log.warning("refused a received instance: %s", placement.value)
    return placement_status(placement), placement.value, size


def open_receiver(config: ReceiverConfig, layout: StorageLayout) -> StoreReceiver | DcmtkStoreReceiver:
    """The receiver of ``config.backend``, to use as a context manager."""
    if config.backend == "dcmtk":
        return DcmtkStoreReceiver(config, layout)
    return StoreReceiver(config, layout)


def receiver_for(config: ReceiverConfig, layout: StorageLayout) -> Callable[[], AbstractContextManager[Any]]:
    """How a retrieval task gets a move destination, by ``config.mode``: a receiver of its own (``embedded``),
    the host's shared one (``shared``), or one run as a service (nothing to open)."""
    if config.mode == "embedded":
        return partial(open_receiver, config, layout)
    if config.mode == "shared":
        return partial(shared_receiver, config, layout.root)
    return nullcontext


class _GatedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with pacsflow's gate in front (an instance attribute set before serving):
    the accept loop only accepts; the per-connection thread does the slow, peer-paced part with a deadline."""

    daemon_threads = True  # a connection thread waiting on a silent peer never delays shutdown
    gate: _Gate

    def verify_request(self, request: _Request, client_address: _Address) -> bool:
        return self.gate.admit(str(client_address[0]), len(self.active_associations))

    def process_request_thread(self, request: _Request, client_address: _Address) -> None:
        assert isinstance(request, socket.socket), "a TCP server"
        try:
            connection = self.gate.open(request)
        except RefusedConnection:
            self.shutdown_request(request)
            self.gate.release()
            return
        try:
            super().process_request_thread(connection, client_address)  # starts the association's thread
        finally:
            self.gate.release()


class _Gate:
    """Admission (address allow-list, connection cap) and the pre-association deadline of each connection."""

    def __init__(self, config: ReceiverConfig) -> None:
        self.config = config
        self._tls = server_tls(config.tls)
        self._allowed = set(config.allowed_addresses)
        self._opening = 0  # connections admitted that are not yet associations
        self._lock = threading.Lock()

    def admit(self, address: str, associations: int) -> bool:
        if self._allowed and address not in self._allowed:
            return False  # socketserver closes it before any PDU
        with self._lock:
            if self._opening + associations >= self.config.max_connections:
                return False
            self._opening += 1
        return True

    def release(self) -> None:
        with self._lock:
            self._opening -= 1

    def open(self, connection: socket.socket) -> socket.socket:
        deadline = time.monotonic() + self.config.acse_timeout
        if self._tls is not None:
            connection = tls_handshake(connection, self._tls, deadline)
        else:
            await_associate_rq(connection, deadline)
        connection.settimeout(self.config.network_timeout)  # every read and write of the association
        return connection


class StoreReceiver:
    """Runs the C-STORE SCP in background threads while the context is open."""

    def __init__(self, config: ReceiverConfig, layout: StorageLayout, *, drain_seconds: float = DRAIN_SECONDS) -> None:
        self.config = config
        self.layout = layout
        self.stats = ReceiverStats()
        self.drain_seconds = drain_seconds  # on stop: how long transfers in progress may finish
        self._handler = store_handler(layout, self.stats, config)
        self._server: _GatedServer | None = None
        self._lock = ExitStack()

    @property
    def port(self) -> int:
        """The bound port (the real one when the configuration asked for port 0)."""
        if self._server is None:
            raise RuntimeError("the receiver is not running")
        return int(self._server.server_address[1])

    def __enter__(self) -> StoreReceiver:
        use_private_umask()
        redact_uids_in_library_logs()  # pynetdicom's warnings quote SOP Instance UIDs
        withhold_values_from_pydicom_log()
        make_private_dir(self.layout.root)
        self._lock.enter_context(receiver_lock(self.layout.root))  # before touching another receiver's files
        try:
            self._start()
        except BaseException:
            self._lock.close()
            raise
        return self

    def _start(self) -> None:
        self.layout.sweep_temp_files()
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, self._handler),
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_CONN_CLOSE, _on_connection_closed),
        ]
        ae = self._application_entity()
        gate = _Gate(self.config)  # TLS files are read here: a bad path fails before the port is bound
        try:
            server = ae.make_server(
                (self.config.host, self.config.port), evt_handlers=handlers, server_class=_GatedServer
            )
        except OSError as error:
            raise port_unavailable(self.config, error) from None
        assert isinstance(server, _GatedServer)
        server.gate = gate
        copy_contexts_cheaply(server)
        ae._servers.append(server)  # as AE.start_server does: shutdown() removes it
        threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": SHUTDOWN_POLL_SECONDS},
            name="pacsflow-receiver-accept",
            daemon=True,
        ).start()
        self._server = server

    def _application_entity(self) -> AE:
        ae = application_entity(self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = self.config.max_pdu
        ae.acse_timeout = self.config.acse_timeout
        ae.dimse_timeout = self.config.dimse_timeout
        ae.network_timeout = self.config.network_timeout
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.config.allowed_calling_aes)
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(self.config.transfer_syntaxes))
        return ae

    def _on_connection(self, event: Event) -> None:
        adjust_association(event.assoc)
        bound_pdu_reads(event.assoc, max(self.config.max_pdu, MAX_ASSOCIATE_RQ))
        stream_to(event.assoc, self.layout.root)

    def settle(self) -> None:
        """Nothing to do: an instance is in the layout before its C-STORE is answered."""

    def __exit__(self, *exc: object) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()  # no new associations
        _drain(server.active_associations, self.drain_seconds)
        self.layout.sweep_temp_files()
        self._lock.close()


def _drain(associations: list[Association], seconds: float) -> None:
    """Let transfers in progress finish (stores may follow the final C-MOVE response), then abort the rest,
    so that no handler is still writing when the temp files are swept."""
    deadline = time.monotonic() + seconds
    for assoc in associations:
        assoc.join(timeout=max(0.0, deadline - time.monotonic()))
    for assoc in associations:
        if assoc.is_alive():
            assoc.abort()
            assoc.join(timeout=5)


def _on_connection_closed(event: Event) -> None:
    discard_unfinished_stream(event.assoc)
