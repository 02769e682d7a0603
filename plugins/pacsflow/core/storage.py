"""Where retrieved instances live on disk: ``<root>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``.

Every path component is a validated UID, so no incoming value can steer a write outside ``root``.
A file only ever appears at its final path by atomic link after fsync, so "present" means "complete", and it is
never replaced: a second copy with other bytes, or the same SOP Instance UID under another study or series, is
refused. ``<root>/.sop-index/`` records where each SOP Instance UID is stored (a symbolic link per UID) so that
the second case is found without scanning the layout.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import filecmp
import hashlib
import os
import re
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from pacsflow.core.uids import require_uid

SUFFIX = ".dcm"
PRIVATE_FILE_MODE, PRIVATE_DIR_MODE = 0o600, 0o700  # instances hold patient data: the service account only
TEMP_PREFIX = ".incoming-"
LOCK_DIR = ".locks"  # readers of the layout skip dot entries
LOCK_STRIPES = 256  # series share lock files by hash: no UID in a file name, a bounded number of files
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
SOP_INDEX = ".sop-index"  # readers of the layout skip dot entries
_PLACING = threading.Lock()  # claim-then-link is one step for the threads of a process


class Placement(Enum):
    """What became of a complete file offered to the layout."""

    STORED = "stored"
    ALREADY_STORED = "already stored (same bytes)"  # a re-sent instance: success, nothing written
    DIFFERENT_COPY = "SOP Instance already stored with other bytes"
    OTHER_LOCATION = "SOP Instance UID already stored under another study or series"

    @property
    def refused(self) -> bool:
        return self in (Placement.DIFFERENT_COPY, Placement.OTHER_LOCATION)


@dataclass(frozen=True)
class StorageLayout:
    root: Path

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return self.root / require_uid(study_uid, "StudyInstanceUID") / require_uid(series_uid, "SeriesInstanceUID")

    def make_series_dir(self, study_uid: str, series_uid: str) -> Path:
        """Create the series directory and its study directory, 0700 whatever the umask of this process."""
        series_dir = self.series_dir(study_uid, series_uid)
        self.root.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        _make_dirs(series_dir, [], self.root)
        return series_dir

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.series_dir(study_uid, series_uid) / (require_uid(sop_uid, "SOPInstanceUID") + SUFFIX)

    def stored_sop_uids(self, study_uid: str, series_uid: str) -> set[str]:
        """SOP Instance UIDs already stored (complete) for a series."""
        directory = self.series_dir(study_uid, series_uid)
        if not directory.is_dir():
            return set()
        return {
            entry.name[: -len(SUFFIX)]
            for entry in os.scandir(directory)
            if entry.name.endswith(SUFFIX) and not entry.name.startswith(TEMP_PREFIX)
        }

    def commit(self, temp: Path, study_uid: str, series_uid: str, sop_uid: str) -> Placement:
        """Make a complete temp file (on the layout's file system) durable, link it into place, fsync the
        directories that changed. The temp file is gone afterwards, also when this fails."""
        try:
            os.chmod(temp, PRIVATE_FILE_MODE)  # whoever wrote it (storescp honours the umask only)
            fsync_path(temp)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        placement, changed = self.place(temp, study_uid, series_uid, sop_uid)
        for directory in changed:
            fsync_path(directory)
        return placement

    def place(self, temp: Path, study_uid: str, series_uid: str, sop_uid: str) -> tuple[Placement, list[Path]]:
        """Link a complete, already fsynced temp file to its final path unless the SOP Instance is there already
        (or elsewhere); the temp file is removed in every case. Returns the placement and the directories whose
        entries changed, children before parents: fsync them (batched by callers that place many files)."""
        final = self.instance_path(study_uid, series_uid, sop_uid)
        changed: list[Path] = []
        try:
            with _PLACING:
                placement = self._claim(sop_uid, final, changed)
                if placement is None:
                    placement = _link_once(temp, final, changed, self.root)
        finally:
            temp.unlink(missing_ok=True)
        return placement, changed

    def _claim(self, sop_uid: str, final: Path, changed: list[Path]) -> Placement | None:
        """Record that ``sop_uid`` lives in ``final``'s series directory; OTHER_LOCATION when it already lives,
        complete, in another one."""
        claim = self.root / SOP_INDEX / hashlib.sha256(sop_uid.encode()).hexdigest()[:2] / sop_uid
        target = os.path.relpath(final.parent, self.root)
        _make_dirs(claim.parent, changed, self.root)
        try:
            os.symlink(target, claim)
        except FileExistsError:
            previous = os.readlink(claim)
            if previous == target:
                return None
            if (self.root / previous / final.name).is_file():
                return Placement.OTHER_LOCATION
            replacement = claim.with_name(f"{TEMP_PREFIX}{claim.name}")  # a claim whose file is gone
            replacement.unlink(missing_ok=True)
            os.symlink(target, replacement)
            os.replace(replacement, claim)
        changed.append(claim.parent)
        return None

    def replace_many(self, staged: list[tuple[Path, str, str, str]]) -> list[Path]:
        """Rename derived files ``(temp, study, series, sop)`` into place, replacing what is there (a re-run
        writes the same bytes): for outputs such as the release, never for received instances (:meth:`commit`).
        No fsync: the caller flushes the file system once (:func:`sync_filesystem`) before recording them.
        Every temp file is gone afterwards, also on failure."""
        finals: list[Path] = []
        try:
            for temp, study_uid, series_uid, sop_uid in staged:
                os.chmod(temp, PRIVATE_FILE_MODE)
                final = self.instance_path(study_uid, series_uid, sop_uid)
                self.make_series_dir(study_uid, series_uid)
                os.replace(temp, final)
                finals.append(final)
        except BaseException:
            for temp, *_ in staged:
                temp.unlink(missing_ok=True)
            raise
        return finals

    def remove_empty_dirs(self, study_uid: str, series_uid: str) -> None:
        """Remove a series directory and its study directory if nothing is left in them."""
        series_dir = self.series_dir(study_uid, series_uid)
        for directory in (series_dir, series_dir.parent):
            try:
                directory.rmdir()
            except OSError:  # not empty (or already gone): leave it
                return

    @contextmanager
    def series_lock(self, *series_uids: str) -> Iterator[None]:
        """Exclusive use of series' directories across processes (runs overlapping on one data root). Several
        series share a lock file by hash: each file is locked once, in a fixed order (no deadlock)."""
        stripes = {
            int(hashlib.sha256(require_uid(uid, "SeriesInstanceUID").encode()).hexdigest(), 16) % LOCK_STRIPES
            for uid in series_uids
        }
        (self.root / LOCK_DIR).mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        with ExitStack() as locks:
            for stripe in sorted(stripes):
                path = self.root / LOCK_DIR / f"{stripe:03d}.lock"
                handle = locks.enter_context(os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE), "r+b"))
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def sweep_temp_files(self) -> int:
        """Remove temp files left by an interrupted receive (they may hold patient data). Returns the count."""
        removed = 0
        if not self.root.is_dir():
            return 0
        for pattern in (f"{TEMP_PREFIX}*", f"*/*/{TEMP_PREFIX}*"):
            for path in self.root.glob(pattern):
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def _link_once(temp: Path, final: Path, changed: list[Path], root: Path) -> Placement:
    _make_dirs(final.parent, changed, root)
    try:
        os.link(temp, final)  # unlike rename, never replaces an existing file
    except FileExistsError:
        same = filecmp.cmp(temp, final, shallow=False)
        return Placement.ALREADY_STORED if same else Placement.DIFFERENT_COPY
    changed.insert(0, final.parent)
    return Placement.STORED


def _make_dirs(directory: Path, changed: list[Path], root: Path) -> None:
    """Create ``directory`` and missing parents up to ``root``; each created one's parent must be fsynced for the
    new entry to survive a crash."""
    missing = []
    while not directory.is_dir() and directory != root:
        missing.append(directory)
        directory = directory.parent
    for created in reversed(missing):
        try:
            created.mkdir(mode=0o700)
        except FileExistsError:
            continue
        changed.append(created.parent)


def write_failure_reason(error: OSError) -> str:
    """Why an instance could not be stored, as a receiver records it (an errno name, never a path)."""
    if error.errno in _DISK_FULL:
        return "disk full"
    return f"write failed ({errno.errorcode.get(error.errno or 0, 'I/O')})"


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (so that a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(path: Path) -> None:
    """Make everything written on the file system holding ``path`` durable: one ``syncfs`` (Linux) instead
    of an fsync per file and directory; ``sync`` where there is no ``syncfs``."""
    syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(fd)


def run_token(run_id: str) -> str:
    """A file-name-safe, deterministic token for an Airflow run id (which holds ':' and '+'):
    its sanitised text plus a hash of all of it."""
    if not run_id:
        raise ValueError("run_id must not be empty")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._")[:60] or "run"  # readers skip . and _ files
    return f"{readable}-{hashlib.sha256(run_id.encode('utf-8')).hexdigest()[:10]}"
