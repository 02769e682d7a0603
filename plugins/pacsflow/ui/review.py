"""The audit as an auditor reads it: runs, one run's breakdowns, its ANs and series, two runs compared.

Airflow-free (the pages in :mod:`pacsflow.ui.app` add authorization and HTML). Every list is filtered and
paginated in SQL so a 10,000-AN run costs a few small queries, and nothing returned here holds a clear AN,
patient ID or UID: ANs are their keyed reference (``an_ref``, stored at extraction), series a keyed
reference computed with the same deployment key.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Select, and_, case, func, literal, or_, select
from sqlalchemy.engine import Engine, RowMapping

from pacsflow.core.audit import (
    AuditStore,
    Outcome,
    RunSummary,
    SeriesStatus,
    Stage,
    StageBook,
    accessions,
    runs,
    series,
    stage_attempts,
)
from pacsflow.core.audit import studies as study_table
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.core.storage import StorageLayout

PAGE_SIZES = (25, 50, 100, 200)
SERIES_REF_KIND = "series"
REF_CACHE_RUNS = 8  # runs whose series references are kept in memory
RUN_STATES = ("running", "success", "failed")


@dataclass(frozen=True)
class Page:
    number: int = 1
    size: int = 50

    @classmethod
    def of(cls, number: int | None, size: int | None) -> Page:
        return cls(max(1, number or 1), size if size in PAGE_SIZES else 50)

    @property
    def offset(self) -> int:
        return (self.number - 1) * self.size


@dataclass(frozen=True)
class Paged:
    rows: list[dict[str, Any]]
    total: int
    page: Page

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page.size))


@dataclass(frozen=True)
class RunFilter:
    dag_id: str | None = None
    state: str | None = None  # running, success, failed: the audit's verdict
    started_from: date | None = None
    started_to: date | None = None  # inclusive


@dataclass
class RunRow:
    dag_id: str
    run_id: str
    run_type: str | None
    triggered_by: str | None
    interval_start: datetime | None
    interval_end: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    state: str = "running"
    failed_stage: str | None = None
    failure_reason: str | None = None
    cohort_recorded: bool = False
    cohort: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    studies_retrieved: int = 0
    bytes: int = 0

    @property
    def run_key(self) -> str:
        return f"{self.dag_id}/{self.run_id}"

    @property
    def reconciled(self) -> bool:
        """As the audit summary says it: a recorded cohort, every AN with exactly one outcome."""
        return self.cohort_recorded and self.cohort == sum(self.outcomes.get(o.value, 0) for o in Outcome)

    @property
    def duration(self) -> timedelta | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return _aware(self.finished_at) - _aware(self.started_at)

    @property
    def studies_per_hour(self) -> float | None:
        seconds = self.duration.total_seconds() if self.duration else 0
        return self.studies_retrieved * 3600 / seconds if seconds > 0 else None


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes for timezone-aware columns; the audit writes UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class AccessionFilter:
    outcome: str | None = None
    resolution: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class SeriesRef:
    ref: str
    study_uid: str
    series_uid: str


class AuditReview:
    """Read-only queries over an audit store for the review pages."""

    def __init__(self, store: AuditStore) -> None:
        self.store = store
        self._refs: dict[tuple[str, int, str], dict[str, SeriesRef]] = {}
        self._refs_lock = threading.Lock()  # requests run in the api-server's thread pool

    @property
    def engine(self) -> Engine:
        return self.store.engine

    # -- runs ---------------------------------------------------------------------------------------------
    def dag_ids(self) -> list[str]:
        with self.engine.connect() as conn:
            return [d for d in conn.execute(select(runs.c.dag_id).distinct().order_by(runs.c.dag_id)).scalars() if d]

    def runs(self, dag_ids: Iterable[str], filters: RunFilter, page: Page) -> Paged:
        """Runs of the given DAGs (the caller passes only those the user may read), newest first, each with its
        verdict and counts. A success/failed filter needs the verdicts of the finished candidates (computed
        from their stage attempts); every other filter is SQL."""
        query = select(runs).where(runs.c.dag_id.in_(list(dag_ids)))
        if filters.dag_id:
            query = query.where(runs.c.dag_id == filters.dag_id)
        if filters.started_from:
            query = query.where(runs.c.started_at >= datetime.combine(filters.started_from, time.min, UTC))
        if filters.started_to:
            end = datetime.combine(filters.started_to + timedelta(days=1), time.min, UTC)
            query = query.where(runs.c.started_at < end)
        if filters.state == "running":
            query = query.where(runs.c.finished_at.is_(None))
        elif filters.state in ("success", "failed"):
            query = query.where(runs.c.finished_at.is_not(None))
        query = query.order_by(runs.c.started_at.desc(), runs.c.run_key)
        with self.engine.connect() as conn:
            if filters.state in ("success", "failed"):
                candidates = [self._judged(_run_row(row)) for row in conn.execute(query).mappings()]
                matching = [run for run in candidates if run.state == filters.state]
                total, result = len(matching), matching[page.offset : page.offset + page.size]
            else:
                total = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
                rows = conn.execute(query.limit(page.size).offset(page.offset)).mappings().all()
                result = [self._judged(_run_row(row)) for row in rows]
            self._add_counts(conn, result)
        return Paged([{"run": r} for r in result], total, page)

    def _judged(self, run: RunRow) -> RunRow:
        """The run with the audit's verdict (running until settled) and whether its cohort was recorded."""
        verdict = self.store.verdict(run.run_key)
        run.state, run.failed_stage, run.failure_reason = verdict.state, verdict.failed_stage, verdict.reason
        run.cohort_recorded = StageBook(self.store.attempts(run.run_key)).succeeded(Stage.COHORT)
        return run

    def run(self, dag_id: str, run_id: str, *, with_counts: bool = True) -> RunRow | None:
        """One run; ``with_counts=False`` leaves out the per-run counts (the run page takes them from the
        audit summary instead)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.run_key == f"{dag_id}/{run_id}")).mappings().first()
            if row is None:
                return None
            result = self._judged(_run_row(row))
            if with_counts:
                self._add_counts(conn, [result])
        return result

    def previous_run_id(self, run: RunRow) -> str | None:
        """The run of the same extraction that started just before ``run`` (what a comparison starts from)."""
        if run.started_at is None:
            return None
        query = (
            select(runs.c.run_id)
            .where(runs.c.dag_id == run.dag_id, runs.c.started_at < run.started_at)
            .order_by(runs.c.started_at.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            return conn.execute(query).scalar()

    def run_ids(self, dag_id: str) -> list[str]:
        query = select(runs.c.run_id).where(runs.c.dag_id == dag_id).order_by(runs.c.started_at.desc())
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def _add_counts(self, conn: Any, rows: Sequence[RunRow]) -> None:
        by_key = {row.run_key: row for row in rows}
        if not by_key:
            return
        keys = list(by_key)
        for run_key, outcome, count in conn.execute(
            select(accessions.c.run_key, accessions.c.outcome, func.count())
            .where(accessions.c.run_key.in_(keys))
            .group_by(accessions.c.run_key, accessions.c.outcome)
        ):
            by_key[run_key].cohort += count
            if outcome is not None:
                by_key[run_key].outcomes[str(outcome)] = count
        retrieved = and_(
            accessions.c.run_key == study_table.c.run_key,
            accessions.c.accession_number == study_table.c.accession_number,
            accessions.c.outcome == Outcome.RETRIEVED.value,
        )
        for run_key, count in conn.execute(
            select(study_table.c.run_key, func.count(func.distinct(study_table.c.study_uid)))
            .join(accessions, retrieved)
            .where(study_table.c.run_key.in_(keys))
            .group_by(study_table.c.run_key)
        ):
            by_key[run_key].studies_retrieved = count
        for run_key, size in conn.execute(
            select(series.c.run_key, func.coalesce(func.sum(series.c.bytes), 0))
            .where(series.c.run_key.in_(keys), series.c.drop_reason.is_(None))
            .group_by(series.c.run_key)
        ):
            by_key[run_key].bytes = int(size)

    # -- one run ------------------------------------------------------------------------------------------
    def summary(self, run_key: str) -> RunSummary:
        return self.store.summary(run_key)

    def resolution_rules(self, run_key: str) -> dict[str, int]:
        """How the cohort resolved: the rule that matched for resolved ANs, the class for the others."""
        label = case(
            (accessions.c.resolution == "resolved", accessions.c.resolved_by),
            else_=func.coalesce(accessions.c.resolution, literal("unresolved")),
        )
        query = (
            select(label, func.count())
            .where(accessions.c.run_key == run_key)
            .group_by(label)
            .order_by(func.count().desc())
        )
        with self.engine.connect() as conn:
            return {str(name): count for name, count in conn.execute(query)}

    def drop_reasons(self, run_key: str) -> dict[str, int]:
        query = (
            select(series.c.drop_reason, func.count())
            .where(series.c.run_key == run_key, series.c.drop_reason.is_not(None))
            .group_by(series.c.drop_reason)
            .order_by(func.count().desc())
        )
        with self.engine.connect() as conn:
            return {str(reason): count for reason, count in conn.execute(query)}

    def accessions(self, run_key: str, filters: AccessionFilter, page: Page) -> Paged:
        columns = [
            accessions.c.an_ref,
            accessions.c.exam_datetime,
            accessions.c.modality,
            accessions.c.occurrences,
            accessions.c.resolution,
            accessions.c.resolved_by,
            accessions.c.outcome,
            accessions.c.outcome_reason,
        ]
        query = select(*columns).where(accessions.c.run_key == run_key)
        for column, value in (
            (accessions.c.outcome, filters.outcome),
            (accessions.c.resolution, filters.resolution),
            (accessions.c.outcome_reason, filters.reason),
        ):
            if value:
                query = query.where(column == value)
        return self._paged(query, page, accessions.c.an_ref)

    def accession(self, run_key: str, an_ref: str) -> dict[str, Any] | None:
        """One AN by its reference: its resolution story, outcome and series (no clear identifier)."""
        columns = [c for c in accessions.c if c.name not in ("accession_number", "patient_id", "ris_study_uid")]
        with self.engine.connect() as conn:
            query = select(*columns, accessions.c.accession_number).where(
                accessions.c.run_key == run_key, accessions.c.an_ref == an_ref
            )
            row = conn.execute(query).mappings().first()
            if row is None:
                return None
            result = dict(row)
            number = result.pop("accession_number")
            result["studies"] = conn.execute(
                select(func.count())
                .select_from(study_table)
                .where(study_table.c.run_key == run_key, study_table.c.accession_number == number)
            ).scalar_one()
            result["series"] = [
                dict(r)
                for r in conn.execute(
                    select(*_SERIES_COLUMNS)
                    .where(series.c.run_key == run_key, series.c.accession_number == number)
                    .order_by(series.c.modality, series.c.description, series.c.series_uid)
                ).mappings()
            ]
        return result

    def series_rows(self, run_key: str, status: str | None, page: Page) -> Paged:
        """The run's series in primary-key order (the index serves the page), with their AN's reference."""
        where = [series.c.run_key == run_key] + ([series.c.status == status] if status else [])
        query = (
            select(*_SERIES_COLUMNS, accessions.c.an_ref)
            .join(
                accessions,
                and_(
                    accessions.c.run_key == series.c.run_key, accessions.c.accession_number == series.c.accession_number
                ),
            )
            .where(*where)
            .order_by(series.c.study_uid, series.c.series_uid)
            .limit(page.size)
            .offset(page.offset)
        )
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(series).where(*where)).scalar_one()
            rows = [dict(r) for r in conn.execute(query).mappings()]
        return Paged(rows, total, page)

    def series_status_counts(self, run_key: str) -> dict[str, int]:
        query = select(series.c.status, func.count()).where(series.c.run_key == run_key).group_by(series.c.status)
        with self.engine.connect() as conn:
            return {str(status): count for status, count in conn.execute(query)}

    def stages(self, run_key: str) -> list[dict[str, Any]]:
        """Every stage attempt of the run in start order, labelled ``stage[batch] try n``; an attempt still
        running (or whose process died) is drawn up to now."""
        query = (
            select(stage_attempts)
            .where(stage_attempts.c.run_key == run_key)
            .order_by(stage_attempts.c.started_at, stage_attempts.c.id)
        )
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings()]
        for row in rows:
            row["label"] = (
                row["stage"]
                + (f"[{row['batch']}]" if row["batch"] is not None else "")
                + (f" try {row['try_number']}" if (row["try_number"] or 1) > 1 else "")
            )
            row["started_at"] = _aware(row["started_at"])
            row["finished_at"] = _aware(row["finished_at"]) if row["finished_at"] else datetime.now(UTC)
        return rows

    def export_rows(self, run_key: str) -> Iterable[dict[str, Any]]:
        """One row per AN for download: its reference, story and series counts (no clear identifier)."""
        per_an = (
            select(
                series.c.accession_number.label("number"),
                *[
                    func.sum(case((series.c.status == s.value, 1), else_=0)).label(f"series_{s.value}")
                    for s in SeriesStatus
                    if s is not SeriesStatus.PENDING
                ],
                func.coalesce(func.sum(series.c.received), 0).label("instances_received"),
                func.coalesce(func.sum(series.c.bytes), 0).label("bytes"),
            )
            .where(series.c.run_key == run_key)
            .group_by(series.c.accession_number)
            .subquery()
        )
        query = (
            select(
                accessions.c.an_ref,
                accessions.c.exam_datetime,
                accessions.c.modality,
                accessions.c.occurrences,
                accessions.c.resolution,
                accessions.c.resolved_by,
                accessions.c.rules_tried,
                accessions.c.resolution_detail,
                accessions.c.outcome,
                accessions.c.outcome_reason,
                *[func.coalesce(c, 0).label(c.name) for c in per_an.c if c.name != "number"],
            )
            .outerjoin(per_an, per_an.c.number == accessions.c.accession_number)
            .where(accessions.c.run_key == run_key)
            .order_by(accessions.c.an_ref)
        )
        with self.engine.connect() as conn:
            for row in conn.execute(query).mappings():
                yield dict(row)

    # -- series by reference ------------------------------------------------------------------------------
    def series_by_ref(self, run_key: str, pseudonymizer: Pseudonymizer, ref: str) -> SeriesRef | None:
        """The series of the run behind a reference. The references of a run are computed once (one keyed hash
        per series) and kept while the run's series count and the key stay the same."""
        with self.engine.connect() as conn:
            count = conn.execute(select(func.count()).where(series.c.run_key == run_key)).scalar_one()
            cache_key = (run_key, count, pseudonymizer.ref("series-reference-cache"))
            refs = self._refs.get(cache_key)
            if refs is None:
                pairs = conn.execute(select(series.c.study_uid, series.c.series_uid).where(series.c.run_key == run_key))
                refs = {}
                for study_uid, series_uid in pairs:
                    reference = series_ref(pseudonymizer, study_uid, series_uid)
                    refs[reference] = SeriesRef(reference, study_uid, series_uid)
                with self._refs_lock:
                    if len(self._refs) >= REF_CACHE_RUNS:
                        self._refs.pop(next(iter(self._refs)))
                    self._refs[cache_key] = refs
        return refs.get(ref)

    def series_detail(self, run_key: str, ref: SeriesRef) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    select(*_SERIES_COLUMNS, series.c.error, series.c.seconds, series.c.fetched, accessions.c.an_ref)
                    .join(
                        accessions,
                        and_(
                            accessions.c.run_key == series.c.run_key,
                            accessions.c.accession_number == series.c.accession_number,
                        ),
                    )
                    .where(
                        series.c.run_key == run_key,
                        series.c.study_uid == ref.study_uid,
                        series.c.series_uid == ref.series_uid,
                    )
                )
                .mappings()
                .first()
            )
        return dict(row) if row else None

    # -- two runs -----------------------------------------------------------------------------------------
    def compare(self, run_key_a: str, run_key_b: str, limit: int = 200) -> dict[str, Any]:
        """What changed from run A to run B of one extraction, AN by AN (joined on the AN in SQL)."""
        a, b = accessions.alias("a"), accessions.alias("b")
        joined = (
            select(
                b.c.an_ref,
                a.c.resolution.label("resolution_a"),
                b.c.resolution.label("resolution_b"),
                a.c.outcome.label("outcome_a"),
                b.c.outcome.label("outcome_b"),
                b.c.outcome_reason.label("reason_b"),
            )
            .join(a, and_(a.c.accession_number == b.c.accession_number, a.c.run_key == run_key_a))
            .where(b.c.run_key == run_key_b)
        )
        newly = {
            "resolved": joined.where(
                b.c.resolution == "resolved", or_(a.c.resolution.is_(None), a.c.resolution != "resolved")
            ),
            "failed": joined.where(
                b.c.outcome == Outcome.FAILED.value, or_(a.c.outcome.is_(None), a.c.outcome != Outcome.FAILED.value)
            ),
            "partial": joined.where(
                b.c.outcome_reason == f"series {SeriesStatus.PARTIAL.value}",
                or_(a.c.outcome_reason.is_(None), a.c.outcome_reason != f"series {SeriesStatus.PARTIAL.value}"),
            ),
            "retrieved": joined.where(
                b.c.outcome == Outcome.RETRIEVED.value,
                or_(a.c.outcome.is_(None), a.c.outcome != Outcome.RETRIEVED.value),
            ),
        }
        result: dict[str, Any] = {}
        with self.engine.connect() as conn:
            for name, query in newly.items():
                total = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
                rows = [dict(r) for r in conn.execute(query.order_by(b.c.an_ref).limit(limit)).mappings()]
                result[name] = {"total": total, "rows": rows}
            only = {}
            for name, (this, other) in {"only_a": (run_key_a, run_key_b), "only_b": (run_key_b, run_key_a)}.items():
                x, y = accessions.alias(), accessions.alias()
                only[name] = conn.execute(
                    select(func.count())
                    .select_from(x)
                    .outerjoin(y, and_(y.c.accession_number == x.c.accession_number, y.c.run_key == other))
                    .where(x.c.run_key == this, y.c.accession_number.is_(None))
                ).scalar_one()
            result.update(only)
        result["series"] = {
            status: (
                self.series_status_counts(run_key_a).get(status, 0),
                self.series_status_counts(run_key_b).get(status, 0),
            )
            for status in [s.value for s in SeriesStatus]
        }
        result["outcomes"] = {
            o.value: (
                self.summary(run_key_a).outcomes.get(o.value, 0),
                self.summary(run_key_b).outcomes.get(o.value, 0),
            )
            for o in Outcome
        }
        return result

    # -- helpers ------------------------------------------------------------------------------------------
    def _paged(self, query: Select, page: Page, *order: Any) -> Paged:
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
            rows = [
                dict(r) for r in conn.execute(query.order_by(*order).limit(page.size).offset(page.offset)).mappings()
            ]
        return Paged(rows, total, page)


_SERIES_COLUMNS = (
    series.c.study_uid,
    series.c.series_uid,
    series.c.modality,
    series.c.description,
    series.c.body_part,
    series.c.pacs_instance_count,
    series.c.drop_reason,
    series.c.status,
    series.c.expected,
    series.c.received,
    series.c.bytes,
)


def series_ref(pseudonymizer: Pseudonymizer, study_uid: str, series_uid: str) -> str:
    """The URL-safe keyed reference of a series (the hex part of the pseudonym)."""
    return pseudonymizer.ref(f"{study_uid}/{series_uid}", SERIES_REF_KIND).split(":", 1)[1]


def layout_of(data_root: Path) -> StorageLayout:
    return StorageLayout(data_root / "dicom")


def _run_row(row: RowMapping) -> RunRow:
    return RunRow(
        dag_id=row["dag_id"],
        run_id=row["run_id"],
        run_type=row["run_type"],
        triggered_by=row["triggered_by"],
        interval_start=row["interval_start"],
        interval_end=row["interval_end"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )
