"""The durable state and audit store: one row per run, AN, study and series, plus timed stage events.

It is the memory that makes every step retryable (what is already done is skipped) and every AN accounted
for (the summary reconciles cohort = retrieved + filtered + not found + failed). SQLAlchemy Core, so any
database works: SQLite by default, PostgreSQL in production.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine

metadata = MetaData()

runs = Table(
    "pacsflow_runs",
    metadata,
    Column("run_key", String(250), primary_key=True),
    Column("dag_id", String(250)),
    Column("run_id", String(250)),
    Column("run_type", String(32)),
    Column("triggered_by", String(250)),
    Column("params", JSON),
    Column("interval_start", DateTime(timezone=True)),
    Column("interval_end", DateTime(timezone=True)),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
)

accessions = Table(
    "pacsflow_accessions",
    metadata,
    Column("run_key", String(250), primary_key=True),
    Column("accession_number", String(64), primary_key=True),
    Column("an_ref", String(32), nullable=False),
    Column("patient_id", String(64)),
    Column("ris_study_uid", String(64)),
    Column("exam_datetime", DateTime),
    Column("modality", String(16)),
    Column("occurrences", Integer, nullable=False, default=1),
    Column("resolution", String(16)),
    Column("resolved_by", String(32)),
    Column("resolution_detail", Text),
    Column("rules_tried", JSON),
    Column("outcome", String(16)),
    Column("outcome_reason", Text),
    Column("updated_at", DateTime(timezone=True)),
)

studies = Table(
    "pacsflow_studies",
    metadata,
    Column("run_key", String(250), primary_key=True),
    Column("accession_number", String(64), primary_key=True),
    Column("study_uid", String(64), primary_key=True),
    Column("batch", Integer, nullable=False),
    Column("listed", Boolean, nullable=False, default=False),
    Column("error", Text),
)

series = Table(
    "pacsflow_series",
    metadata,
    Column("run_key", String(250), primary_key=True),
    Column("study_uid", String(64), primary_key=True),
    Column("series_uid", String(64), primary_key=True),
    Column("accession_number", String(64), nullable=False),
    Column("modality", String(16)),
    Column("description", String(128)),
    Column("body_part", String(32)),
    Column("pacs_instance_count", Integer),
    Column("drop_reason", String(32)),
    Column("status", String(16), nullable=False),
    Column("expected", Integer),
    Column("received", Integer),
    Column("fetched", Integer),
    Column("bytes", Integer),
    Column("error", Text),
    Column("seconds", JSON),
    Column("updated_at", DateTime(timezone=True)),
)

stage_events = Table(
    "pacsflow_stage_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_key", String(250), nullable=False, index=True),
    Column("stage", String(64), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("counts", JSON),
)


def accession_column_length(name: str) -> int:
    """The longest value the accessions table stores in column ``name`` (RIS values are checked against it)."""
    return accessions.c[name].type.length


class Outcome(StrEnum):
    RETRIEVED = "retrieved"
    FILTERED = "filtered"
    NOT_FOUND = "not_found"
    FAILED = "failed"


class SeriesStatus(StrEnum):
    PENDING = "pending"
    DROPPED = "dropped"
    COMPLETE = "complete"
    PARTIAL = "partial"
    FAILED = "failed"


NOT_RESOLVED = "not resolved (run interrupted before resolution)"
RETRIEVAL_UNFINISHED = "retrieval not finished"
UNFINISHED_REASONS = (NOT_RESOLVED, RETRIEVAL_UNFINISHED)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class RunSummary:
    run_key: str
    cohort: int
    outcomes: dict[str, int]
    reasons: dict[str, int]
    series: dict[str, int]
    instances: int
    bytes: int

    @property
    def unfinished(self) -> int:
        """ANs whose processing was cut short (not a verdict on the AN: a resumable state)."""
        return sum(self.reasons.get(reason, 0) for reason in UNFINISHED_REASONS)

    @property
    def reconciled(self) -> bool:
        return self.cohort == sum(self.outcomes.get(o.value, 0) for o in Outcome)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_key": self.run_key, "cohort": self.cohort, "outcomes": self.outcomes, "reasons": self.reasons,
            "series": self.series, "instances": self.instances, "bytes": self.bytes, "reconciled": self.reconciled,
            "unfinished": self.unfinished,
        }


class AuditStore:
    """Reads and writes the state tables. Create with :meth:`connect`; tables are created if absent."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        if engine.url.get_backend_name() == "sqlite" and engine.url.database not in (None, "", ":memory:"):
            Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)  # a fresh data root
        metadata.create_all(engine)

    @classmethod
    def connect(cls, url: str) -> "AuditStore":
        return cls(create_engine(url, hide_parameters=True))  # bound values stay out of errors

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "AuditStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.engine.begin() as connection:
            yield connection

    # -- runs -----------------------------------------------------------------------------------------
    def start_run(self, run_key: str, *, dag_id: str, run_id: str, params: Mapping[str, Any],
                  interval: tuple[datetime, datetime], run_type: str | None = None,
                  triggered_by: str | None = None) -> None:
        """Record who ran what: the DAG run, how it was triggered and by whom, its params and interval."""
        values = dict(dag_id=dag_id, run_id=run_id, run_type=run_type, triggered_by=triggered_by,
                      params=json.loads(json.dumps(params, default=str)),
                      interval_start=interval[0], interval_end=interval[1], started_at=utcnow(), finished_at=None)
        with self.transaction() as conn:
            if conn.execute(select(runs.c.run_key).where(runs.c.run_key == run_key)).first():
                conn.execute(update(runs).where(runs.c.run_key == run_key).values(**values))
            else:
                conn.execute(insert(runs).values(run_key=run_key, **values))

    def latest_run_key(self, dag_id: str) -> str:
        query = select(runs.c.run_key).where(runs.c.dag_id == dag_id).order_by(runs.c.started_at.desc()).limit(1)
        with self.engine.connect() as conn:
            run_key = conn.execute(query).scalar()
        if run_key is None:
            raise LookupError(f"no run of {dag_id} in the audit database")
        return run_key

    def finish_run(self, run_key: str) -> None:
        with self.transaction() as conn:
            conn.execute(update(runs).where(runs.c.run_key == run_key).values(finished_at=utcnow()))

    def record_stage(self, run_key: str, stage: str, started_at: datetime, counts: Mapping[str, Any]) -> None:
        with self.transaction() as conn:
            conn.execute(insert(stage_events).values(run_key=run_key, stage=stage, started_at=started_at,
                                                     finished_at=utcnow(), counts=dict(counts)))

    # -- accessions -----------------------------------------------------------------------------------
    def replace_cohort(self, run_key: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Store the cohort of a run, replacing a previous extraction of the same run (a task retry)."""
        with self.transaction() as conn:
            for table in (series, studies, accessions):
                conn.execute(delete(table).where(table.c.run_key == run_key))
            batch: list[dict[str, Any]] = []
            for row in rows:
                batch.append({"run_key": run_key, **row})
                if len(batch) >= 1000:
                    conn.execute(insert(accessions), batch)
                    batch = []
            if batch:
                conn.execute(insert(accessions), batch)

    def cohort_order(self, run_key: str) -> list[str]:
        """The run's ANs in a stable order (the basis of batch numbers)."""
        query = select(accessions.c.accession_number).where(accessions.c.run_key == run_key)
        with self.engine.connect() as conn:
            return list(conn.execute(query.order_by(accessions.c.accession_number)).scalars())

    def unresolved_accessions(self, run_key: str) -> list[dict[str, Any]]:
        """ANs with no resolution yet, or whose resolution failed on a PACS error (worth another try)."""
        pending = accessions.c.resolution.is_(None) | (accessions.c.resolution == "pacs_error")
        query = select(accessions).where(accessions.c.run_key == run_key, pending)
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query.order_by(accessions.c.accession_number)).mappings()]

    def record_resolution(self, run_key: str, accession_number: str, *, resolution: str, resolved_by: str | None,
                          detail: str | None, rules_tried: list[str], study_uids: Iterable[str], batch_of: Any) -> None:
        """Record how an AN resolved and register its studies, in one transaction (so a retry is clean)."""
        with self.transaction() as conn:
            conn.execute(
                update(accessions)
                .where(accessions.c.run_key == run_key, accessions.c.accession_number == accession_number)
                .values(resolution=resolution, resolved_by=resolved_by, resolution_detail=detail,
                        rules_tried=rules_tried, updated_at=utcnow())
            )
            rows = [{"run_key": run_key, "accession_number": accession_number, "study_uid": uid,
                     "batch": batch_of(uid), "listed": False} for uid in study_uids]
            if rows:
                conn.execute(insert(studies), rows)

    def study_batches(self, run_key: str) -> list[int]:
        query = select(studies.c.batch).where(studies.c.run_key == run_key).distinct().order_by(studies.c.batch)
        with self.engine.connect() as conn:
            return [row[0] for row in conn.execute(query)]

    def studies_in_batch(self, run_key: str, batch: int) -> list[dict[str, Any]]:
        query = (select(studies).where(studies.c.run_key == run_key, studies.c.batch == batch)
                 .order_by(studies.c.study_uid))
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    # -- series ---------------------------------------------------------------------------------------
    def record_series_listing(self, run_key: str, accession_number: str, study_uid: str,
                              listed: Iterable[Mapping[str, Any]], error: str | None = None) -> None:
        """Store the series of a study with their keep/drop decision; keeps the state of series already known."""
        with self.transaction() as conn:
            rows = [{"run_key": run_key, "study_uid": study_uid, "accession_number": accession_number,
                     "updated_at": utcnow(), **row} for row in listed]
            if rows:  # insert-or-ignore: two tasks listing the same study cannot collide
                conn.execute(_insert_or_ignore(conn, series), rows)
            conn.execute(
                update(studies)
                .where(studies.c.run_key == run_key, studies.c.study_uid == study_uid,
                       studies.c.accession_number == accession_number)
                .values(listed=error is None, error=error)
            )

    def series_of_study(self, run_key: str, study_uid: str) -> list[dict[str, Any]]:
        query = select(series).where(series.c.run_key == run_key, series.c.study_uid == study_uid)
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query.order_by(series.c.series_uid)).mappings()]

    def update_series(self, run_key: str, study_uid: str, series_uid: str, **values: Any) -> None:
        with self.transaction() as conn:
            conn.execute(
                update(series)
                .where(series.c.run_key == run_key, series.c.study_uid == study_uid, series.c.series_uid == series_uid)
                .values(updated_at=utcnow(), **values)
            )

    def series_rows(self, run_key: str, *, kept: bool | None = None) -> list[dict[str, Any]]:
        """The run's series: all of them, only those the rules kept, or only the dropped ones."""
        query = select(series).where(series.c.run_key == run_key)
        if kept is not None:
            query = query.where(series.c.drop_reason.is_(None) if kept else series.c.drop_reason.is_not(None))
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query.order_by(series.c.series_uid)).mappings()]

    # -- outcomes -------------------------------------------------------------------------------------
    def settle_outcomes(self, run_key: str) -> None:
        """Derive every AN's final outcome from its resolution and its series (idempotent)."""
        with self.transaction() as conn:
            for row in conn.execute(select(accessions).where(accessions.c.run_key == run_key)).mappings().all():
                outcome, reason = _outcome(conn, run_key, row)
                conn.execute(
                    update(accessions)
                    .where(accessions.c.run_key == run_key, accessions.c.accession_number == row["accession_number"])
                    .values(outcome=outcome, outcome_reason=reason, updated_at=utcnow())
                )

    def summary(self, run_key: str) -> RunSummary:
        with self.engine.connect() as conn:
            where = accessions.c.run_key == run_key
            cohort = conn.execute(select(func.count()).select_from(accessions).where(where)).scalar_one()
            outcomes = dict(conn.execute(
                select(accessions.c.outcome, func.count()).where(where).group_by(accessions.c.outcome)).all())
            reasons = dict(conn.execute(
                select(accessions.c.outcome_reason, func.count())
                .where(where, accessions.c.outcome_reason.is_not(None)).group_by(accessions.c.outcome_reason)).all())
            series_where = series.c.run_key == run_key
            series_counts = dict(conn.execute(
                select(series.c.status, func.count()).where(series_where).group_by(series.c.status)).all())
            instances, size = conn.execute(
                select(func.coalesce(func.sum(series.c.received), 0), func.coalesce(func.sum(series.c.bytes), 0))
                .where(series_where, series.c.drop_reason.is_(None))).one()
        return RunSummary(run_key, cohort, {str(k): v for k, v in outcomes.items()}, reasons,
                          {str(k): v for k, v in series_counts.items()}, int(instances), int(size))

    def accession_outcomes(self, run_key: str) -> dict[str, dict[str, Any]]:
        """Every AN of a run with its resolution and outcome (for reviewers and tests)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(accessions).where(accessions.c.run_key == run_key)).mappings()
            return {row["accession_number"]: dict(row) for row in rows}


def _insert_or_ignore(conn: Connection, table: Table) -> Any:
    """An INSERT that skips rows whose primary key exists (SQLite and PostgreSQL; others: plain INSERT)."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif dialect in ("mysql", "mariadb"):
        return insert(table).prefix_with("IGNORE")
    else:
        return insert(table)
    return dialect_insert(table).on_conflict_do_nothing(index_elements=[c.name for c in table.primary_key])


def _outcome(conn: Connection, run_key: str, accession: Mapping[str, Any]) -> tuple[str, str | None]:
    resolution = accession["resolution"]
    if resolution is None:
        return Outcome.FAILED, NOT_RESOLVED
    if resolution == "not_found":
        return Outcome.NOT_FOUND, None
    if resolution != "resolved":
        return Outcome.FAILED, f"resolution {resolution}"
    study_rows = conn.execute(select(studies).where(
        studies.c.run_key == run_key, studies.c.accession_number == accession["accession_number"])).mappings().all()
    if any(not row["listed"] for row in study_rows):
        return Outcome.FAILED, "series listing failed"
    statuses = [row[0] for row in conn.execute(select(series.c.status).where(
        series.c.run_key == run_key, series.c.study_uid.in_([r["study_uid"] for r in study_rows])))]
    kept = [s for s in statuses if s != SeriesStatus.DROPPED]
    if not kept:
        return Outcome.FILTERED, "every series dropped by the series rules"
    if all(s == SeriesStatus.COMPLETE for s in kept):
        return Outcome.RETRIEVED, None
    if SeriesStatus.PENDING in kept:
        return Outcome.FAILED, RETRIEVAL_UNFINISHED
    worst = SeriesStatus.FAILED if SeriesStatus.FAILED in kept else SeriesStatus.PARTIAL
    return Outcome.FAILED, f"series {worst}"


AUDIT_TABLES = {"runs": runs, "accessions": accessions, "studies": studies, "series": series,
                "stage_events": stage_events}


def export_run_audit(store: AuditStore, run_key: str, directory: Path) -> dict[str, Path]:
    """Write the run's audit rows as one Parquet file per table in ``directory`` (replaced on re-run).

    The RIS PatientID is left out: the audit export travels further than the audit database.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    with store.engine.connect() as conn:
        for name, table in AUDIT_TABLES.items():
            columns = [c for c in table.c if c.name != "patient_id"]
            rows = conn.execute(select(*columns).where(table.c.run_key == run_key)).mappings().all()
            records = [{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()}
                       for row in rows]
            arrow = pa.Table.from_pylist(records) if records else pa.table({c.name: pa.array([], pa.string())
                                                                             for c in columns})
            path = directory / f"{name}.parquet"
            pq.write_table(arrow, path.with_suffix(".parquet.tmp"))
            path.with_suffix(".parquet.tmp").replace(path)
            written[name] = path
    return written
