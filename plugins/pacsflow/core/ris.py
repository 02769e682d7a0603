"""The cohort query against the RIS: a SQL template with bound parameters, bounded by a time interval.

Templates are files in a template directory, chosen by a validated name; every value is bound, never
formatted into the SQL. A template must select ``accession_number`` and may select ``patient_id``,
``study_instance_uid``, ``exam_datetime`` and ``modality`` (used by the resolution fallbacks).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import BindParameter, DateTime, TextClause, bindparam, text
from sqlalchemy.engine import Engine, RowMapping

from pacsflow.core.errors import ConfigurationError

_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9_-]+\.sql")
_PARAM_NAME = re.compile(r"[a-z_][a-z0-9_]*")
# Bound by pacsflow from the run's data interval: naive UTC timestamps, and the same as 'YYYYMMDD' day text for
# a RIS that keeps dates as text (exact for intervals that start and end at midnight).
RESERVED_PARAMS = ("interval_start", "interval_end", "interval_start_yyyymmdd", "interval_end_yyyymmdd")
Scalar = str | int | float | bool | date | datetime | None


class CohortQueryError(ConfigurationError):
    """The cohort template or its parameters are unusable; the message says how to fix it."""


@dataclass(frozen=True)
class RisExam:
    """One cohort row: an Accession Number and what the RIS knows about it (for fallbacks)."""

    accession_number: str
    patient_id: str | None = None
    study_instance_uid: str | None = None
    exam_datetime: datetime | None = None
    modality: str | None = None
    problem: str | None = None  # why the row is unusable (the AN becomes ``invalid``); never quotes a value


def load_template(name: str, template_dir: Path) -> str:
    """Read the template ``name`` (a bare ``*.sql`` file name) from ``template_dir``."""
    if not _TEMPLATE_NAME.fullmatch(name):
        raise CohortQueryError(
            "cohort SQL template must be a bare file name like 'cohort.sql' (letters, digits, _ and -)"
        )
    path = template_dir / name
    if not path.is_file():
        raise CohortQueryError(f"cohort SQL template {name!r} not found in {template_dir}")
    return path.read_text(encoding="utf-8")


def query_cohort(
    engine: Engine,
    sql: str,
    *,
    interval_start: datetime,
    interval_end: datetime,
    params: Mapping[str, Any],
) -> Iterator[RisExam]:
    """Run the cohort query for ``[interval_start, interval_end)`` and stream its rows."""
    statement = _bind(
        sql,
        {
            **params,
            "interval_start": interval_start,
            "interval_end": interval_end,
            "interval_start_yyyymmdd": f"{interval_start:%Y%m%d}",
            "interval_end_yyyymmdd": f"{interval_end:%Y%m%d}",
        },
    )
    with engine.connect() as connection:
        result = connection.execution_options(stream_results=True).execute(statement)
        columns = set(result.keys())
        if "accession_number" not in columns:
            raise CohortQueryError("cohort SQL must select a column named accession_number")
        for row in result.mappings():
            yield _exam(row)


def _bind(sql: str, values: Mapping[str, Any]) -> TextClause:
    statement = text(sql)
    wanted = set(statement._bindparams)  # names the template actually uses
    missing = wanted - set(values)
    if missing:
        raise CohortQueryError(f"cohort SQL needs parameters that were not given: {sorted(missing)}")
    binds: list[BindParameter[Any]] = []
    for name in sorted(wanted):
        if not _PARAM_NAME.fullmatch(name):
            raise CohortQueryError(f"parameter name {name!r} must be lower_snake_case")
        value = values[name]
        if isinstance(value, (list, tuple)):
            if not value:
                raise CohortQueryError(f"parameter {name!r} is an empty list")
            binds.append(bindparam(name, value=list(value), expanding=True))
        elif isinstance(value, datetime):
            # Typed, so each dialect formats it the way it stores timestamps (SQLite compares text).
            binds.append(bindparam(name, value=value, type_=DateTime()))
        elif isinstance(value, Scalar):
            binds.append(bindparam(name, value=value))
        else:
            raise CohortQueryError(f"parameter {name!r} must be a scalar or a list of scalars")
    return statement.bindparams(*binds)


def _exam(row: RowMapping) -> RisExam:
    an = row["accession_number"]
    exam_datetime, problem = row.get("exam_datetime"), None
    if isinstance(exam_datetime, str):
        try:
            exam_datetime = datetime.fromisoformat(exam_datetime)
        except ValueError:
            exam_datetime, problem = None, "RIS exam_datetime is not an ISO 8601 timestamp"
    elif exam_datetime is not None and not isinstance(exam_datetime, datetime):
        exam_datetime, problem = None, "RIS exam_datetime is not a timestamp"
    return RisExam(
        accession_number="" if an is None else str(an).strip(),
        patient_id=_text(row.get("patient_id")),
        study_instance_uid=_text(row.get("study_instance_uid")),
        exam_datetime=exam_datetime,
        modality=_text(row.get("modality")),
        problem=problem,
    )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    stripped = str(value).strip()
    return stripped or None
