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

The one difference: ``storescp`` answers success once the file is written, before pacsflow's fsync. A crash in
between loses instances the PACS counts as sent; they are absent from the layout, so verification re-fetches them.
A staged file is complete once its ``storescp`` no longer holds it open (``/proc/<pid>/fd``) or has exited.
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

from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.dicom.errors import PacsConfigurationError
from pacsflow.core.dicom.header import file_uids
from pacsflow.core.dicom.results import ReceiverStats
from pacsflow.core.dicom.sharing import port_unavailable, receiver_lock
from pacsflow.core.processes import stop_process
from pacsflow.core.privacy import make_private_dir, redact_uids_in_library_logs, use_private_umask
from pacsflow.core.storage import (
    PRIVATE_FILE_MODE,
    StorageLayout,
    fsync_path,
    write_failure_reason,
)

log = logging.getLogger("pacsflow.receiver.dcmtk")

STAGING_DIR = ".staging-dcmtk"  # inside the layout root; readers of the layout skip dot entries
_ASSOCIATE_RQ, _ASSOCIATE_RQ_HEADER = 0x01, 74  # PDU type; bytes up to and including the calling AE title
# fsync waits on the disk with the GIL released: several in flight let the file system commit them together.
INGEST_THREADS = 4


def _associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return bytes([0x03, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, result, source, reason])


_CALLING_AE_UNKNOWN = _associate_rj(0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE
_BUSY = _associate_rj(0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), local limit


@dataclass
class _Association:
    process: subprocess.Popen[bytes]
    staging: Path


class DcmtkStoreReceiver:
    """Drop-in for ``StoreReceiver`` (same constructor, ``stats``, ``port``, context manager)."""

    def __init__(self, config: ReceiverConfig, layout: StorageLayout, *, executable: str = "storescp",
                 poll_seconds: float = 0.01, acse_timeout: float = 30.0) -> None:
        self.config = config
        self.layout = layout
        self.stats = ReceiverStats()
        self._executable = executable
        self._poll_seconds = poll_seconds
        self._acse_timeout = acse_timeout
        self._listener: socket.socket | None = None
        self._associations: list[_Association] = []
        self._lock = threading.Lock()  # guards _associations
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

    def __enter__(self) -> "DcmtkStoreReceiver":
        if self.config.tls is not None:
            raise PacsConfigurationError('the DCMTK receiver backend does not offer TLS: use backend "pynetdicom"')
        if not Path("/proc/self/fd").is_dir():
            raise PacsConfigurationError('the DCMTK receiver backend needs Linux (/proc): use backend "pynetdicom"')
        binary = shutil.which(self._executable)
        if binary is None:
            raise PacsConfigurationError(f"{self._executable} (DCMTK) is not installed; install dcmtk")
        self._executable = binary
        use_private_umask()  # storescp inherits it: its files are 0600 from the first byte
        redact_uids_in_library_logs()
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
        try:
            self._listener = socket.create_server((self.config.host, self.config.port))
        except OSError as error:
            raise port_unavailable(self.config, error) from None
        self._listener.settimeout(0.2)
        self._stop.clear()
        self._pool = ThreadPoolExecutor(INGEST_THREADS, thread_name_prefix="dcmtk-ingest")
        self._threads = [threading.Thread(target=loop, name=f"dcmtk-receiver-{loop.__name__}", daemon=True)
                         for loop in (self._accept_loop, self._ingest_loop)]
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
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            threading.Thread(target=self._hand_over, args=(connection, address), daemon=True).start()

    def _hand_over(self, connection: socket.socket, address: tuple[str, int]) -> None:
        with connection:
            allowed = self.config.allowed_addresses
            if allowed and address[0] not in allowed:
                return
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            refusal = self._refusal(connection)
            if refusal is not None:
                _refuse(connection, refusal, self._acse_timeout)
                return
            with self._lock:
                live = [a for a in self._associations if a.process.poll() is None]
                busy = len(live) >= self.config.max_associations
                if not busy:
                    self._start_storescp(connection)
            if busy:
                _refuse(connection, _BUSY, self._acse_timeout)
        # our copy of the socket closes here; storescp holds its own

    def _start_storescp(self, connection: socket.socket) -> None:
        """Hand the connection to a new ``storescp`` writing into a staging directory of its own."""
        # resolved: compared with the paths /proc reports as open
        staging = Path(tempfile.mkdtemp(prefix="association-", dir=self.staging_root)).resolve()
        process = subprocess.Popen(
            [self._executable, "--inetd", "-aet", self.config.ae_title, "+B", "+uf", "-pdu", "131072",
             "-ta", str(int(self._acse_timeout)), "-od", str(staging)],
            stdin=connection.fileno(), stdout=connection.fileno(), stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"}, close_fds=True)
        self._associations.append(_Association(process, staging))

    def _refusal(self, connection: socket.socket) -> bytes | None:
        """An A-ASSOCIATE-RJ for a calling AE title not allowed, from the peeked A-ASSOCIATE-RQ; else None."""
        allowed = self.config.allowed_calling_aes
        if not allowed:
            return None
        header = _peek(connection, _ASSOCIATE_RQ_HEADER, self._acse_timeout)
        if len(header) < _ASSOCIATE_RQ_HEADER or header[0] != _ASSOCIATE_RQ:
            return _CALLING_AE_UNKNOWN
        calling_ae = header[26:42].decode("ascii", "replace").strip()
        return None if calling_ae in allowed else _CALLING_AE_UNKNOWN

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
        if held is None:  # the process exited meanwhile: everything it wrote is complete
            exited, held = True, set()
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
        accepted = [(path, final) for path in staged if (final := self._destination(path)) is not None]
        synced = self._pool.map(_fsync_or_error, [path for path, _ in accepted])
        touched = {directory for (path, final), error in zip(accepted, synced)
                   if (directory := self._move_into_layout(path, final, error)) is not None}
        for directory in touched:  # one directory fsync per series and pass, after the renames
            fsync_path(directory)

    def _destination(self, path: Path) -> Path | None:
        """The layout path of a staged file whose header is valid; None (file rejected) otherwise."""
        try:
            requested_sop_uid, uids = file_uids(path)  # storescp writes the request's UID into the file meta
        except Exception:  # an undecodable file from the peer
            return self._reject(path, "undecodable dataset")
        problem = uids.problem(requested_sop_uid)
        if problem is not None:
            return self._reject(path, problem.value)
        return self.layout.instance_path(str(uids.study), str(uids.series), str(uids.sop))

    def _move_into_layout(self, path: Path, final: Path, fsync_error: OSError | None) -> Path | None:
        """Rename a staged file that is durable into the layout; returns its series directory."""
        try:
            if fsync_error is not None:
                raise fsync_error
            size = path.stat().st_size
            os.chmod(path, PRIVATE_FILE_MODE)
            self.layout.make_series_dir(final.parent.parent.name, final.parent.name)
            os.replace(path, final)
        except OSError as error:
            reason = write_failure_reason(error)
            log.error("cannot store an instance: %s", reason)
            return self._reject(path, reason)
        self.stats.stored += 1
        self.stats.bytes_stored += size
        return final.parent

    def _reject(self, path: Path, reason: str) -> None:
        path.unlink(missing_ok=True)
        self.stats.reject(reason)
        log.warning("refused a received instance: %s", reason)
        return None


def _fsync_or_error(path: Path) -> OSError | None:
    try:
        fsync_path(path)
    except OSError as error:
        return error
    return None


def _refuse(connection: socket.socket, rejection: bytes, timeout: float) -> None:
    """Send an A-ASSOCIATE-RJ and let the peer read it: closing with its request still unread would reset the
    connection (RST), and the peer could see a reset instead of the rejection."""
    connection.sendall(rejection)
    connection.shutdown(socket.SHUT_WR)
    connection.settimeout(timeout)
    try:
        while connection.recv(65536):  # until the peer closes, having read the rejection
            pass
    except OSError:
        pass


def _peek(connection: socket.socket, size: int, timeout: float) -> bytes:
    """Up to ``size`` bytes at the head of the stream, left in place for storescp to read."""
    deadline = time.monotonic() + timeout
    data = b""
    while len(data) < size and time.monotonic() < deadline:
        connection.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            data = connection.recv(size, socket.MSG_PEEK)
        except (TimeoutError, socket.timeout, OSError):
            break
        if not data:
            break
        if len(data) < size:
            time.sleep(0.005)
    connection.settimeout(None)
    return data


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

