"""The extraction stages as plain functions over the audit store: the Airflow operators call these, and so
can a script or a benchmark. Each stage is idempotent: it skips what the store says is already done.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread

from pacsflow.core.audit import AttemptState, AuditStore, RunSummary, SeriesStatus, Stage, accession_column_length
from pacsflow.core.dicom.errors import PacsConfigurationError, PacsError, PacsItemError, PacsTransientError
from pacsflow.core.dicom.results import FindResult, QueryLevel, RetrieveReport
from pacsflow.core.errors import ConfigurationError, describe_error
from pacsflow.core.export import export_instances
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.core.progress import Progress
from pacsflow.core.resolve import Resolution, ResolutionSettings, resolve_accession
from pacsflow.core.retry import RetryPolicy
from pacsflow.core.ris import RisExam
from pacsflow.core.series_rules import DropReason, SeriesRules
from pacsflow.core.storage import StorageLayout
from pacsflow.core.uids import is_valid_uid

log = logging.getLogger("pacsflow")

HEADER_RULE_KEYS = ("Modality", "SeriesDescription", "BodyPartExamined")
SERIES_RETURN_KEYS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "BodyPartExamined",
    "NumberOfSeriesRelatedInstances",
)
MAX_BATCHES = 500  # Airflow's max_map_length is 1024; stay well below it
# Consecutive items failing with transient errors that mean "the PACS is down": stop and let Airflow retry.
PACS_DOWN_AFTER = 5
# Some PACS send the final C-MOVE response before their sub-association's last C-STOREs have reached the receiver.
LATE_ARRIVAL_GRACE_SECONDS = 2.0
FETCH_PASSES = 5  # later passes re-fetch only what earlier ones lost
# Before each pass: a PACS that just lost its stream to the receiver may keep failing on the dead association
# for a few seconds (Orthanc reuses its associations to a destination for 5 s by default).
PASS_PAUSES_SECONDS = (0.0, 1.0, 3.0, 6.0, 10.0)
REFUSALS_TO_GIVE_UP = 3  # passes in a row refused with nothing arriving: the PACS will not send what is missing


class PacsClientLike(Protocol):
    def find(self, level: QueryLevel, query: dict[str, str]) -> FindResult: ...

    def retrieve(
        self, level: QueryLevel, keys: dict[str, str], *, destination_ae: str, layout: StorageLayout
    ) -> RetrieveReport: ...


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
        health = _PacsHealth()
        progress = Progress("resolution", len(pending), "ANs")
        with connect() as client:
            for row in pending:
                values = _resolve_one(ctx, client, _exam_from_row(row), settings, health)
                batch = batch_of_an[row["accession_number"]]
                ctx.store.record_resolution(ctx.run_key, row["accession_number"], batch_of=lambda _uid: batch, **values)
                key = values["resolution"] + (f" by {values['resolved_by']}" if values["resolved_by"] else "")
                counts[key] = counts.get(key, 0) + 1
                log.debug("resolved %s: %s", row["an_ref"], key)
                progress.advance(detail=counts)
        counts["already resolved"] = len(cohort) - len(pending)
    log.info("resolution of %d ANs done: %s", len(cohort), _readable(counts))
    return ctx.store.study_batches(ctx.run_key)


def _resolve_one(
    ctx: RunContext, client: PacsClientLike, exam: RisExam, settings: ResolutionSettings, health: _PacsHealth
) -> dict[str, Any]:
    try:
        result = ctx.retry.call(lambda: resolve_accession(client, exam, settings))
        health.ok()
    except PacsTransientError as error:
        health.failed(error)
        return dict(
            resolution=Resolution.PACS_ERROR.value, resolved_by=None, detail=str(error), rules_tried=[], study_uids=()
        )
    return dict(
        resolution=result.resolution.value,
        resolved_by=result.rule.value if result.rule else None,
        detail=result.detail,
        rules_tried=list(result.attempts),
        study_uids=result.study_uids if result.resolution is Resolution.RESOLVED else (),
    )


def _readable(counts: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(counts.items()) if value) or "nothing to do"


def _exam_from_row(row: dict[str, Any]) -> RisExam:
    return RisExam(
        accession_number=row["accession_number"],
        patient_id=row["patient_id"],
        study_instance_uid=row["ris_study_uid"],
        exam_datetime=row["exam_datetime"],
        modality=row["modality"],
    )


class _PacsHealth:
    """Tells an item's failure from a PACS-wide one. Consecutive transient failures mean the PACS is down
    (the task fails and Airflow retries later); consecutive retrieves refused with nothing arriving mean the
    PACS cannot reach the receiver (Orthanc answers a bare 0xC000 for an unknown move destination)."""

    def __init__(self) -> None:
        self.transient = 0
        self.refused = 0

    def ok(self, *, retrieved: bool = False) -> None:
        self.transient = 0
        if retrieved:
            self.refused = 0

    def failed(self, error: PacsTransientError) -> None:
        self.transient += 1
        if self.transient >= PACS_DOWN_AFTER:
            raise PacsTransientError(
                f"{self.transient} consecutive items failed; the PACS looks unavailable"
            ) from error

    def retrieve_refused(self, error: PacsItemError) -> None:
        self.refused += 1
        if self.refused >= PACS_DOWN_AFTER:
            raise PacsConfigurationError(
                f"{self.refused} consecutive retrieves were refused and nothing arrived; check that the PACS knows "
                "pacsflow's receiver as a move destination (AE title, host, port) and can reach it",
                status=error.status,
            ) from error


# -- stage 3 and 4: series listing, filtering, verified retrieval ----------------------------------
@dataclass
class BatchCounts:
    studies: int = 0
    series_kept: int = 0
    series_dropped: int = 0
    complete: int = 0
    partial: int = 0
    failed: int = 0
    instances_fetched: int = 0
    bytes_fetched: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Destination:
    """Where retrieved instances go: the move destination's AE title and how to wait until what it received is
    in the layout (the DCMTK backend ingests asynchronously; the pynetdicom receiver and C-GET need nothing)."""

    ae_title: str
    settle: Callable[[], None] = lambda: None


def retrieve_batch(
    ctx: RunContext,
    batch: int,
    connect: ClientFactory,
    *,
    rules: SeriesRules,
    layout: StorageLayout,
    destination_ae: str,
    receiver: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> dict[str, int]:
    """List, filter and retrieve every study of one batch, verifying each series instance by instance."""
    counts = BatchCounts()
    with stage_attempt(ctx, Stage.RETRIEVE, batch=batch) as recorded:
        layout.root.mkdir(parents=True, exist_ok=True)
        health = _PacsHealth()
        studies = ctx.store.studies_in_batch(ctx.run_key, batch)
        progress = Progress(f"batch {batch}", len(studies), "studies")
        with receiver() as incoming, connect() as client:
            destination = (
                Destination(destination_ae) if incoming is None else Destination(destination_ae, incoming.settle)
            )
            for study in studies:
                size_before = counts.bytes_fetched
                _retrieve_study(ctx, client, study, rules, layout, destination, health, counts)
                progress.advance(
                    size=counts.bytes_fetched - size_before,
                    detail=f"series complete {counts.complete}, partial {counts.partial}, "
                    f"failed {counts.failed}, dropped {counts.series_dropped}",
                )
        recorded.update(counts.as_dict())
    log.info("batch %d done: %s", batch, _readable(counts.as_dict()))
    return counts.as_dict()


def _retrieve_study(
    ctx: RunContext,
    client: PacsClientLike,
    study: dict[str, Any],
    rules: SeriesRules,
    layout: StorageLayout,
    destination: Destination,
    health: _PacsHealth,
    counts: BatchCounts,
) -> None:
    counts.studies += 1
    if not study["listed"]:
        _list_series(ctx, client, study, rules, health)
    for series_row in ctx.store.series_of_study(ctx.run_key, study["study_uid"]):
        if series_row["status"] == SeriesStatus.DROPPED:
            counts.series_dropped += 1
            continue
        counts.series_kept += 1
        if series_row["status"] == SeriesStatus.COMPLETE:
            counts.complete += 1
            continue
        # Runs that overlap on one data root take turns per series, so none deletes what another counted.
        with layout.series_lock(series_row["series_uid"]):
            _retrieve_series(ctx, client, series_row, rules, layout, destination, health, counts)


def _list_series(
    ctx: RunContext, client: PacsClientLike, study: dict[str, Any], rules: SeriesRules, health: _PacsHealth
) -> None:
    query = dict.fromkeys(SERIES_RETURN_KEYS, "") | {"StudyInstanceUID": study["study_uid"]}
    try:
        result = ctx.retry.call(lambda: client.find("SERIES", query))
        health.ok()
    except (PacsTransientError, PacsItemError) as error:
        if isinstance(error, PacsTransientError):
            health.failed(error)
        ctx.store.record_series_listing(ctx.run_key, study["accession_number"], study["study_uid"], [], str(error))
        return
    listed = []
    seen: set[str] = set()
    for match in result.matches:
        # Some PACS (qrscp) answer once per instance: one row per series.
        if not is_valid_uid(match.get("SeriesInstanceUID")) or match["SeriesInstanceUID"] in seen:
            continue
        seen.add(match["SeriesInstanceUID"])
        reason = rules.drop_reason(match)
        listed.append(
            {
                "series_uid": match["SeriesInstanceUID"],
                "modality": match.get("Modality"),
                "description": match.get("SeriesDescription"),
                "body_part": match.get("BodyPartExamined"),
                "pacs_instance_count": match.get("NumberOfSeriesRelatedInstances"),
                "drop_reason": reason.value if reason else None,
                "status": SeriesStatus.DROPPED if reason else SeriesStatus.PENDING,
            }
        )
    ctx.store.record_series_listing(ctx.run_key, study["accession_number"], study["study_uid"], listed)


def _retrieve_series(
    ctx: RunContext,
    client: PacsClientLike,
    row: dict[str, Any],
    rules: SeriesRules,
    layout: StorageLayout,
    destination: Destination,
    health: _PacsHealth,
    counts: BatchCounts,
) -> None:
    study_uid, series_uid = row["study_uid"], row["series_uid"]
    timings: dict[str, float] = {}
    before = layout.stored_sop_uids(study_uid, series_uid)
    try:
        clock = time.perf_counter()
        expected = ctx.retry.call(lambda: _expected_instances(client, study_uid, series_uid))
        timings["list_instances"] = time.perf_counter() - clock
    except PacsTransientError as error:
        health.failed(error)
        counts.failed += 1
        ctx.store.update_series(
            ctx.run_key, study_uid, series_uid, status=SeriesStatus.FAILED, error=str(error), seconds=timings
        )
        return
    target = len(expected) if expected else row["pacs_instance_count"]
    clock = time.perf_counter()
    present, problem = _fetch_missing(ctx, client, layout, destination, study_uid, series_uid, expected, target)
    timings["retrieve"] = time.perf_counter() - clock
    if problem is None or present - before:
        health.ok(retrieved=bool(present - before))
    elif isinstance(problem, PacsTransientError):
        health.failed(problem)
    else:
        health.retrieve_refused(problem)
    received = present & expected if expected else present
    fetched = received - before
    if not received and problem is not None:
        counts.failed += 1
        ctx.store.update_series(
            ctx.run_key,
            study_uid,
            series_uid,
            status=SeriesStatus.FAILED,
            error=str(problem),
            expected=target,
            received=0,
            fetched=0,
            bytes=0,
            seconds=timings,
        )
        return
    if received and _listing_incomplete(row):
        reason = _header_drop_reason(rules, layout, study_uid, series_uid, min(received))
        if reason:  # the PACS's answer hid what the rules needed; the header shows the series is not wanted
            for uid in fetched:
                layout.instance_path(study_uid, series_uid, uid).unlink(missing_ok=True)
            layout.remove_empty_dirs(study_uid, series_uid)
            counts.series_kept -= 1
            counts.series_dropped += 1
            ctx.store.update_series(
                ctx.run_key,
                study_uid,
                series_uid,
                status=SeriesStatus.DROPPED,
                drop_reason=reason.value,
                error="decided from the instance header",
                seconds=timings,
            )
            return
    status = _series_status(target, len(received))
    counts.instances_fetched += len(fetched)
    counts.bytes_fetched += _size(layout, study_uid, series_uid, fetched)
    setattr(counts, status.value, getattr(counts, status.value) + 1)
    ctx.store.update_series(
        ctx.run_key,
        study_uid,
        series_uid,
        status=status,
        error=str(problem) if problem is not None and status != SeriesStatus.COMPLETE else None,
        expected=target,
        received=len(received),
        fetched=len(fetched),
        bytes=_size(layout, study_uid, series_uid, received),
        seconds=timings,
    )


def _listing_incomplete(row: dict[str, Any]) -> bool:
    """True when the series-level C-FIND left out an attribute the rules decide on (optional keys)."""
    return any(row[key] is None for key in ("modality", "description", "body_part"))


def _header_drop_reason(
    rules: SeriesRules, layout: StorageLayout, study_uid: str, series_uid: str, sop_uid: str
) -> DropReason | None:
    header = dcmread(
        layout.instance_path(study_uid, series_uid, sop_uid),
        stop_before_pixels=True,
        specific_tags=list(HEADER_RULE_KEYS),
    )
    return rules.drop_reason({key: header.get(key) for key in HEADER_RULE_KEYS})


def _size(layout: StorageLayout, study_uid: str, series_uid: str, sop_uids: Iterable[str]) -> int:
    return sum(layout.instance_path(study_uid, series_uid, uid).stat().st_size for uid in sop_uids)


def _expected_instances(client: PacsClientLike, study_uid: str, series_uid: str) -> set[str]:
    """SOP Instance UIDs the PACS holds for a series; empty when it does not answer image-level queries."""
    query = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid, "SOPInstanceUID": ""}
    try:
        result = client.find("IMAGE", query)
    except PacsItemError:
        return set()
    return {m["SOPInstanceUID"] for m in result.matches if is_valid_uid(m.get("SOPInstanceUID"))}


def _fetch_missing(
    ctx: RunContext,
    client: PacsClientLike,
    layout: StorageLayout,
    destination: Destination,
    study_uid: str,
    series_uid: str,
    expected: set[str],
    target: int | None,
) -> tuple[set[str], PacsError | None]:
    """Retrieve what is not on disk yet, in bounded passes with a growing pause: the whole series when nothing
    is there, else only the missing instances (by SOP Instance UID when the PACS lists them).

    A retrieve that fails after some sub-operations (Orthanc answers a bare 0xC000 when the stream to the
    receiver was cut or stalled) is not the end of the series: what arrived stays and the next pass asks for the
    rest. Passes stop when the series is complete, or when passes in a row were refused and brought nothing:
    then the last refusal is returned with what is on disk (a partial series keeps its exact counts)."""
    series_keys = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid}
    present = layout.stored_sop_uids(study_uid, series_uid)
    problem: PacsError | None = None
    fruitless = 0
    for number in range(FETCH_PASSES):
        if _complete(present, expected, target):
            return present, None
        time.sleep(PASS_PAUSES_SECONDS[number])
        problem = None
        if not present or not expected:
            problem = _try_retrieve(ctx, client, layout, destination, "SERIES", series_keys)
        else:
            for sop_uid in sorted(expected - present):
                problem = (
                    _try_retrieve(ctx, client, layout, destination, "IMAGE", series_keys | {"SOPInstanceUID": sop_uid})
                    or problem
                )
        destination.settle()
        arrived = _await_arrivals(layout, study_uid, series_uid, expected)
        progress, present = arrived - present, arrived
        fruitless = fruitless + 1 if problem is not None and not progress else 0
        if fruitless >= REFUSALS_TO_GIVE_UP:
            break
    return present, None if _complete(present, expected, target) else problem


def _complete(present: set[str], expected: set[str], target: int | None) -> bool:
    if expected:
        return expected <= present
    return target is not None and len(present) >= target


def _try_retrieve(
    ctx: RunContext,
    client: PacsClientLike,
    layout: StorageLayout,
    destination: Destination,
    level: QueryLevel,
    keys: dict[str, str],
) -> PacsError | None:
    """One C-MOVE/C-GET (retried while transient); its failure, if any. Configuration errors propagate."""
    try:
        ctx.retry.call(lambda: client.retrieve(level, keys, destination_ae=destination.ae_title, layout=layout))
    except (PacsTransientError, PacsItemError) as error:
        return error
    return None


def _await_arrivals(layout: StorageLayout, study_uid: str, series_uid: str, expected: set[str]) -> set[str]:
    deadline = time.monotonic() + LATE_ARRIVAL_GRACE_SECONDS
    while True:
        present = layout.stored_sop_uids(study_uid, series_uid)
        if not expected or expected <= present or time.monotonic() >= deadline:
            return present
        time.sleep(0.1)


def _series_status(expected: int | None, received: int) -> SeriesStatus:
    if expected is None:
        return SeriesStatus.COMPLETE if received else SeriesStatus.FAILED
    if received >= expected:
        return SeriesStatus.COMPLETE
    return SeriesStatus.PARTIAL if received else SeriesStatus.FAILED


# -- stage 5 and 6: files for export, summary ------------------------------------------------------
def retrieved_files(ctx: RunContext, layout: StorageLayout) -> Iterator[Path]:
    """Paths of every instance of the run's kept series that is on disk."""
    for row in ctx.store.series_rows(ctx.run_key, kept=True):
        for sop_uid in sorted(layout.stored_sop_uids(row["study_uid"], row["series_uid"])):
            yield layout.instance_path(row["study_uid"], row["series_uid"], sop_uid)


def export_metadata(ctx: RunContext, layout: StorageLayout, metadata_dir: Path, run_id: str) -> dict[str, Any]:
    """Stage 5: the Parquet metadata of the run's retrieved instances (a re-run replaces the run's rows)."""
    with stage_attempt(ctx, Stage.EXPORT) as counts:
        report = export_instances(retrieved_files(ctx, layout), metadata_dir, run_id)
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
    """Every stage in one process, in the DAG's order (for scripts and for measuring Airflow's overhead)."""
    extract_cohort(ctx, lambda: exams, settings.batch_size)
    for batch in resolve_cohort(ctx, connect, settings.resolution, settings.batch_size):
        retrieve_batch(
            ctx,
            batch,
            connect,
            rules=settings.rules,
            layout=settings.layout,
            destination_ae=settings.destination_ae,
            receiver=receiver,
        )
    export_metadata(ctx, settings.layout, settings.metadata_dir, ctx.run_key)
    return settle_run(ctx)
