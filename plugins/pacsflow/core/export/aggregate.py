"""Series and study tables, aggregated from the instance rows as they stream by.

The state is per series (a few hundred bytes), never per instance: workers aggregate their chunk, the
parent merges the partial states in input order, and the study rows are derived from the series states.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pacsflow.core.export.schema import (
    PARTITION_COLUMN,
    RUN_ID,
    SERIES_ATTRIBUTES,
    SERIES_COLUMNS,
    STUDY_ATTRIBUTES,
    STUDY_COLUMNS,
    Column,
    file_schema,
)

_FIRST = frozenset(SERIES_ATTRIBUTES) | frozenset(STUDY_ATTRIBUTES)


def _min(current: Any, candidate: Any) -> Any:
    return candidate if current is None or (candidate is not None and candidate < current) else current


def _max(current: Any, candidate: Any) -> Any:
    return candidate if current is None or (candidate is not None and candidate > current) else current


@dataclass
class SeriesState:
    first: dict[str, Any] = field(default_factory=dict)
    study_date: dt.date | None = None
    has_row: bool = False
    instance_count: int = 0
    total_bytes: int = 0
    first_acquisition_datetime: dt.datetime | None = None
    last_acquisition_datetime: dt.datetime | None = None
    min_instance_number: int | None = None
    max_instance_number: int | None = None

    def add(self, row: dict[str, Any]) -> None:
        """Fold in one instance row (its ``study_date`` is the series' partition if it is the first)."""
        self.merge(
            SeriesState(
                first={name: row[name] for name in _FIRST if row[name] is not None},
                study_date=row[PARTITION_COLUMN],
                has_row=True,
                instance_count=1,
                total_bytes=row["file_size"],
                first_acquisition_datetime=row["acquisition_datetime"],
                last_acquisition_datetime=row["acquisition_datetime"],
                min_instance_number=row["instance_number"],
                max_instance_number=row["instance_number"],
            )
        )

    def merge(self, later: SeriesState) -> None:
        """Fold in the state of rows that came after this state's rows in the input."""
        for name, value in later.first.items():
            self.first.setdefault(name, value)
        if not self.has_row:
            self.study_date, self.has_row = later.study_date, later.has_row
        self.instance_count += later.instance_count
        self.total_bytes += later.total_bytes
        self.first_acquisition_datetime = _min(self.first_acquisition_datetime, later.first_acquisition_datetime)
        self.last_acquisition_datetime = _max(self.last_acquisition_datetime, later.last_acquisition_datetime)
        self.min_instance_number = _min(self.min_instance_number, later.min_instance_number)
        self.max_instance_number = _max(self.max_instance_number, later.max_instance_number)


class RunAggregate:
    """Every series of one export run, in order of first appearance."""

    def __init__(self) -> None:
        self.series: dict[str, SeriesState] = {}

    def merge(self, partial: dict[str, SeriesState]) -> None:
        for series_uid, state in partial.items():
            if series_uid in self.series:
                self.series[series_uid].merge(state)
            else:
                self.series[series_uid] = state

    def studies(self) -> dict[str, list[SeriesState]]:
        grouped: dict[str, list[SeriesState]] = {}
        for state in self.series.values():
            grouped.setdefault(state.first["study_instance_uid"], []).append(state)
        return grouped

    def series_rows(
        self, run_id: str, statuses: Mapping[str, str] | None = None
    ) -> Iterable[tuple[dt.date | None, dict[str, Any]]]:
        """(partition, row) for each series; ``statuses`` maps a SeriesInstanceUID to its retrieval status."""
        for series_uid, state in self.series.items():
            status = (statuses or {}).get(series_uid)
            row = _row(SERIES_COLUMNS, run_id, state.first, vars(state) | {"series_status": status})
            yield state.study_date, row

    def study_rows(self, run_id: str) -> Iterable[tuple[dt.date | None, dict[str, Any]]]:
        """(partition, row) for each study; attributes come from its series in order of appearance."""
        for states in self.studies().values():
            total = SeriesState()
            for state in states:
                total.merge(state)
            counts = vars(total) | {
                "modalities": sorted({state.first["modality"] for state in states if "modality" in state.first}),
                "series_count": len(states),
            }
            yield total.study_date, _row(STUDY_COLUMNS, run_id, total.first, counts)


def _row(columns: Iterable[Column], run_id: str, first: dict[str, Any], counts: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {RUN_ID.name: run_id}
    for column in columns:
        if column.name != RUN_ID.name:
            values[column.name] = first.get(column.name) if column.name in _FIRST else counts[column.name]
    return values


def table(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=file_schema(name))
