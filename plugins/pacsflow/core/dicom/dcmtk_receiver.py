"""A C-STORE receiver backend that lets DCMTK's ``storescp`` do the network work (Linux).

pynetdicom's receive path reaches about a quarter of DCMTK's throughput, bound by its per-instance round trip
(bench/README.md), so this backend hands each accepted association to a ``storescp --inetd``
process and keeps everything that matters on pacsflow's side:

- the listening socket is pacsflow's: bound to ``config.host``, peer addresses and calling AE titles checked
  (the A-ASSOCIATE-RQ is peeked before the hand-over) and associations capped, as in ``StoreReceiver``;
- ``storescp`` writes bit-preserving files under generated names (``+uf``: no incoming UID reaches a path) into a
  staging directory per association, inside the layout root (same file system, so moves are renames);
- an ingest thread validates each complete staged file (UIDs, file meta vs data set), fsyncs it and renames it
  to ``<root>/<Study>/<Series>/<SOP>.dcm``, then fsyncs the directories. Nothing is in the layout before it is
  durable, exactly as with ``StoreReceiver``;
- ``settle()`` after the PACS's final C-MOVE response: every C-STORE of the move has been answered by then, so
  every staged file is complete and is in the layout when it returns. The pipeline calls it before verifying a
  move against the layout (``pipeline.Destination``; ``StoreReceiver.settle`` is a no-op).

``storescp`` answers success once the file is written, before pacsflow's fsync. A crash in between loses
instances the PACS counts as sent; they are absent from the layout, so verification re-fetches them.

Hostile peers: each connection is handed over only once its A-ASSOCIATE-RQ is in (``acse_timeout``; a silent or
trickling peer is closed and never becomes a ``storescp``), with the called and calling AE titles checked;
connections beyond ``config.max_connections`` are closed at once; ``storescp`` runs with the receiver's ACSE,
DIMSE and socket timeouts, its maximum PDU and exactly its transfer syntaxes (a profile written at start).

Truncation: ``storescp`` removes the file of a C-STORE that fails (peer abort, closed connection), but when it
is killed mid-object (OOM, a signal) its partial file stays. A staged file is therefore ingested only when
``storescp`` is alive and no longer holds it (``/proc/<pid>/fd``), or exited with status 0; files left by a
``storescp`` that died otherwise are discarded, and every file must also pass ``header.is_complete`` (each
declared length present).

``storescp`` is DCMTK's, by a verified absolute path (``dcmtk.dcmtk_program``): pynetdicom's own ``storescp``
comes first on ``PATH`` in an activated virtual environment.

Statuses: ``storescp`` has answered (0x0000) by the time pacsflow examines a file, so an instance refused at
ingest (invalid UID, SOP mismatch, undecodable or incomplete body, duplicate) was answered success and is then
absent from the layout: verification counts it missing and asks for it again (the pynetdicom backend answers
0xC000/0xA900/0x0111 instead).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from pydicom.datadict import DicomDictionary
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import

from pacsflow.core.dicom.config import DCMTK_MAX_PDU, STORAGE_SOP_CLASSES, ReceiverConfig
from pacsflow.core.dicom.dcmtk import dcmtk_program
from pacsflow.core.dicom.errors import PacsConfigurationError
from pacsflow.core.dicom.header import InstanceUids, withhold_values_from_pydicom_log
from pacsflow.core.dicom.intake import examine
from pacsflow.core.dicom.results import ReceiverStats
from pacsflow.core.dicom.sharing import port_unavailable, receiver_lock
from pacsflow.core.dicom.transport import ASSOCIATE_RQ_HEAD, RefusedConnection, await_associate_rq
from pacsflow.core.privacy import make_private_dir, redact_uids_in_library_logs, use_private_umask
from pacsflow.core.processes import stop_process
from pacsflow.core.storage import (
    PRIVATE_FILE_MODE,
    StorageLayout,
    fsync_path,
    write_failure_reason,
)

log = logging.getLogger("pacsflow.receiver.dcmtk")

STAGING_DIR = ".staging-dcmtk"  # inside the layout root; readers of the layout skip dot entries
PROFILE = "Pacsflow"
DICTIONARY_NAME = "storescp.dic"
COMMAND_GROUP, FILE_META_GROUP = 0x0000, 0x0002
INCOMPLETE = "incomplete (storescp ended abnormally)"
# fsync waits on the disk with the GIL released: several in flight let the file system commit them together.
INGEST_THREADS = 4


def _associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return bytes([0x03, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, result, source, reason])


_CALLING_AE_UNKNOWN = _associate_rj(0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE
_CALLED_AE_UNKNOWN = _associate_rj(0x01, 0x01, 0x07)  # rejected-permanent, service-user, called AE
_BUSY = _associate_rj(0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), local limit


@dataclass
class _Association:
    process: subprocess.Popen[bytes]
    staging: Path


class DcmtkStoreReceiver:
    """Drop-in for ``StoreReceiver`` (same constructor, ``stats``, ``port``, context manager)."""

    def __init__(self, config: ReceiverConfig, layout: StorageLayout, *, poll_seconds: float = 0.01) -> None:
        self.config = config
        self.layout = layout
        self.stats = ReceiverStats()
        self._executable = ""  # DCMTK's storescp, resolved and checked on start
        self._poll_seconds = poll_seconds
        self._acse_timeout = config.acse_timeout
        self._opening = 0  # connections accepted and not yet handed over or refused
        self._draining = 0  # refused connections waiting for their peer to close
        self._profile = Path()
        self._listener: socket.socket | None = None
        self._associations: list[_Association] = []
        self._lock = threading.Lock()  # guards _associations and the connection counts
        self._root_lock = ExitStack()
        self._ingest_lock = threading.Lock()  # one ingest pass at a time (it alone writes self.stats)
        self._pool: ThreadPoolExecutor | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def staging_root(self) -> Path:
        return self.layout.root / STAGING_DIR

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the receiver is not running")
        return int(self._listener.getsockname()[1])

    def __enter__(self) -> DcmtkStoreReceiver:
        if self.config.tls is not None:
            raise PacsConfigurationError('the DCMTK receiver backend does not offer TLS: use backend "pynetdicom"')
        if not Path("/proc/self/fd").is_dir():
            raise PacsConfigurationError('the DCMTK receiver backend needs Linux (/proc): use backend "pynetdicom"')
        self._executable = dcmtk_program("storescp")
        use_private_umask()  # storescp inherits it: its files are 0600 from the first byte
        redact_uids_in_library_logs()
        withhold_values_from_pydicom_log()
        make_private_dir(self.layout.root)
        self._root_lock.enter_context(receiver_lock(self.layout.root))  # before touching another receiver's files
        try:
            self._start()
        except BaseException:
            self._root_lock.close()
            raise
        return self

    def _start(self) -> None:
        self.layout.sweep_temp_files()
        shutil.rmtree(self.staging_root, ignore_errors=True)  # leftovers may be partial: the PACS re-sends them
        self.staging_root.mkdir(mode=0o700)
        # the association profile holds no patient data: outside the root, which then holds only instances
        self._profile = Path(tempfile.mkdtemp(prefix="pacsflow-storescp-")) / "storescp.cfg"
        _write_profile(self._profile, self.config.transfer_syntaxes)
        _write_dictionary(self._profile.with_name(DICTIONARY_NAME))
        try:
            self._listener = socket.create_server((self.config.host, self.config.port))
        except OSError as error:
            raise port_unavailable(self.config, error) from None
        self._listener.settimeout(0.2)
        self._stop.clear()
        self._pool = ThreadPoolExecutor(INGEST_THREADS, thread_name_prefix="dcmtk-ingest")
        self._threads = [
            threading.Thread(target=loop, name=f"dcmtk-receiver-{loop.__name__}", daemon=True)
            for loop in (self._accept_loop, self._ingest_loop)
        ]
        for thread in self._threads:
            thread.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            processes = [association.process for association in self._associations]
        for process in processes:  # the PACS releases its association at the end of a move
            stop_process(process, grace=5.0, timeout=5.0)
        self.settle()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        shutil.rmtree(self.staging_root, ignore_errors=True)
        shutil.rmtree(self._profile.parent, ignore_errors=True)
        self.layout.sweep_temp_files()
        self._root_lock.close()

    def settle(self) -> None:
        """Ingest every staged file that is complete now (all of them once their C-STOREs are answered)."""
        with self._ingest_lock:
            with self._lock:
                associations = list(self._associations)
            complete = [path for association in associations for path in self._complete_files(association)]
            self._ingest(complete)
            for association in associations:
                self._forget_if_done(association)

    # -- network --------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                connection, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            allowed = self.config.allowed_addresses
            if (allowed and address[0] not in allowed) or not self._admit():
                connection.close()
                continue
            threading.Thread(target=self._hand_over, args=(connection,), daemon=True).start()

    def _admit(self) -> bool:
        """Whether one more connection thread fits under ``max_connections`` (storescp processes included)."""
        with self._lock:
            live = sum(1 for a in self._associations if a.process.poll() is None)
            if self._opening + live >= self.config.max_connections:
                return False
            self._opening += 1
            return True

    def _hand_over(self, connection: socket.socket) -> None:
        try:
            with connection:
                self._hand_over_or_refuse(connection)
        finally:
            with self._lock:
                self._opening -= 1

    def _hand_over_or_refuse(self, connection: socket.socket) -> None:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            head = await_associate_rq(connection, time.monotonic() + self._acse_timeout)
        except RefusedConnection:
            return
        refusal = self._refusal(head)
        if refusal is not None:
            self._refuse(connection, refusal)
            return
        connection.settimeout(None)  # a blocking descriptor for storescp, which applies its own timeouts
        with self._lock:
            live = [a for a in self._associations if a.process.poll() is None]
            busy = len(live) >= self.config.max_associations
            if not busy:
                self._start_storescp(connection)
        if busy:
            self._refuse(connection, _BUSY)
        # our copy of the socket closes in _hand_over; storescp holds its own

    def _start_storescp(self, connection: socket.socket) -> None:
        """Hand the connection to a new ``storescp`` writing into a staging directory of its own."""
        # resolved: compared with the paths /proc reports as open
        staging = Path(tempfile.mkdtemp(prefix="association-", dir=self.staging_root)).resolve()
        config = self.config
        process = subprocess.Popen(
            [
                self._executable,
                "--inetd",
                "-aet",
                config.ae_title,
                "+B",
                "+uf",
                "-xf",
                str(self._profile),
                PROFILE,
                "-pdu",
                str(min(config.max_pdu, DCMTK_MAX_PDU)),
                "-ta",
                _seconds(config.acse_timeout),
                "-td",
                _seconds(config.dimse_timeout),
                "-ts",
                _seconds(config.network_timeout),
                "-od",
                str(staging),
            ],
            stdin=connection.fileno(),
            stdout=connection.fileno(),
            stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1", "DCMDICTPATH": str(self._profile.with_name(DICTIONARY_NAME))},
            close_fds=True,
        )
        self._associations.append(_Association(process, staging))

    def _refusal(self, head: bytes) -> bytes | None:
        """An A-ASSOCIATE-RJ for a called AE title other than ours or a calling AE title not allowed, from the
        peeked A-ASSOCIATE-RQ; else None."""
        if len(head) < ASSOCIATE_RQ_HEAD:
            return _CALLED_AE_UNKNOWN
        called_ae = head[10:26].decode("ascii", "replace").strip()
        if called_ae != self.config.ae_title:
            return _CALLED_AE_UNKNOWN
        allowed = self.config.allowed_calling_aes
        calling_ae = head[26:42].decode("ascii", "replace").strip()
        return None if not allowed or calling_ae in allowed else _CALLING_AE_UNKNOWN

    def _refuse(self, connection: socket.socket, rejection: bytes) -> None:
        """Send an A-ASSOCIATE-RJ and let the peer read it. The connection's slot is free once the rejection is
        sent (a peer that reads it and closes at once must not find the next connection over the cap while this
        thread waits for its close); those waits have a cap of their own, beyond which the connection is closed
        at once."""
        connection.sendall(rejection)
        connection.shutdown(socket.SHUT_WR)
        with self._lock:
            self._opening -= 1
            drain = self._draining < self.config.max_connections
            self._draining += int(drain)
        try:
            if drain:
                _wait_for_close(connection, self._acse_timeout)
        finally:
            with self._lock:
                self._opening += 1  # _hand_over gives the slot back
                self._draining -= int(drain)

    # -- ingest ---------------------------------------------------------------------------------------
    def _ingest_loop(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            try:
                self.settle()
            except OSError as error:  # keep receiving; settle() after the move reports again
                log.error("ingest pass failed: %s", errno.errorcode.get(error.errno or 0, "I/O"))

    def _complete_files(self, association: _Association) -> list[Path]:
        exited = association.process.poll() is not None
        with os.scandir(association.staging) as entries:
            # Sizes before the open-file snapshot: a file with data was opened before we looked at the fds,
            # so it is complete if it is not held then; a file still empty may be one being created now.
            staged = [(Path(entry.path), entry.stat().st_size) for entry in entries]
        held = set() if exited else _open_files(association.process.pid)
        if held is None:  # the process exited meanwhile
            exited, held = True, set()
        if exited and association.process.wait() != 0:
            # Killed (OOM, a signal) or failed: the file it was writing may be cut short, and storescp did not
            # get to remove it. What it had finished was ingested by earlier passes while it was alive.
            for path, _ in staged:
                self._reject(path, INCOMPLETE)
            return []
        return [path for path, size in staged if exited or (size > 0 and str(path) not in held)]

    def _forget_if_done(self, association: _Association) -> None:
        if association.process.poll() is not None and not any(association.staging.iterdir()):
            association.staging.rmdir()
            with self._lock:
                self._associations.remove(association)

    def _ingest(self, staged: list[Path]) -> None:
        """Validate, fsync and move staged files into the layout, then fsync their series directories.

        Headers are parsed here, one after the other; only the fsyncs go to the pool. Python work in the pool
        threads would make each fsync wait for the GIL on its return (a convoy: twice as slow, measured)."""
        assert self._pool is not None, "the receiver is not running"
        accepted = [(path, uids) for path in staged if (uids := self._examine(path)) is not None]
        synced = self._pool.map(_fsync_or_error, [path for path, _ in accepted])
        touched: set[Path] = set()
        for (path, uids), error in zip(accepted, synced, strict=True):
            touched.update(self._place(path, uids, error))
        for directory in touched:  # one fsync per directory and pass, after the links
            fsync_path(directory)

    def _examine(self, path: Path) -> InstanceUids | None:
        """The UIDs to file a staged file under; None (file rejected) when ``intake.examine`` refuses it."""
        try:
            verdict = examine(path, None, self.config)  # storescp writes the request's UID into the file meta
        except FileNotFoundError:  # storescp removed it after closing it (its C-STORE failed): nothing was received
            return None
        except OSError as error:
            self._reject(path, write_failure_reason(error))
            return None
        if verdict.uids is None:
            self._reject(path, verdict.reason)
        return verdict.uids

    def _place(self, path: Path, uids: InstanceUids, fsync_error: OSError | None) -> list[Path]:
        """Link a staged file that is durable into the layout; returns the directories to fsync."""
        try:
            if fsync_error is not None:
                raise fsync_error
            size = path.stat().st_size
            os.chmod(path, PRIVATE_FILE_MODE)  # storescp honours the umask only
            placement, changed = self.layout.place(path, str(uids.study), str(uids.series), str(uids.sop))
        except OSError as error:
            reason = write_failure_reason(error)
            log.error("cannot store an instance: %s", reason)
            self._reject(path, reason)
            return []
        if placement.refused:
            self.stats.reject(placement.value)
            log.warning("refused a received instance: %s", placement.value)
            return []
        self.stats.stored += 1
        self.stats.bytes_stored += size
        return changed

    def _reject(self, path: Path, reason: str) -> None:
        path.unlink(missing_ok=True)
        self.stats.reject(reason)
        log.warning("refused a received instance: %s", reason)


def _fsync_or_error(path: Path) -> OSError | None:
    try:
        fsync_path(path)
    except OSError as error:
        return error
    return None


def _wait_for_close(connection: socket.socket, timeout: float) -> None:
    """Read until the peer closes: closing with its request still unread would reset the connection (RST), and
    the peer could see a reset instead of the rejection it has not read yet."""
    connection.settimeout(timeout)
    try:
        while connection.recv(65536):  # until the peer closes, having read the rejection
            pass
    except OSError:
        pass


def _seconds(timeout: float) -> str:
    """A storescp timeout option: whole seconds, at least 1 (0 would mean none)."""
    return str(max(1, round(timeout)))


def _write_profile(path: Path, transfer_syntaxes: tuple[str, ...]) -> None:
    """A storescp association profile accepting the storage SOP classes pynetdicom knows (as the other backend)
    and Verification, each with exactly ``transfer_syntaxes``."""
    sop_classes = [str(Verification), *map(str, STORAGE_SOP_CLASSES)]
    lines = ["[[TransferSyntaxes]]", "[Accepted]"]
    lines += [f"TransferSyntax{n} = {uid}" for n, uid in enumerate(transfer_syntaxes, 1)]
    lines += ["[[PresentationContexts]]", "[Storage]"]
    lines += [f"PresentationContext{n} = {uid}\\Accepted" for n, uid in enumerate(sop_classes, 1)]
    lines += ["[[Profiles]]", f"[{PROFILE}]", "PresentationContexts = Storage"]
    path.write_text("\n".join(lines) + "\n")


def _write_dictionary(path: Path) -> None:
    """The data dictionary ``storescp`` needs with ``+B``: the command and file meta groups, which it decodes and
    writes; it stores the data set as received, unparsed. DCMTK's full dictionary takes about 25 ms of CPU to
    load, once per association (``--inetd``); this one a fraction of that (measured in bench/README.md)."""
    entries = sorted(tag for tag in DicomDictionary if tag >> 16 in (COMMAND_GROUP, FILE_META_GROUP))
    lines = []
    for tag in entries:
        vr, vm, _name, _retired, keyword = DicomDictionary[tag]
        lines.append(f"({tag >> 16:04X},{tag & 0xFFFF:04X})\t{vr.split(' or ')[0]}\t{keyword}\t{vm}\tDICOM")
    path.write_text("\n".join(lines) + "\n")


def _open_files(pid: int) -> set[str] | None:
    """Paths the process holds open, or None if it is gone."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        return None
    held = set()
    for name in names:
        try:
            held.add(os.readlink(f"{fd_dir}/{name}"))
        except OSError:
            continue
    return held
