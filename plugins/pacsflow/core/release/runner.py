"""Release files in worker processes: read, hold back or de-identify, write atomically into the release root.

Each worker builds its de-identifier once; files travel in chunks and at most a few chunks are in flight,
so memory stays flat whatever the number of files. Outcomes come back as small records without values.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from pacsflow.core.export.reader import iter_chunks
from pacsflow.core.privacy import use_private_umask
from pacsflow.core.processes import default_workers, worker_context
from pacsflow.core.release.keys import ReleaseKeys
from pacsflow.core.release.profile import Deidentifier, hold_back_reason
from pacsflow.core.release.settings import ReleaseSettings
from pacsflow.core.storage import TEMP_PREFIX, StorageLayout, sync_filesystem
from pacsflow.core.uids import InvalidIdentifierError

CHUNK_SIZE = 32
_CHUNKS_IN_FLIGHT_PER_WORKER = 2


class FileOutcome(StrEnum):
    RELEASED = "released"
    HELD_BACK = "held_back"
    FAILED = "failed"


@dataclass(frozen=True)
class FileResult:
    """What happened to one source file; ``reason`` never holds a value read from the file."""

    study_uid: str  # source UIDs: from the source layout's directory names (the audit DB is internal)
    series_uid: str
    outcome: FileOutcome
    reason: str | None = None
    released_study_uid: str | None = None
    released_series_uid: str | None = None


@dataclass(frozen=True)
class ReleaseJob:
    settings: ReleaseSettings
    secret: bytes
    out_root: Path  # released files go to <out_root>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm (new UIDs)


@functools.lru_cache(maxsize=1)
def _deidentifier(job: ReleaseJob) -> Deidentifier:
    """The worker's de-identifier for ``job``, built once per process (and again only for another job)."""
    return Deidentifier(job.settings, ReleaseKeys(job.secret))


def release_chunk(job: ReleaseJob, paths: list[str]) -> list[FileResult]:
    """Release every file of ``paths`` (runs in a worker; the de-identifier is built once per process).
    Files appear by atomic rename; the caller makes them durable once at the end (:func:`release_files`)."""
    use_private_umask()  # a forkserver worker keeps the umask its server started with
    deidentifier = _deidentifier(job)
    layout = StorageLayout(job.out_root)
    results: list[FileResult] = []
    staged: list[tuple[Path, str, str, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warnings can quote element values
        for path in paths:
            result, temp = release_file(Path(path), deidentifier, layout)
            results.append(result)
            if temp is not None:
                staged.append(temp)
    try:
        layout.replace_many(staged)
    except OSError as error:
        reason = f"write failed ({errno.errorcode.get(error.errno or 0, 'I/O')})"
        return [
            FileResult(r.study_uid, r.series_uid, FileOutcome.FAILED, reason)
            if r.outcome is FileOutcome.RELEASED
            else r
            for r in results
        ]
    return results


def release_file(
    path: Path, deidentifier: Deidentifier, layout: StorageLayout
) -> tuple[FileResult, tuple[Path, str, str, str] | None]:
    """The outcome for one file and, when released, its written temp file (to commit) with its new UIDs."""
    study_uid, series_uid = path.parent.parent.name, path.parent.name
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as error:
        return FileResult(study_uid, series_uid, FileOutcome.FAILED, _read_failure(error)), None
    reason = hold_back_reason(ds, deidentifier.settings)
    if reason:
        return FileResult(study_uid, series_uid, FileOutcome.HELD_BACK, reason), None
    try:
        deidentifier.deidentify(ds)
        new_uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        temp = _write_temp(ds, layout, *new_uids)
    except InvalidIdentifierError:
        return FileResult(
            study_uid, series_uid, FileOutcome.FAILED, "missing or invalid UID after de-identification"
        ), None
    except OSError as error:
        return FileResult(
            study_uid, series_uid, FileOutcome.FAILED, f"write failed ({errno.errorcode.get(error.errno or 0, 'I/O')})"
        ), None
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        return FileResult(
            study_uid, series_uid, FileOutcome.FAILED, f"cannot de-identify ({type(error).__name__})"
        ), None
    result = FileResult(study_uid, series_uid, FileOutcome.RELEASED, None, new_uids[0], new_uids[1])
    return result, (temp, *new_uids)


def _write_temp(ds: pydicom.Dataset, layout: StorageLayout, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    layout.instance_path(study_uid, series_uid, sop_uid)  # validates the UIDs before they become a path
    directory = layout.make_series_dir(study_uid, series_uid)
    fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".dcm", dir=directory)  # 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            ds.save_as(handle, enforce_file_format=True)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return Path(temp)


def _read_failure(error: BaseException) -> str:
    if isinstance(error, InvalidDicomError):
        return "not a DICOM file"
    if isinstance(error, OSError):
        return f"cannot read the file ({errno.errorcode.get(error.errno or 0, 'I/O')})"
    return f"cannot parse the file ({type(error).__name__})"


def release_files(files: Iterable[Path], job: ReleaseJob, *, workers: int | None = None) -> Iterator[FileResult]:
    """Results for ``files`` (consumed lazily) in input order, released by ``workers`` processes (default: one
    per core; 1 in a daemonic process, such as a Celery prefork worker, which may not start children).
    The release file system is flushed once when the generator finishes, so a caller that records outcomes
    after consuming it records only durable files: a derived, re-creatable release needs no fsync per file
    (which halved the rate here)."""
    workers = default_workers(workers)
    chunks = iter_chunks(files, CHUNK_SIZE)
    yield from _results(chunks, job, workers)
    job.out_root.mkdir(parents=True, exist_ok=True)
    sync_filesystem(job.out_root)


def _results(chunks: Iterable[list[str]], job: ReleaseJob, workers: int) -> Iterator[FileResult]:
    if workers <= 1:
        for chunk in chunks:
            yield from release_chunk(job, chunk)
        return
    pool = ProcessPoolExecutor(workers, mp_context=worker_context())
    pending: deque[Future[list[FileResult]]] = deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(release_chunk, job, chunk))
            if len(pending) >= workers * _CHUNKS_IN_FLIGHT_PER_WORKER:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
