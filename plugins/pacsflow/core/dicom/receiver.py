"""pacsflow's C-STORE SCP: the move destination that writes each instance durably before answering success.

Stateless with respect to moves: an instance lands at ``<root>/<Study>/<Series>/<SOP>.dcm`` whoever asked for
it, and callers verify what arrived against the disk. Incoming UIDs are validated before they become paths.
pynetdicom streams each data set into a temp file in the layout root as its PDUs arrive (``transport.stream_to``),
so no instance is held in memory; the handler reads the header up to the series UID from that file, fsyncs it
and renames it into place. The bytes stay as received (no decode and re-encode).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.dicom.dcmtk_receiver import DcmtkStoreReceiver
from pacsflow.core.dicom.header import HeaderProblem, file_uids
from pacsflow.core.dicom.results import ReceiverStats
from pacsflow.core.dicom.sharing import port_unavailable, receiver_lock
from pacsflow.core.dicom.transport import (discard_unfinished_stream, server_tls, stream_error, stream_to,
                                          tune_for_latency)
from pacsflow.core.privacy import make_private_dir, redact_uids_in_library_logs, use_private_umask
from pacsflow.core.storage import StorageLayout, write_failure_reason

log = logging.getLogger("pacsflow.receiver")

STORED = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
_PROBLEM_STATUS = {HeaderProblem.INVALID_UID: CANNOT_UNDERSTAND, HeaderProblem.SOP_INSTANCE_MISMATCH: DATASET_MISMATCH}
DRAIN_SECONDS = 10.0


def store_handler(layout: StorageLayout, stats: ReceiverStats) -> Callable[[Any], int]:
    """The EVT_C_STORE handler for both C-MOVE (receiver) and C-GET (client) stores."""
    lock = threading.Lock()

    def handle(event: Any) -> int:
        status, reason, size = _store(event, layout)
        with lock:
            if status == STORED:
                stats.stored += 1
                stats.bytes_stored += size
            else:
                stats.reject(reason)
        return status

    return handle


def _store(event: Any, layout: StorageLayout) -> tuple[int, str, int]:
    """(status, reject reason, bytes stored). Success only once the file is at its final path."""
    streamed = Path(event.dataset_path)  # the data set as received, with file meta: no decode/re-encode
    try:
        _, uids = file_uids(streamed)
    except Exception:  # an undecodable dataset from the peer
        return CANNOT_UNDERSTAND, "undecodable dataset", 0
    problem = uids.problem(event.request.AffectedSOPInstanceUID)
    if problem is not None:
        return _PROBLEM_STATUS[problem], problem.value, 0  # pynetdicom removes the streamed file
    try:
        error = stream_error(streamed)
        if error is not None:
            raise error
        size = streamed.stat().st_size
        layout.commit(streamed, str(uids.study), str(uids.series), str(uids.sop))
    except OSError as error:
        reason = write_failure_reason(error)
        log.error("cannot store an instance: %s", reason)
        return OUT_OF_RESOURCES, reason, 0
    return STORED, "", size


def open_receiver(config: ReceiverConfig, layout: StorageLayout) -> StoreReceiver | DcmtkStoreReceiver:
    """The receiver of ``config.backend``, to use as a context manager."""
    if config.backend == "dcmtk":
        return DcmtkStoreReceiver(config, layout)
    return StoreReceiver(config, layout)


class StoreReceiver:
    """Runs the C-STORE SCP in background threads while the context is open."""

    def __init__(self, config: ReceiverConfig, layout: StorageLayout, *, drain_seconds: float = DRAIN_SECONDS) -> None:
        self.config = config
        self.layout = layout
        self.stats = ReceiverStats()
        self.drain_seconds = drain_seconds  # on stop: how long transfers in progress may finish
        self._handler = store_handler(layout, self.stats)
        self._server: Any = None
        self._lock = ExitStack()

    @property
    def port(self) -> int:
        """The bound port (the real one when the configuration asked for port 0)."""
        if self._server is None:
            raise RuntimeError("the receiver is not running")
        return int(self._server.server_address[1])

    def __enter__(self) -> "StoreReceiver":
        use_private_umask()
        redact_uids_in_library_logs()  # pynetdicom's warnings quote SOP Instance UIDs
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
        handlers = [(evt.EVT_C_STORE, self._handler), (evt.EVT_CONN_OPEN, self._on_connection),
                    (evt.EVT_CONN_CLOSE, _on_connection_closed)]
        try:
            self._server = self._application_entity().start_server(
                (self.config.host, self.config.port), block=False, evt_handlers=handlers,
                ssl_context=server_tls(self.config.tls))
        except OSError as error:
            raise port_unavailable(self.config, error) from None
        allowed = set(self.config.allowed_addresses)
        if allowed:  # socketserver closes connections for which verify_request is False, before any PDU
            self._server.verify_request = lambda request, address: address[0] in allowed

    def _application_entity(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = 0  # unlimited: fewer, larger PDUs on the receive path
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.config.allowed_calling_aes)
        ae.add_supported_context(Verification)
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    def _on_connection(self, event: Any) -> None:
        tune_for_latency(event.assoc)
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


def _drain(associations: list[Any], seconds: float) -> None:
    """Let transfers in progress finish (stores may follow the final C-MOVE response), then abort the rest,
    so that no handler is still writing when the temp files are swept."""
    deadline = time.monotonic() + seconds
    for assoc in associations:
        assoc.join(timeout=max(0.0, deadline - time.monotonic()))
    for assoc in associations:
        if assoc.is_alive():
            assoc.abort()
            assoc.join(timeout=5)


def _on_connection_closed(event: Any) -> None:
    discard_unfinished_stream(event.assoc)
