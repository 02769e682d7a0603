"""The audit store: reads and writes the state tables (see :mod:`.schema`).

It is the memory that makes every step retryable (what is already done is skipped) and every AN accounted
for (the summary reconciles cohort = retrieved + filtered + not found + failed). SQLAlchemy Core, so any
database works: SQLite by default, PostgreSQL in production.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Insert, Table, delete, func, insert, select, update
from sqlalchemy.engine import Connection, Engine

from pacsflow.core.audit.migrate import ensure_current_schema
from pacsflow.core.audit.outcome import AttemptState, RunSummary, Stage, StageBook, Verdict, accession_outcome
from pacsflow.core.audit.schema import AUDIT_TABLES, accessions, runs, series, stage_attempts, studies
from pacsflow.core.db import make_engine


def utcnow() -> datetime:
    return datetime.now(UTC)


class AuditStore:
    """Reads and writes the state tables. Create with :meth:`connect`; a database whose schema is behind is
    brought to the current one first (see :func:`~pacsflow.core.audit.migrate.ensure_current_schema`)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        ensure_current_schema(engine)

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
        values = {
            "dag_id": dag_id,
            "run_id": run_id,
            "run_type": run_type,
            "triggered_by": triggered_by,
            "params": json.loads(json.dumps(params, default=str)),
            "interval_start": interval[0],
            "interval_end": interval[1],
            "started_at": utcnow(),
            "finished_at": None,
        }
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
        return str(run_key)

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
            inserted = conn.execute(
                insert(stage_attempts).values(
                    run_key=run_key,
                    stage=stage.value,
                    batch=batch,
                    try_number=try_number,
                    started_at=utcnow(),
                    state=AttemptState.RUNNING.value,
                )
            ).inserted_primary_key
            if inserted is None:
                raise RuntimeError("the database returned no id for the new stage attempt")
            return int(inserted[0])

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
        batch_of: Callable[[str], int],
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
            outcomes: dict[str | None, int] = dict(
                conn.execute(
                    select(accessions.c.outcome, func.count()).where(where).group_by(accessions.c.outcome)
                ).all()
            )
            reasons: dict[str, int] = dict(
                conn.execute(
                    select(accessions.c.outcome_reason, func.count())
                    .where(where, accessions.c.outcome_reason.is_not(None))
                    .group_by(accessions.c.outcome_reason)
                ).all()
            )
            series_where = series.c.run_key == run_key
            series_counts: dict[str, int] = dict(
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


def _insert_or_ignore(conn: Connection, table: Table) -> Insert:
    """An INSERT that skips rows whose primary key exists (SQLite and PostgreSQL; others: plain INSERT)."""
    dialect = conn.dialect.name
    key = [c.name for c in table.primary_key]
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing(index_elements=key)
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert(table).on_conflict_do_nothing(index_elements=key)
    if dialect in ("mysql", "mariadb"):
        return insert(table).prefix_with("IGNORE")
    return insert(table)


def _outcome(conn: Connection, run_key: str, accession: Mapping[Any, Any], book: StageBook) -> tuple[str, str | None]:
    """Read what the outcome rules need about one AN and apply them."""
    if accession["resolution"] != "resolved":  # nothing retrieved: the rules need no studies
        return accession_outcome(accession, [], [], book)
    study_rows = (
        conn.execute(
            select(studies).where(
                studies.c.run_key == run_key, studies.c.accession_number == accession["accession_number"]
            )
        )
        .mappings()
        .all()
    )
    statuses = conn.execute(
        select(series.c.status).where(
            series.c.run_key == run_key, series.c.study_uid.in_([r["study_uid"] for r in study_rows])
        )
    ).scalars()
    return accession_outcome(accession, study_rows, statuses, book)


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
