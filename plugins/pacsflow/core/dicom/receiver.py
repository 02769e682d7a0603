"""pacsflow's C-STORE SCP: the move destination that writes each instance durably before answering success.

Stateless with respect to moves: an instance lands at ``<root>/<Study>/<Series>/<SOP>.dcm`` whoever asked for
it, and callers verify what arrived against the disk. Incoming UIDs are validated before they become paths.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.dicom.results import ReceiverStats
from pacsflow.core.dicom.transport import set_nodelay
from pacsflow.core.storage import StorageLayout
from pacsflow.core.uids import is_valid_uid

log = logging.getLogger("pacsflow.receiver")

STORED = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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
    sop_uid = event.request.AffectedSOPInstanceUID
    try:
        dataset = event.dataset
        study_uid, series_uid = dataset.get("StudyInstanceUID"), dataset.get("SeriesInstanceUID")
    except Exception:  # an undecodable dataset from the peer
        return CANNOT_UNDERSTAND, "undecodable dataset", 0
    if not all(is_valid_uid(uid) for uid in (sop_uid, study_uid, series_uid)):
        return CANNOT_UNDERSTAND, "invalid UID", 0
    if dataset.get("SOPInstanceUID") != sop_uid:
        return DATASET_MISMATCH, "SOP Instance UID differs from the request", 0
    data = event.encoded_dataset()  # the bytes as received, with file meta: no decode/re-encode
    try:
        layout.write_atomically(str(study_uid), str(series_uid), str(sop_uid), data)
    except OSError as error:
        reason = "disk full" if error.errno in _DISK_FULL else f"write failed ({errno.errorcode.get(error.errno or 0, 'I/O')})"
        log.error("cannot store an instance: %s", reason)
        return OUT_OF_RESOURCES, reason, 0
    return STORED, "", len(data)


class StoreReceiver:
    """Runs the C-STORE SCP in background threads while the context is open."""

    def __init__(self, config: ReceiverConfig, layout: StorageLayout) -> None:
        self.config = config
        self.layout = layout
        self.stats = ReceiverStats()
        self._server: Any = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the receiver is not running")
        return int(self._server.server_address[1])

    def __enter__(self) -> "StoreReceiver":
        self.layout.root.mkdir(parents=True, exist_ok=True)
        self.layout.sweep_temp_files()
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = 0  # unlimited: fewer, larger PDUs on the receive path
        ae.require_calling_aet = list(self.config.allowed_calling_aes)
        ae.add_supported_context(Verification)
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        handlers = [(evt.EVT_C_STORE, store_handler(self.layout, self.stats)), (evt.EVT_CONN_OPEN, _nodelay)]
        self._server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        allowed = set(self.config.allowed_addresses)
        if allowed:  # socketserver drops connections for which verify_request is False
            self._server.verify_request = lambda request, address: address[0] in allowed
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.layout.sweep_temp_files()


def _nodelay(event: Any) -> None:
    set_nodelay(event.assoc)
