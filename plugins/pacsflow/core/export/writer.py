"""Parent side of the export: Hive-partitioned Parquet files of one run, staged then swapped in.

A run's files are ``<table>/study_date=<YYYY-MM-DD>/<run-token>-<n>.parquet``. They are written under
hidden temp names (``.<run-token>-<n>.parquet.tmp``, which no reader lists) and only after everything is
written does :meth:`RunOutput.commit` delete the run's previous files and rename the new ones into place,
so re-running a run replaces its rows and a failed run leaves the previous result untouched. (A crash in
the short window between deleting and renaming leaves the run without rows until it is re-run; one export
per run id at a time, as Airflow runs one try of a task at a time.)
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections import OrderedDict
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pacsflow.core.export.schema import NULL_PARTITION, PARTITION_COLUMN, TABLES, file_schema
from pacsflow.core.storage import fsync_path, run_token

COMPRESSION = "zstd"
MAX_OPEN_WRITERS = 8  # partitions with an open file at once; more partitions just means more files
_STAGED_SUFFIX = ".tmp"


def partition_name(study_date: dt.date | None) -> str:
    return f"{PARTITION_COLUMN}={study_date.isoformat() if study_date else NULL_PARTITION}"


class RunOutput:
    """The files of one run under ``root``; a context manager that removes staged files on failure."""

    def __init__(self, root: Path, run_id: str) -> None:
        self.root = root
        self.token = run_token(run_id)
        self._committed_name = re.compile(rf"{re.escape(self.token)}-[0-9]+\.parquet")
        self._staged: list[Path] = []
        self._file_numbers: dict[tuple[str, str], int] = {}

    def __enter__(self) -> RunOutput:
        self._remove(self._files(staged=True))  # left over by a run that died before its commit
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is not None:
            self._remove(self._staged)

    def new_file(self, table: str, study_date: dt.date | None) -> Path:
        """A new staged file path in the partition of ``study_date``."""
        partition = partition_name(study_date)
        number = self._file_numbers.get((table, partition), 0)
        self._file_numbers[(table, partition)] = number + 1
        directory = self.root / table / partition
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f".{self.token}-{number}.parquet{_STAGED_SUFFIX}"
        self._staged.append(path)
        return path

    def commit(self) -> list[Path]:
        """Replace the run's previous files with the staged ones; returns the final paths."""
        for path in self._staged:
            _fsync(path)
        self._remove(self._files(staged=False))
        final = [path.with_name(path.name[1 : -len(_STAGED_SUFFIX)]) for path in self._staged]
        for staged, path in zip(self._staged, final, strict=True):
            os.replace(staged, path)
        for directory in {path.parent for path in final}:
            fsync_path(directory)
        self._staged = []
        return final

    def _files(self, *, staged: bool) -> list[Path]:
        found: list[Path] = []
        for table in TABLES:
            table_dir = self.root / table
            if not table_dir.is_dir():
                continue
            for partition in table_dir.iterdir():
                if partition.is_dir() and partition.name.startswith(f"{PARTITION_COLUMN}="):
                    found.extend(path for path in partition.iterdir() if self._is_run_file(path.name, staged))
        return found

    def _is_run_file(self, name: str, staged: bool) -> bool:
        if staged:
            return (
                name.startswith(".")
                and name.endswith(_STAGED_SUFFIX)
                and self._committed_name.fullmatch(name[1 : -len(_STAGED_SUFFIX)]) is not None
            )
        return self._committed_name.fullmatch(name) is not None

    @staticmethod
    def _remove(paths: list[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


class PartitionedWriter:
    """Rows of one table, routed by study date, written in row groups with bounded memory.

    At most ``row_group_size`` rows (plus one incoming batch) are buffered over all partitions together:
    when the buffer is full the largest partition is written out as a row group. Input grouped by study
    (the usual case) therefore gives full row groups; input scattered over many dates gives smaller ones.
    """

    def __init__(self, output: RunOutput, table: str, row_group_size: int) -> None:
        if row_group_size < 1:
            raise ValueError("row_group_size must be at least 1")
        self.output, self.table, self.row_group_size = output, table, row_group_size
        self.schema = file_schema(table)
        self.rows = 0
        self._buffers: dict[dt.date | None, list[pa.RecordBatch]] = {}
        self._buffered: dict[dt.date | None, int] = {}
        self._writers: OrderedDict[dt.date | None, pq.ParquetWriter] = OrderedDict()

    def __enter__(self) -> PartitionedWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is None:
            self.flush_all()
        while self._writers:
            self._writers.popitem(last=False)[1].close()

    def add(self, batch: pa.RecordBatch) -> None:
        """Add rows carrying a ``study_date`` column (the partition key, dropped from the files)."""
        if batch.num_rows == 0:
            return
        dates = batch.column(PARTITION_COLUMN).to_pylist()
        rows = batch.drop_columns([PARTITION_COLUMN])
        if dates.count(dates[0]) == len(dates):
            self._buffer(dates[0], rows)
        else:
            for study_date in dict.fromkeys(dates):
                self._buffer(study_date, rows.take([i for i, value in enumerate(dates) if value == study_date]))
        while sum(self._buffered.values()) >= self.row_group_size:
            self._flush(max(self._buffered, key=self._buffered.__getitem__))

    def add_rows(self, study_date: dt.date | None, rows: list[dict[str, Any]]) -> None:
        """Add already aggregated rows (series, studies) to one partition."""
        self._buffer(study_date, pa.RecordBatch.from_pylist(rows, schema=self.schema))

    def flush_all(self) -> None:
        for study_date in list(self._buffers):
            self._flush(study_date)

    def _buffer(self, study_date: dt.date | None, rows: pa.RecordBatch) -> None:
        self._buffers.setdefault(study_date, []).append(rows)
        self._buffered[study_date] = self._buffered.get(study_date, 0) + rows.num_rows

    def _flush(self, study_date: dt.date | None) -> None:
        table = pa.Table.from_batches(self._buffers.pop(study_date), schema=self.schema)
        del self._buffered[study_date]
        self._writer(study_date).write_table(table, row_group_size=self.row_group_size)
        self.rows += table.num_rows

    def _writer(self, study_date: dt.date | None) -> pq.ParquetWriter:
        if study_date in self._writers:
            self._writers.move_to_end(study_date)
            return self._writers[study_date]
        if len(self._writers) >= MAX_OPEN_WRITERS:
            self._writers.popitem(last=False)[1].close()  # that partition continues in a new file
        writer = pq.ParquetWriter(self.output.new_file(self.table, study_date), self.schema, compression=COMPRESSION)
        self._writers[study_date] = writer
        return writer
