"""The extraction stages as plain functions over the audit store: the Airflow operators call these, and so
can a script or a benchmark. Each stage is idempotent: it skips what the store says is already done.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacsflow.core.audit import AttemptState, AuditStore, RunSummary, Stage, accession_column_length
from pacsflow.core.dicom.errors import PacsTransientError
from pacsflow.core.errors import ConfigurationError, describe_error
from pacsflow.core.export import export_instances
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.core.progress import Progress
from pacsflow.core.resolve import Resolution, ResolutionSettings, resolve_accession
from pacsflow.core.retrieval import (
    PACS_DOWN_AFTER,
    Destination,
    PacsClientLike,
    PacsHealth,
    RetrievalSettings,
    RetryableSeriesError,
    SeriesRetrieval,
)
from pacsflow.core.retry import RetryPolicy
from pacsflow.core.ris import RisExam
from pacsflow.core.series_rules import SeriesRules
from pacsflow.core.storage import StorageLayout

__all__ = [
    "MAX_BATCHES",
    "PACS_DOWN_AFTER",
    "ClientFactory",
    "ExtractionSettings",
    "PacsClientLike",
    "RetryableResolutionError",
    "RunContext",
    "effective_batch_size",
    "export_metadata",
    "extract_cohort",
    "resolve_cohort",
    "retrieve_batch",
    "retrieved_files",
    "run_extraction",
    "settle_run",
    "stage_attempt",
]

log = logging.getLogger("pacsflow")

MAX_BATCHES = 500  # Airflow's max_map_length is 1024; stay well below it
DEFAULT_RETRIEVAL = RetrievalSettings()


ClientFactory = Callable[[], AbstractContextManager[PacsClientLike]]


@dataclass(frozen=True)
class RunContext:
    store: AuditStore
    run_key: str
    pseudonymizer: Pseudonymizer
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    try_number: int | None = None


@contextmanager
def stage_attempt(ctx: RunContext, stage: Stage, *, batch: int | None = None) -> Iterator[dict[str, Any]]:
    """Record one attempt of a stage: started, then success with the counts the body fills in, or failed with
    a reason free of patient data. The run's verdict is derived from these records."""
    attempt = ctx.store.begin_attempt(ctx.run_key, stage, batch=batch, try_number=ctx.try_number)
    counts: dict[str, Any] = {}
    try:
        yield counts
    except BaseException as error:
        try:
            ctx.store.end_attempt(attempt, AttemptState.FAILED, error=describe_error(error), counts=counts)
        except Exception:  # the audit database itself may be what failed; keep the original error
            log.warning("could not record the failed %s attempt in the audit database", stage.value)
        raise
    ctx.store.end_attempt(attempt, AttemptState.SUCCESS, counts=counts)


# -- stage 1: cohort ----------------------------------------------------------------------------------
def extract_cohort(
    ctx: RunContext, exams: Callable[[], Iterable[RisExam]], batch_size: int, *, max_size: int | None = None
) -> dict[str, int]:
    """Store the de-duplicated cohort and assign each AN to a batch. Returns counts only. ``exams`` is called
    inside the stage's attempt, so a RIS that cannot be reached or a template that cannot be read is recorded."""
    with stage_attempt(ctx, Stage.COHORT) as counts:
        unique: dict[str, dict[str, Any]] = {}
        rows = 0
        for exam in exams():
            rows += 1
            known = unique.get(exam.accession_number)
            if known:
                known["occurrences"] += 1
                continue
            if max_size is not None and len(unique) >= max_size:
                raise ConfigurationError(
                    f"the cohort has more than {max_size} distinct ANs (cohort.max_size): check the template and "
                    "the run's data interval, or raise the limit"
                )
            unique[exam.accession_number] = _cohort_row(ctx, exam)
        ctx.store.replace_cohort(ctx.run_key, unique.values())
        invalid = sum(1 for row in unique.values() if row.get("resolution") == Resolution.INVALID)
        batches = math.ceil(len(unique) / effective_batch_size(len(unique), batch_size)) if unique else 0
        counts.update(
            ris_rows=rows, accessions=len(unique), duplicates=rows - len(unique), invalid=invalid, batches=batches
        )
    if invalid:
        log.warning("cohort: %d ANs invalid in the RIS (reasons in the audit)", invalid)
    log.info(
        "cohort: %(ris_rows)d RIS rows, %(accessions)d distinct ANs (%(duplicates)d duplicate rows), "
        "%(batches)d retrieval batches",
        counts,
    )
    if not unique:
        log.warning(
            "the cohort is empty: if this interval should hold exams, check the template's date "
            "comparison (bound values and their types are logged above)"
        )
    return counts


def _cohort_row(ctx: RunContext, exam: RisExam) -> dict[str, Any]:
    """The AN's audit row; a RIS value that does not fit its column makes the AN ``invalid`` with the reason
    (the value is left out) instead of failing the whole cohort on insert."""
    problems = [exam.problem] if exam.problem else []
    values = {"patient_id": exam.patient_id, "ris_study_uid": exam.study_instance_uid, "modality": exam.modality}
    for name, value in values.items():
        limit = accession_column_length(name)
        if value is not None and len(value) > limit:
            problems.append(f"RIS {name} longer than {limit} characters")
            values[name] = None
    accession_number = exam.accession_number
    if len(accession_number) > accession_column_length("accession_number"):
        problems.append(f"RIS accession_number longer than {accession_column_length('accession_number')} characters")
        accession_number = ctx.pseudonymizer.ref(exam.accession_number)  # the row's key, never the raw value
    row: dict[str, Any] = {
        "accession_number": accession_number,
        "an_ref": ctx.pseudonymizer.ref(exam.accession_number),
        "exam_datetime": exam.exam_datetime.replace(tzinfo=None) if exam.exam_datetime else None,
        "occurrences": 1,
        **values,
        # every row has the same keys: the cohort is inserted in multi-row batches
        "resolution": Resolution.INVALID.value if problems else None,
        "resolution_detail": "; ".join(problems) if problems else None,
    }
    return row


def effective_batch_size(cohort_size: int, batch_size: int) -> int:
    """The requested batch size, grown when needed so a run never maps more than MAX_BATCHES tasks."""
    return max(batch_size, math.ceil(cohort_size / MAX_BATCHES), 1)


# -- stage 2: resolution ------------------------------------------------------------------------------
def resolve_cohort(ctx: RunContext, connect: ClientFactory, settings: ResolutionSettings, batch_size: int) -> list[int]:
    """Resolve every AN not yet resolved; returns the batch numbers that hold studies to retrieve."""
    with stage_attempt(ctx, Stage.RESOLVE) as counts:
        cohort = ctx.store.cohort_order(ctx.run_key)
        size = effective_batch_size(len(cohort), batch_size)
        batch_of_an = {an: index // size for index, an in enumerate(cohort)}
        pending = ctx.store.unresolved_accessions(ctx.run_key)
        health = PacsHealth()
        progress = Progress("resolution", len(pending), "ANs")
        with connect() as client:
            for row in pending:
                values = _resolve_one(ctx, client, _exam_from_row(row), settings, health)
                ctx.store.record_resolution(
                    ctx.run_key,
                    row["accession_number"],
                    batch_of=_constant(batch_of_an[row["accession_number"]]),
                    **values,
                )
                key = values["resolution"] + (f" by {values['resolved_by']}" if values["resolved_by"] else "")
                counts[key] = counts.get(key, 0) + 1
                log.debug("resolved %s: %s", row["an_ref"], key)
                progress.advance(detail=counts)
        counts["already resolved"] = len(cohort) - len(pending)
        log.info("resolution of %d ANs done: %s", len(cohort), _readable(counts))
        if counts.get(Resolution.PACS_ERROR.value):
            raise RetryableResolutionError(counts[Resolution.PACS_ERROR.value], len(pending))
    return ctx.store.study_batches(ctx.run_key)


class RetryableResolutionError(PacsTransientError):
    """ANs whose C-FIND failed on a transient PACS error; raised once every other AN is resolved, so that
    Airflow's retry asks the PACS again for those only (they stay ``pacs_error`` in the audit until then)."""

    def __init__(self, failed: int, asked: int) -> None:
        super().__init__(
            f"{failed} of {asked} ANs could not be resolved because of a transient PACS error (association "
            "failed or timed out); the task fails so that its retry asks again for those ANs only"
        )


def _resolve_one(
    ctx: RunContext, client: PacsClientLike, exam: RisExam, settings: ResolutionSettings, health: PacsHealth
) -> dict[str, Any]:
    try:
        result = ctx.retry.call(lambda: resolve_accession(client, exam, settings))
        health.ok()
    except PacsTransientError as error:
        health.failed(error)
        return {
            "resolution": Resolution.PACS_ERROR.value,
            "resolved_by": None,
            "detail": str(error),
            "rules_tried": [],
            "study_uids": (),
        }
    return {
        "resolution": result.resolution.value,
        "resolved_by": result.rule.value if result.rule else None,
        "detail": result.detail,
        "rules_tried": list(result.attempts),
        "study_uids": result.study_uids if result.resolution is Resolution.RESOLVED else (),
    }


def _readable(counts: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(counts.items()) if value) or "nothing to do"


def _constant(batch: int) -> Callable[[str], int]:
    """Every study of one AN goes to the AN's batch."""
    return lambda _study_uid: batch


def _exam_from_row(row: dict[str, Any]) -> RisExam:
    return RisExam(
        accession_number=row["accession_number"],
        patient_id=row["patient_id"],
        study_instance_uid=row["ris_study_uid"],
        exam_datetime=row["exam_datetime"],
        modality=row["modality"],
    )


# -- stage 3 and 4: series listing, filtering, verified retrieval (core/retrieval.py) ---------------
def retrieve_batch(
    ctx: RunContext,
    batch: int,
    connect: ClientFactory,
    *,
    rules: SeriesRules,
    layout: StorageLayout,
    destination_ae: str,
    receiver: Callable[[], AbstractContextManager[Any]] = nullcontext,
    settings: RetrievalSettings = DEFAULT_RETRIEVAL,
) -> dict[str, int]:
    """List, filter and retrieve every study of one batch, verifying each series instance by instance.

    Series left incomplete for a reason a retry could fix fail the task once the rest of the batch is done
    (:class:`RetryableSeriesError`, counts only), so Airflow's retry fetches only what is missing; series no
    retry can fix are recorded (``partial``/``failed`` with their reason) and do not fail it."""
    with stage_attempt(ctx, Stage.RETRIEVE, batch=batch) as recorded:
        layout.root.mkdir(parents=True, exist_ok=True)
        studies = ctx.store.studies_in_batch(ctx.run_key, batch)
        progress = Progress(f"batch {batch}", len(studies), "studies")
        with receiver() as incoming, connect() as client:
            retrieval = SeriesRetrieval(
                store=ctx.store,
                run_key=ctx.run_key,
                retry=ctx.retry,
                client=client,
                rules=rules,
                layout=layout,
                settings=settings,
                destination=Destination(destination_ae)
                if incoming is None
                else Destination(destination_ae, incoming.settle),
            )
            counts = retrieval.counts
            for study in studies:
                size_before = counts.bytes_fetched
                retrieval.study(study)
                progress.advance(
                    size=counts.bytes_fetched - size_before,
                    detail=f"series complete {counts.complete}, partial {counts.partial}, "
                    f"failed {counts.failed}, dropped {counts.series_dropped}",
                )
            retrieval.finish()
        recorded.update(counts.as_dict())
        log.info("batch %d done: %s", batch, _readable(counts.as_dict()))
        if counts.retryable:
            raise RetryableSeriesError(batch, counts)
    return counts.as_dict()


# -- stage 5 and 6: files for export, summary ------------------------------------------------------
def retrieved_files(ctx: RunContext, layout: StorageLayout) -> Iterator[Path]:
    """Paths of every instance of the run's kept series that is on disk."""
    for row in ctx.store.series_rows(ctx.run_key, kept=True):
        for sop_uid in sorted(layout.stored_sop_uids(row["study_uid"], row["series_uid"])):
            yield layout.instance_path(row["study_uid"], row["series_uid"], sop_uid)


def export_metadata(ctx: RunContext, layout: StorageLayout, metadata_dir: Path, run_id: str) -> dict[str, Any]:
    """Stage 5: the Parquet metadata of the run's retrieved instances (a re-run replaces the run's rows)."""
    with stage_attempt(ctx, Stage.EXPORT) as counts:
        statuses = {row["series_uid"]: row["status"] for row in ctx.store.series_rows(ctx.run_key, kept=True)}
        report = export_instances(retrieved_files(ctx, layout), metadata_dir, run_id, series_status=statuses)
        counts.update(
            instances=report.instances, series=report.series, studies=report.studies, rejected=len(report.rejected)
        )
    for reason, count in Counter(reason for _, reason in report.rejected).items():
        log.warning("export skipped %d file(s): %s", count, reason)
    return counts


def settle_run(ctx: RunContext) -> RunSummary:
    """Derive every AN's outcome, close the run and return its summary and verdict."""
    ctx.store.settle_outcomes(ctx.run_key)
    ctx.store.finish_run(ctx.run_key)
    return ctx.store.summary(ctx.run_key)


@dataclass(frozen=True)
class ExtractionSettings:
    """Everything a whole extraction needs besides the RIS rows and the PACS: what the DAG's params carry."""

    resolution: ResolutionSettings
    rules: SeriesRules
    layout: StorageLayout
    destination_ae: str
    metadata_dir: Path
    batch_size: int = 50


def run_extraction(
    ctx: RunContext,
    exams: Iterable[RisExam],
    connect: ClientFactory,
    settings: ExtractionSettings,
    receiver: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> RunSummary:
    """Every stage in one process, in the DAG's order (for scripts and for measuring Airflow's overhead). As in
    the DAG, a batch left with series a retry could finish is recorded as failed and the other stages still run
    (the summary then says the run failed; running it again fetches only what is missing)."""
    extract_cohort(ctx, lambda: exams, settings.batch_size)
    try:
        batches = resolve_cohort(ctx, connect, settings.resolution, settings.batch_size)
    except RetryableResolutionError as error:  # no task retry here: go on with what resolved
        log.warning("%s", error)
        batches = ctx.store.study_batches(ctx.run_key)
    for batch in batches:
        try:
            retrieve_batch(
                ctx,
                batch,
                connect,
                rules=settings.rules,
                layout=settings.layout,
                destination_ae=settings.destination_ae,
                receiver=receiver,
            )
        except RetryableSeriesError as error:
            log.warning("%s", error)
    export_metadata(ctx, settings.layout, settings.metadata_dir, ctx.run_key)
    return settle_run(ctx)
