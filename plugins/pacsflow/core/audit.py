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
from datetime import UTC, datetime
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
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine

from pacsflow.core.db import make_engine

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

# One row per attempt of a stage (a task try): when it ran, how it ended and what it counted. The run's verdict
# and the reasons of unfinished ANs are derived from these rows, so the audit needs nothing from Airflow.
stage_attempts = Table(
    "pacsflow_stage_attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_key", String(250), nullable=False, index=True),
    Column("stage", String(32), nullable=False),
    Column("batch", Integer),
    Column("try_number", Integer),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("state", String(16), nullable=False),
    Column("error", Text),
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


class Stage(StrEnum):
    """The stages of a run, in pipeline order."""

    COHORT = "cohort"
    RESOLVE = "resolve"
    RETRIEVE = "retrieve"  # one attempt row per batch
    EXPORT = "export"
    RELEASE = "release"  # only for extractions whose release is enabled


class AttemptState(StrEnum):
    RUNNING = "running"  # still so after the run: the attempt's process died (killed, out of memory)
    SUCCESS = "success"
    FAILED = "failed"


# Why an AN has no final outcome: the work was cut short, not a verdict on the AN (resumable).
RESOLUTION_NEVER_RAN = "resolution never ran"
RESOLUTION_FAILED = "resolution task failed"
RETRIEVAL_NEVER_RAN = "retrieval never ran"
RETRIEVAL_FAILED = "retrieval task failed"
UNFINISHED_REASONS = (RESOLUTION_NEVER_RAN, RESOLUTION_FAILED, RETRIEVAL_NEVER_RAN, RETRIEVAL_FAILED)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Verdict:
    """How a run ended: ``running`` until it is settled, then ``success`` only if every stage's last attempt
    succeeded; otherwise ``failed`` with the first stage that did not and why."""

    state: str
    failed_stage: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class RunSummary:
    run_key: str
    cohort: int
    outcomes: dict[str, int]
    reasons: dict[str, int]
    series: dict[str, int]
    instances: int
    bytes: int
    verdict: Verdict
    cohort_recorded: bool = True

    @property
    def unfinished(self) -> int:
        """ANs whose processing was cut short (not a verdict on the AN: a resumable state)."""
        return sum(self.reasons.get(reason, 0) for reason in UNFINISHED_REASONS)

    @property
    def reconciled(self) -> bool:
        """Every AN of a recorded cohort has exactly one outcome (a run without its cohort never reconciles)."""
        return self.cohort_recorded and self.cohort == sum(self.outcomes.get(o.value, 0) for o in Outcome)

    @property
    def succeeded(self) -> bool:
        return self.verdict.state == AttemptState.SUCCESS and self.reconciled and not self.unfinished

    def failure_message(self) -> str:
        """Why the run did not succeed, for the task log and the UI (counts and stage names only)."""
        parts = []
        if self.verdict.failed_stage:
            parts.append(f"the run failed at stage {self.verdict.failed_stage}: {self.verdict.reason}")
        if self.unfinished:
            parts.append(
                f"{self.unfinished} of {self.cohort} ANs are unfinished; clear the failed tasks (with "
                "their downstream tasks) to resume: nothing already on disk is fetched again"
            )
        if not self.reconciled and self.cohort_recorded:
            parts.append("the audit does not reconcile: some ANs have no outcome")
        return "; ".join(parts) or "the run did not succeed"

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_key": self.run_key,
            "state": self.verdict.state,
            "failed_stage": self.verdict.failed_stage,
            "failure_reason": self.verdict.reason,
            "cohort": self.cohort,
            "outcomes": self.outcomes,
            "reasons": self.reasons,
            "series": self.series,
            "instances": self.instances,
            "bytes": self.bytes,
            "reconciled": self.reconciled,
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
    def connect(cls, url: str) -> AuditStore:
        return cls(make_engine(url))

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.engine.begin() as connection:
            yield connection

    # -- runs -----------------------------------------------------------------------------------------
    def start_run(
        self,
        run_key: str,
        *,
        dag_id: str,
        run_id: str,
        params: Mapping[str, Any],
        interval: tuple[datetime | None, datetime | None],
        run_type: str | None = None,
        triggered_by: str | None = None,
    ) -> None:
        """Record who ran what: the DAG run, how it was triggered and by whom, its params and interval."""
        values = dict(
            dag_id=dag_id,
            run_id=run_id,
            run_type=run_type,
            triggered_by=triggered_by,
            params=json.loads(json.dumps(params, default=str)),
            interval_start=interval[0],
            interval_end=interval[1],
            started_at=utcnow(),
            finished_at=None,
        )
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

    def run_row(self, run_key: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.run_key == run_key)).mappings().first()
        return dict(row) if row else None

    # -- stage attempts -------------------------------------------------------------------------------
    def begin_attempt(
        self, run_key: str, stage: Stage, *, batch: int | None = None, try_number: int | None = None
    ) -> int:
        """Record that a stage attempt started; a run the store has not seen yet (the library called without
        :meth:`start_run`) is recorded with what its key tells."""
        with self.transaction() as conn:
            if conn.execute(select(runs.c.run_key).where(runs.c.run_key == run_key)).first() is None:
                dag_id, _, run_id = run_key.rpartition("/")
                conn.execute(
                    insert(runs).values(run_key=run_key, dag_id=dag_id or None, run_id=run_id, started_at=utcnow())
                )
            return int(
                conn.execute(
                    insert(stage_attempts).values(
                        run_key=run_key,
                        stage=stage.value,
                        batch=batch,
                        try_number=try_number,
                        started_at=utcnow(),
                        state=AttemptState.RUNNING.value,
                    )
                ).inserted_primary_key[0]
            )

    def end_attempt(
        self, attempt_id: int, state: AttemptState, *, error: str | None = None, counts: Mapping[str, Any] | None = None
    ) -> None:
        with self.transaction() as conn:
            conn.execute(
                update(stage_attempts)
                .where(stage_attempts.c.id == attempt_id)
                .values(
                    state=state.value,
                    finished_at=utcnow(),
                    error=error,
                    counts=dict(counts) if counts is not None else None,
                )
            )

    def attempts(self, run_key: str) -> list[dict[str, Any]]:
        """Every stage attempt of the run, oldest first."""
        query = select(stage_attempts).where(stage_attempts.c.run_key == run_key).order_by(stage_attempts.c.id)
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

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

    def record_resolution(
        self,
        run_key: str,
        accession_number: str,
        *,
        resolution: str,
        resolved_by: str | None,
        detail: str | None,
        rules_tried: list[str],
        study_uids: Iterable[str],
        batch_of: Any,
    ) -> None:
        """Record how an AN resolved and register its studies, in one transaction (so a retry is clean)."""
        with self.transaction() as conn:
            conn.execute(
                update(accessions)
                .where(accessions.c.run_key == run_key, accessions.c.accession_number == accession_number)
                .values(
                    resolution=resolution,
                    resolved_by=resolved_by,
                    resolution_detail=detail,
                    rules_tried=rules_tried,
                    updated_at=utcnow(),
                )
            )
            rows = [
                {
                    "run_key": run_key,
                    "accession_number": accession_number,
                    "study_uid": uid,
                    "batch": batch_of(uid),
                    "listed": False,
                }
                for uid in study_uids
            ]
            if rows:
                conn.execute(insert(studies), rows)

    def study_batches(self, run_key: str) -> list[int]:
        query = select(studies.c.batch).where(studies.c.run_key == run_key).distinct().order_by(studies.c.batch)
        with self.engine.connect() as conn:
            return [row[0] for row in conn.execute(query)]

    def studies_in_batch(self, run_key: str, batch: int) -> list[dict[str, Any]]:
        query = (
            select(studies).where(studies.c.run_key == run_key, studies.c.batch == batch).order_by(studies.c.study_uid)
        )
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    # -- series ---------------------------------------------------------------------------------------
    def record_series_listing(
        self,
        run_key: str,
        accession_number: str,
        study_uid: str,
        listed: Iterable[Mapping[str, Any]],
        error: str | None = None,
    ) -> None:
        """Store the series of a study with their keep/drop decision; keeps the state of series already known."""
        with self.transaction() as conn:
            rows = [
                {
                    "run_key": run_key,
                    "study_uid": study_uid,
                    "accession_number": accession_number,
                    "updated_at": utcnow(),
                    **row,
                }
                for row in listed
            ]
            if rows:  # insert-or-ignore: two tasks listing the same study cannot collide
                conn.execute(_insert_or_ignore(conn, series), rows)
            conn.execute(
                update(studies)
                .where(
                    studies.c.run_key == run_key,
                    studies.c.study_uid == study_uid,
                    studies.c.accession_number == accession_number,
                )
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
        """Derive every AN's final outcome from its resolution, its series and the stage attempts (idempotent)."""
        book = StageBook(self.attempts(run_key))
        with self.transaction() as conn:
            for row in conn.execute(select(accessions).where(accessions.c.run_key == run_key)).mappings().all():
                outcome, reason = _outcome(conn, run_key, row, book)
                conn.execute(
                    update(accessions)
                    .where(accessions.c.run_key == run_key, accessions.c.accession_number == row["accession_number"])
                    .values(outcome=outcome, outcome_reason=reason, updated_at=utcnow())
                )

    def verdict(self, run_key: str) -> Verdict:
        run = self.run_row(run_key)
        if run is None:
            raise LookupError("no such run in the audit database")
        if run["finished_at"] is None:
            return Verdict(AttemptState.RUNNING.value)
        settings = run["params"] or {}  # the extraction's definition as the run started (see start_run)
        release_expected = bool((settings.get("release") or {}).get("enabled"))
        return StageBook(self.attempts(run_key), release_expected=release_expected).verdict(self.study_batches(run_key))

    def summary(self, run_key: str) -> RunSummary:
        """The run's counts and verdict; :class:`LookupError` for a run the audit never saw."""
        verdict = self.verdict(run_key)
        cohort_recorded = StageBook(self.attempts(run_key)).succeeded(Stage.COHORT)
        with self.engine.connect() as conn:
            where = accessions.c.run_key == run_key
            cohort = conn.execute(select(func.count()).select_from(accessions).where(where)).scalar_one()
            outcomes = dict(
                conn.execute(
                    select(accessions.c.outcome, func.count()).where(where).group_by(accessions.c.outcome)
                ).all()
            )
            reasons = dict(
                conn.execute(
                    select(accessions.c.outcome_reason, func.count())
                    .where(where, accessions.c.outcome_reason.is_not(None))
                    .group_by(accessions.c.outcome_reason)
                ).all()
            )
            series_where = series.c.run_key == run_key
            series_counts = dict(
                conn.execute(select(series.c.status, func.count()).where(series_where).group_by(series.c.status)).all()
            )
            instances, size = conn.execute(
                select(func.coalesce(func.sum(series.c.received), 0), func.coalesce(func.sum(series.c.bytes), 0)).where(
                    series_where, series.c.drop_reason.is_(None)
                )
            ).one()
        return RunSummary(
            run_key,
            cohort,
            {str(k): v for k, v in outcomes.items() if k is not None},
            reasons,
            {str(k): v for k, v in series_counts.items()},
            int(instances),
            int(size),
            verdict,
            cohort_recorded,
        )

    def accession_outcomes(self, run_key: str) -> dict[str, dict[str, Any]]:
        """Every AN of a run with its resolution and outcome (for reviewers and tests)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(accessions).where(accessions.c.run_key == run_key)).mappings()
            return {row["accession_number"]: dict(row) for row in rows}


class StageBook:
    """The last attempt of every stage (and retrieval batch) of a run: what ran, what failed, what never ran."""

    def __init__(self, attempts: Iterable[Mapping[str, Any]], *, release_expected: bool = False) -> None:
        self.release_expected = release_expected
        self.last: dict[tuple[str, int | None], Mapping[str, Any]] = {}
        for attempt in attempts:  # oldest first: a later try replaces an earlier one
            self.last[(attempt["stage"], attempt["batch"])] = attempt

    def state(self, stage: Stage, batch: int | None = None) -> str | None:
        attempt = self.last.get((stage.value, batch))
        return attempt["state"] if attempt else None

    def succeeded(self, stage: Stage, batch: int | None = None) -> bool:
        return self.state(stage, batch) == AttemptState.SUCCESS

    def verdict(self, batches: Iterable[int]) -> Verdict:
        expected = [
            (Stage.COHORT, None),
            (Stage.RESOLVE, None),
            *((Stage.RETRIEVE, b) for b in batches),
            (Stage.EXPORT, None),
        ]
        if self.release_expected:
            expected.append((Stage.RELEASE, None))
        problems = [(stage, batch) for stage, batch in expected if not self.succeeded(stage, batch)]
        if not problems:
            return Verdict(AttemptState.SUCCESS.value)
        stage, batch = problems[0]
        attempt = self.last.get((stage.value, batch))
        if attempt is None:
            why = "never ran"
        elif attempt["state"] == AttemptState.RUNNING:
            why = "interrupted: its process ended without reporting (killed, out of memory or timed out)"
        else:
            why = attempt["error"] or "failed"
        failed_batches = sum(1 for s, _ in problems if s is Stage.RETRIEVE)
        if stage is Stage.RETRIEVE:
            return Verdict(
                AttemptState.FAILED.value,
                stage.value,
                f"{failed_batches} retrieval batch(es) did not finish; batch {batch}: {why}",
            )
        return Verdict(AttemptState.FAILED.value, stage.value, why)


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


def _outcome(conn: Connection, run_key: str, accession: Mapping[str, Any], book: StageBook) -> tuple[str, str | None]:
    resolution = accession["resolution"]
    if resolution is None:
        return Outcome.FAILED, RESOLUTION_FAILED if book.state(Stage.RESOLVE) else RESOLUTION_NEVER_RAN
    if resolution == "not_found":
        return Outcome.NOT_FOUND, None
    if resolution != "resolved":
        return Outcome.FAILED, f"resolution {resolution}"
    study_rows = (
        conn.execute(
            select(studies).where(
                studies.c.run_key == run_key, studies.c.accession_number == accession["accession_number"]
            )
        )
        .mappings()
        .all()
    )
    statuses = [
        row[0]
        for row in conn.execute(
            select(series.c.status).where(
                series.c.run_key == run_key, series.c.study_uid.in_([r["study_uid"] for r in study_rows])
            )
        )
    ]
    kept = [s for s in statuses if s != SeriesStatus.DROPPED]
    all_listed = all(row["listed"] for row in study_rows)
    if all_listed and not kept:
        return Outcome.FILTERED, "every series dropped by the series rules"
    if all_listed and all(s == SeriesStatus.COMPLETE for s in kept):
        return Outcome.RETRIEVED, None
    if any(row["error"] for row in study_rows):
        return Outcome.FAILED, "series listing failed"
    if SeriesStatus.FAILED in kept:
        return Outcome.FAILED, "series failed"
    if SeriesStatus.PARTIAL in kept and all_listed and SeriesStatus.PENDING not in kept:
        return Outcome.FAILED, "series partial"
    # Work on this AN was cut short: say whether its batch never ran or its task failed.
    batches = {row["batch"] for row in study_rows}
    if any(book.state(Stage.RETRIEVE, b) is None for b in batches):
        return Outcome.FAILED, RETRIEVAL_NEVER_RAN
    return Outcome.FAILED, RETRIEVAL_FAILED


AUDIT_TABLES = {
    "runs": runs,
    "accessions": accessions,
    "studies": studies,
    "series": series,
    "stage_attempts": stage_attempts,
}


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
            records = [{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()} for row in rows]
            arrow = (
                pa.Table.from_pylist(records)
                if records
                else pa.table({c.name: pa.array([], pa.string()) for c in columns})
            )
            path = directory / f"{name}.parquet"
            pq.write_table(arrow, path.with_suffix(".parquet.tmp"))
            path.with_suffix(".parquet.tmp").replace(path)
            written[name] = path
    return written
