"""Where retrieved instances live on disk: ``<root>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``.

Every path component is a validated UID, so no incoming value can steer a write outside ``root``.
A file only ever appears at its final path by atomic rename after fsync, so "present" means "complete".
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pacsflow.core.uids import require_uid

SUFFIX = ".dcm"
PRIVATE_FILE_MODE, PRIVATE_DIR_MODE = 0o600, 0o700  # instances hold patient data: the service account only
TEMP_PREFIX = ".incoming-"
LOCK_DIR = ".locks"  # readers of the layout skip dot entries
LOCK_STRIPES = 256  # series share lock files by hash: no UID in a file name, a bounded number of files
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class StorageLayout:
    root: Path

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return self.root / require_uid(study_uid, "StudyInstanceUID") / require_uid(series_uid, "SeriesInstanceUID")

    def make_series_dir(self, study_uid: str, series_uid: str) -> Path:
        """Create the series directory, and its study directory, 0700 whatever the umask of this process
        (``mkdir(parents=True)`` would create the study directory with the default mode)."""
        series_dir = self.series_dir(study_uid, series_uid)
        self.root.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        for directory in (series_dir.parent, series_dir):
            directory.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
            if directory.stat().st_mode & 0o077:
                directory.chmod(PRIVATE_DIR_MODE)
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

    def commit(self, temp: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Make a complete temp file (on the layout's file system) durable, rename it into place, fsync the
        directory. The temp file is gone afterwards, also when this fails."""
        return self.commit_many([(temp, study_uid, series_uid, sop_uid)])[0]

    def commit_many(self, staged: list[tuple[Path, str, str, str]], *, sync: bool = True) -> list[Path]:
        """:meth:`commit` for several ``(temp, study, series, sop)`` at once: each directory is fsynced once
        after all renames (a series' files share one). Every temp file is gone afterwards, also on failure.
        ``sync=False``: atomic renames only, for a caller that flushes the file system once afterwards
        (:func:`sync_filesystem`) before it records the files as done."""
        finals: list[Path] = []
        try:
            for temp, *_ in staged:
                os.chmod(temp, PRIVATE_FILE_MODE)  # whoever wrote it (storescp honours the umask only)
                if sync:
                    fsync_path(temp)
            for temp, study_uid, series_uid, sop_uid in staged:
                final = self.instance_path(study_uid, series_uid, sop_uid)
                self.make_series_dir(study_uid, series_uid)
                os.replace(temp, final)
                finals.append(final)
        except BaseException:
            for temp, *_ in staged:
                temp.unlink(missing_ok=True)
            raise
        if sync:
            for directory in dict.fromkeys(final.parent for final in finals):
                fsync_path(directory)
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
    def series_lock(self, series_uid: str) -> Iterator[None]:
        """Exclusive use of a series' directory across processes (runs overlapping on one data root)."""
        stripe = int(hashlib.sha256(require_uid(series_uid, "SeriesInstanceUID").encode()).hexdigest(), 16)
        path = self.root / LOCK_DIR / f"{stripe % LOCK_STRIPES:03d}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+b") as handle:
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
