"""Parquet metadata export: instances, series and studies tables of a run, Hive-partitioned by study date.

Schema: ``include/schemas/metadata_v1.json`` (documented in ``include/schemas/README.md``), defined in
:mod:`pacsflow.core.export.schema`. Headers are read in worker processes (never the pixel data), rows are
streamed into row groups with bounded memory, and a re-run of the same ``run_id`` replaces its files.

    report = export_instances(paths, Path("metadata"), "scheduled__2026-11-22T02:00:00+00:00")
    open_dataset(Path("metadata"), "instances").to_table()   # or DuckDB read_parquet(..., hive_partitioning=true)
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from pacsflow.core.export.aggregate import RunAggregate
from pacsflow.core.export.reader import ChunkResult, iter_chunks, read_chunk
from pacsflow.core.export.schema import (
    PARTITION_COLUMN,
    PARTITION_TYPE,
    SCHEMA_VERSION,
    TABLES,
    dataset_schema,
    schema_document,
)
from pacsflow.core.export.writer import PartitionedWriter, RunOutput
from pacsflow.core.processes import default_workers, worker_context
from pacsflow.core.storage import run_token

__all__ = [
    "DEFAULT_ROW_GROUP_SIZE",
    "SCHEMA_VERSION",
    "ExportReport",
    "export_instances",
    "open_dataset",
    "run_token",
    "schema_document",
]

log = logging.getLogger(__name__)

DEFAULT_ROW_GROUP_SIZE = 10_000
CHUNK_SIZE = 64  # files per task sent to a worker: amortises the inter-process round trip
_CHUNKS_IN_FLIGHT_PER_WORKER = 2  # bounds the rows waiting in the pipe (memory) while keeping workers busy


@dataclass
class ExportReport:
    run_id: str
    instances: int = 0
    series: int = 0
    studies: int = 0
    rejected: list[tuple[Path, str]] = field(default_factory=list)  # reasons carry no patient data
    paths: list[Path] = field(default_factory=list)  # Parquet files written by this run
    bytes_written: int = 0  # size of those files
    input_bytes: int = 0  # size of the DICOM files exported


def export_instances(
    files: Iterable[Path],
    out_dir: Path,
    run_id: str,
    *,
    workers: int | None = None,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    include_private: bool = False,
    series_status: Mapping[str, str] | None = None,
) -> ExportReport:
    """Export the headers of ``files`` under the dataset root ``out_dir`` as the rows of run ``run_id``.

    ``files`` is consumed lazily (it may be a generator of 100k paths). ``workers`` processes read the
    headers (default: one per core, or 1 inside a daemonic process; 1 reads in this process). With
    ``include_private`` the ``private_tags`` column holds the text-valued private elements; otherwise it is null.
    ``series_status`` maps SeriesInstanceUID to the series' retrieval status in the audit (the series table's
    ``series_status``).
    """
    report = ExportReport(run_id)
    aggregate = RunAggregate()
    workers = default_workers(workers)
    with RunOutput(Path(out_dir), run_id) as output:
        with PartitionedWriter(output, "instances", row_group_size) as instances:
            for chunk in _read_chunks(files, run_id, workers, include_private):
                report.rejected.extend((Path(path), reason) for path, reason in chunk.rejected)
                aggregate.merge(chunk.series)
                instances.add(chunk.batch)
        report.instances = instances.rows
        report.input_bytes = sum(state.total_bytes for state in aggregate.series.values())
        report.series = _write_aggregate(output, "series", aggregate.series_rows(run_id, series_status), row_group_size)
        report.studies = _write_aggregate(output, "studies", aggregate.study_rows(run_id), row_group_size)
        report.paths = output.commit()
    report.bytes_written = sum(path.stat().st_size for path in report.paths)
    log.info(  # the run id tells the run's own export from its release's (a keyed label): both log this line
        "Parquet metadata of %s: %d instances, %d series, %d studies, %d files rejected, %d Parquet files (%d bytes)",
        run_id,
        report.instances,
        report.series,
        report.studies,
        len(report.rejected),
        len(report.paths),
        report.bytes_written,
    )
    return report


def _write_aggregate(
    output: RunOutput, table: str, rows: Iterable[tuple[dt.date | None, dict[str, Any]]], row_group_size: int
) -> int:
    by_partition: dict[dt.date | None, list[dict[str, Any]]] = {}
    for study_date, row in rows:
        by_partition.setdefault(study_date, []).append(row)
    with PartitionedWriter(output, table, row_group_size) as writer:
        for study_date, partition_rows in by_partition.items():
            writer.add_rows(study_date, partition_rows)
    return writer.rows


def _read_chunks(files: Iterable[Path], run_id: str, workers: int, include_private: bool) -> Iterator[ChunkResult]:
    """Chunk results in input order, read by ``workers`` processes with a bounded number in flight."""
    chunks = iter_chunks(files, CHUNK_SIZE)
    if workers <= 1:
        for chunk in chunks:
            yield read_chunk(chunk, run_id, include_private)
        return
    pool = ProcessPoolExecutor(workers, mp_context=worker_context())
    pending: deque[Future[ChunkResult]] = deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(read_chunk, chunk, run_id, include_private))
            if len(pending) >= workers * _CHUNKS_IN_FLIGHT_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def open_dataset(out_dir: Path, table: str = "instances") -> ds.Dataset:
    """``table`` of the dataset at ``out_dir`` as a pyarrow dataset, ``study_date`` typed as a date."""
    if table not in TABLES:
        raise ValueError(f"table must be one of {', '.join(TABLES)}")
    partitioning = ds.partitioning(pa.schema([(PARTITION_COLUMN, PARTITION_TYPE)]), flavor="hive")
    return ds.dataset(Path(out_dir) / table, format="parquet", partitioning=partitioning, schema=dataset_schema(table))
