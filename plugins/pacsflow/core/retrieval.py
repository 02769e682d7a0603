"""Verified retrieval of one batch's series: one :class:`SeriesRetrieval` holds what every series needs (the
audit store, the PACS client, the storage layout, the series rules, the move destination) and returns an
explicit :class:`SeriesOutcome` per series, which says whether a task retry could finish what is missing.

A series moved with the other series of its study is complete when it holds the listing's instance count
(each instance was checked on arrival); any other is verified against the PACS's image-level instance list.

A series whose listing lacks a key the rules decide on (DCMTK's dcmqrscp and pynetdicom's qrscp send no
SeriesDescription at series level) is probed: one instance is fetched, the rules read its header, and the rest
is fetched only when the series is kept. What a probe fetched and discarded is recorded in the series' audit
row (``fetched`` instances and their ``bytes``, with the drop reason).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from pydicom import dcmread

from pacsflow.core.audit import AuditStore, SeriesStatus
from pacsflow.core.dicom.errors import PacsConfigurationError, PacsError, PacsItemError, PacsTransientError
from pacsflow.core.dicom.results import FindResult, QueryLevel, RetrieveReport
from pacsflow.core.dicom.status import MOVE_DESTINATION_UNKNOWN
from pacsflow.core.retry import RetryPolicy
from pacsflow.core.series_rules import DropReason, SeriesRules
from pacsflow.core.storage import StorageLayout
from pacsflow.core.uids import is_valid_uid

log = logging.getLogger("pacsflow")
_Seen = TypeVar("_Seen")

HEADER_RULE_KEYS = ("Modality", "SeriesDescription", "BodyPartExamined")
SERIES_RETURN_KEYS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "BodyPartExamined",
    "NumberOfSeriesRelatedInstances",
)
# The audit column that holds each rule key of a series listing, and the drop reason a rule on that key gives.
LISTING_COLUMNS = {"Modality": "modality", "SeriesDescription": "description", "BodyPartExamined": "body_part"}
REASON_KEYS = {
    DropReason.MODALITY: "Modality",
    DropReason.DESCRIPTION: "SeriesDescription",
    DropReason.BODY_PART: "BodyPartExamined",
}
# Consecutive items failing with transient errors that mean "the PACS is down": stop and let Airflow retry.
PACS_DOWN_AFTER = 5
# Late C-STOREs may arrive after the final C-MOVE response (the receiver may still be storing the last one, or a
# DCMTK receiver in another process still ingesting): looked for every ARRIVAL_POLL_SECONDS, for at most the grace.
LATE_ARRIVAL_GRACE_SECONDS = 2.0
ARRIVAL_POLL_SECONDS = 0.01
# Before each pass (later passes re-fetch only what earlier ones lost): a PACS that just lost its stream to the
# receiver may keep failing on the dead association for a few seconds (Orthanc reuses its associations to a
# destination for 5 s by default).
PASS_PAUSES_SECONDS = (0.0, 1.0, 3.0, 6.0, 10.0)
FETCH_PASSES = len(PASS_PAUSES_SECONDS)
REFUSALS_TO_GIVE_UP = 3  # passes in a row refused with nothing arriving: the PACS will not send what is missing


@dataclass(frozen=True)
class RetrievalSettings:
    """How hard one task tries to complete a series before leaving it to a retry of the task."""

    pass_pauses: tuple[float, ...] = PASS_PAUSES_SECONDS  # one pass per pause, slept before the pass
    refusals_to_give_up: int = REFUSALS_TO_GIVE_UP
    late_arrival_grace: float = LATE_ARRIVAL_GRACE_SECONDS


class PacsClientLike(Protocol):
    def find(self, level: QueryLevel, query: Mapping[str, str]) -> FindResult: ...

    def retrieve(
        self, level: QueryLevel, keys: Mapping[str, str], *, destination_ae: str, layout: StorageLayout
    ) -> RetrieveReport: ...


class PacsHealth:
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


class Failure(StrEnum):
    """Why a series is not complete, as far as a retry of the task is concerned."""

    RETRYABLE = "retryable"  # the PACS association failed or timed out, the stream was cut while data still came
    FINAL = "final"  # the PACS refuses the instances or does not hold the series: no retry can fix it


@dataclass(frozen=True)
class SeriesOutcome:
    """What became of one series; ``values()`` is its audit row. For a series dropped on a probe's header,
    ``fetched`` and ``bytes`` are what was fetched and then discarded."""

    status: SeriesStatus
    expected: int | None = None
    received: int = 0
    fetched: int = 0
    bytes: int = 0
    bytes_fetched: int = 0  # of ``fetched``, for the batch's counts
    error: str | None = None
    failure: Failure | None = None
    drop_reason: DropReason | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    cause: PacsError | None = field(default=None, compare=False)  # the failure behind ``error``, not recorded

    @property
    def retryable(self) -> bool:
        return self.failure is Failure.RETRYABLE

    def values(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "status": self.status,
            "error": self.error,
            "expected": self.expected,
            "received": self.received,
            "fetched": self.fetched,
            "bytes": self.bytes,
            "seconds": self.seconds,
        }
        if self.drop_reason is not None:
            values["drop_reason"] = self.drop_reason.value
        return values


@dataclass
class BatchCounts:
    studies: int = 0
    series_kept: int = 0
    series_dropped: int = 0
    complete: int = 0
    partial: int = 0
    failed: int = 0
    listings_failed: int = 0  # studies whose series could not be listed
    retryable: int = 0  # incomplete series and failed listings that a retry of the task could finish
    instances_fetched: int = 0  # into kept series
    bytes_fetched: int = 0
    instances_discarded: int = 0  # fetched to read a header, then deleted with their dropped series
    bytes_discarded: int = 0

    def add(self, outcome: SeriesOutcome) -> None:
        """Count one series that reached retrieval."""
        if outcome.status is SeriesStatus.DROPPED:
            self.series_dropped += 1
            self.instances_discarded += outcome.fetched
            self.bytes_discarded += outcome.bytes
            return
        self.series_kept += 1
        self.instances_fetched += outcome.fetched
        self.bytes_fetched += outcome.bytes_fetched
        if outcome.status is SeriesStatus.COMPLETE:
            self.complete += 1
        elif outcome.status is SeriesStatus.PARTIAL:
            self.partial += 1
        else:
            self.failed += 1
        self.retryable += outcome.retryable

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class RetryableSeriesError(PacsTransientError):
    """Series of the batch are incomplete for reasons a retry of the task could fix; raised once the rest of
    the batch is done, so that Airflow's retry fetches only what is missing. Counts only, never identifiers."""

    def __init__(self, batch: int, counts: BatchCounts) -> None:
        super().__init__(
            f"batch {batch}: {counts.retryable} series or series listings incomplete for reasons a retry can fix "
            f"(PACS association failed or timed out, transfer cut); in all {counts.partial} series partial, "
            f"{counts.failed} failed, {counts.listings_failed} listings failed, of {counts.series_kept} kept. The "
            "task fails so that its retry fetches only what is missing"
        )
        self.counts = counts


@dataclass(frozen=True)
class Destination:
    """Where retrieved instances go: the move destination's AE title and how to wait until what it received is
    in the layout (the DCMTK backend ingests asynchronously; the pynetdicom receiver and C-GET need nothing)."""

    ae_title: str
    settle: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class _Series:
    """The identity and listing of a series being retrieved."""

    study_uid: str
    series_uid: str
    row: dict[str, Any]

    @property
    def keys(self) -> dict[str, str]:
        return {"StudyInstanceUID": self.study_uid, "SeriesInstanceUID": self.series_uid}


@dataclass(frozen=True)
class _HeadStart:
    """A series' first pass, made by one retrieve with the other series of its study: what went wrong with it."""

    problem: PacsTransientError | PacsItemError | None


@dataclass(frozen=True)
class _Deferred:
    """A series that failed before the destination was proven in this task, and how."""

    row: dict[str, Any]
    outcome: SeriesOutcome


@dataclass
class _Fetch:
    """What the passes of one series brought: the instances on disk, the last failure, and its class."""

    present: set[str]
    problem: PacsError | None = None
    failure: Failure | None = None


@dataclass
class SeriesRetrieval:
    """Lists, filters and retrieves the series of one batch's studies, each verified instance by instance."""

    store: AuditStore
    run_key: str
    retry: RetryPolicy
    client: PacsClientLike
    rules: SeriesRules
    layout: StorageLayout
    destination: Destination
    settings: RetrievalSettings = field(default_factory=RetrievalSettings)
    health: PacsHealth = field(default_factory=PacsHealth)
    move_together: bool = True  # one retrieve for the series of a study (until a PACS brings nothing that way)
    delivered: bool = False  # a retrieve of this task brought an instance
    deferred: list[_Deferred] = field(default_factory=list)  # asked again once ``delivered`` (see ``finish``)
    counts: BatchCounts = field(default_factory=BatchCounts)

    # -- studies and listing --------------------------------------------------------------------------
    def study(self, study: dict[str, Any]) -> None:
        self.counts.studies += 1
        if not study["listed"]:
            self._list_series(study)
        pending = []
        for row in self.store.series_of_study(self.run_key, study["study_uid"]):
            if row["status"] == SeriesStatus.DROPPED:
                self.counts.series_dropped += 1
            elif row["status"] == SeriesStatus.COMPLETE:
                self.counts.series_kept += 1
                self.counts.complete += 1
            else:
                pending.append(row)
        # Runs that overlap on one data root take turns per series, so none deletes what another counted.
        with self.layout.series_lock(*(row["series_uid"] for row in pending)):
            on_disk = {
                row["series_uid"]: self.layout.stored_sop_uids(study["study_uid"], row["series_uid"]) for row in pending
            }
            moved = self._move_together(study["study_uid"], [row for row in pending if not on_disk[row["series_uid"]]])
            for row in pending:
                uid = row["series_uid"]
                outcome = self.series(row, before=on_disk[uid], head_start=moved.get(uid))
                if self._unproven_destination(outcome):
                    self.deferred.append(_Deferred(row, outcome))
                else:
                    self.counts.add(outcome)

    def finish(self) -> None:
        """Ask again for the series deferred by :meth:`_unproven_destination`, once the destination has been
        reached in this task; if it never was, the series' failures stand, and a "move destination unknown"
        is the configuration error it says (the series stay for a retry of the task after the fix)."""
        deferred, self.deferred = self.deferred, []
        if not self.delivered:
            for item in deferred:
                if isinstance(item.outcome.cause, PacsConfigurationError):
                    raise item.outcome.cause
            for item in deferred:
                self.counts.add(item.outcome)
            return
        for item in deferred:
            uid = item.row["series_uid"]
            with self.layout.series_lock(uid):
                before = self.layout.stored_sop_uids(item.row["study_uid"], uid)
                self.counts.add(self.series(item.row, before=before))

    def _unproven_destination(self, outcome: SeriesOutcome) -> bool:
        """A series that failed with nothing received before the PACS has delivered anything in this task, and
        for a reason that also describes a destination the PACS cannot reach yet: "move destination unknown",
        or retrieves refused with nothing arriving. A PACS answers so both for a destination it does not know
        and for a receiver it could not connect to (restarting, a refused connection), so the series waits until
        another series proved the destination (see :meth:`finish`)."""
        if self.delivered:
            return False
        if isinstance(outcome.cause, PacsConfigurationError):
            return True
        refused = outcome.failure is Failure.FINAL and isinstance(outcome.cause, PacsItemError)
        return refused and outcome.status is SeriesStatus.FAILED and not outcome.received

    def _list_series(self, study: dict[str, Any]) -> None:
        query = dict.fromkeys(SERIES_RETURN_KEYS, "") | {"StudyInstanceUID": study["study_uid"]}
        try:
            result = self.retry.call(lambda: self.client.find("SERIES", query))
            self.health.ok()
        except (PacsTransientError, PacsItemError) as error:
            self.counts.listings_failed += 1
            if isinstance(error, PacsTransientError):
                self.counts.retryable += 1
                self.health.failed(error)
            self.store.record_series_listing(
                self.run_key, study["accession_number"], study["study_uid"], [], str(error)
            )
            return
        listed = []
        seen: set[str] = set()
        for match in result.matches:
            # Some PACS (qrscp) answer once per instance: one row per series.
            if not is_valid_uid(match.get("SeriesInstanceUID")) or match["SeriesInstanceUID"] in seen:
                continue
            seen.add(match["SeriesInstanceUID"])
            reason = self._listing_drop_reason(match)
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
        self.store.record_series_listing(self.run_key, study["accession_number"], study["study_uid"], listed)

    def _listing_drop_reason(self, match: dict[str, Any]) -> DropReason | None:
        """The rules' verdict on a listing, except a drop for a key the PACS left out: that one is decided on
        an instance's header (an absent SeriesDescription must not drop every series of an include rule)."""
        reason = self.rules.drop_reason(match)
        key = REASON_KEYS.get(reason) if reason else None
        return None if key is not None and match.get(key) is None else reason

    def _needs_probe(self, row: dict[str, Any]) -> bool:
        """True when the listing left out a key the rules decide on (only then is a header worth reading)."""
        used = {
            "Modality": bool(self.rules.include_modalities or self.rules.exclude_modalities),
            "SeriesDescription": bool(self.rules.include_descriptions or self.rules.exclude_descriptions),
            "BodyPartExamined": bool(self.rules.include_body_parts),
        }
        return any(used[key] and row[column] is None for key, column in LISTING_COLUMNS.items())

    def _move_together(self, study_uid: str, rows: list[dict[str, Any]]) -> dict[str, _HeadStart]:
        """One retrieve for the study's kept series that have nothing on disk (``rows``), by their list of Series
        Instance UIDs: the PACS opens one association to the receiver instead of one per series. It is the first
        pass of each series moved (returned by Series Instance UID): each is then verified instance by instance
        and its later passes fetch what is missing, series by series. A PACS that brings nothing this way (list
        matching unsupported: qrscp answers 0xA801 to a C-MOVE, 0xC413 to a C-GET) is asked series by series for
        the rest of the batch. Only once a retrieve of this task delivered: a "move destination unknown" then is no
        configuration error (nor worth the client's pauses)."""
        together = [row for row in rows if self._movable_together(row)]
        if not (self.move_together and self.delivered and self.settings.pass_pauses) or len(together) < 2:
            return {}
        keys = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": "\\".join(row["series_uid"] for row in together)}
        problem: PacsTransientError | PacsItemError | None = None
        succeeded = False
        try:
            self.client.retrieve("SERIES", keys, destination_ae=self.destination.ae_title, layout=self.layout)
            succeeded = True
        except (PacsTransientError, PacsItemError) as error:
            problem = error
        except PacsError:  # a list the PACS does not understand: the series passes ask and say what is wrong
            pass
        self.destination.settle()
        # After a success, within the grace: a receiver in another process files what came after the response.
        self.move_together = _await(
            lambda: any(self.layout.stored_sop_uids(study_uid, row["series_uid"]) for row in together),
            bool,
            self.settings.late_arrival_grace if succeeded else 0.0,
        )
        if not self.move_together:  # nothing came: no pass of any series
            return {}
        return {row["series_uid"]: _HeadStart(problem) for row in together}

    def _movable_together(self, row: dict[str, Any]) -> bool:
        """Every instance is wanted: no header to read first, no instance count to check against the PACS's
        instance list first (that drop would come after the fetch)."""
        return not self._needs_probe(row) and (row["pacs_instance_count"] is not None or self.rules.min_instances <= 1)

    # -- one series -----------------------------------------------------------------------------------
    def series(self, row: dict[str, Any], *, before: set[str], head_start: _HeadStart | None = None) -> SeriesOutcome:
        """Retrieve what is missing of one series and record its outcome in the audit. ``before``: what was on
        disk before this task fetched anything for it; ``head_start``: its first pass, made with its study's."""
        series = _Series(row["study_uid"], row["series_uid"], row)
        try:
            outcome = self._complete_by_count(series, head_start) or self._retrieve(series, before, head_start)
        except PacsConfigurationError as error:
            unknown_before = sum(isinstance(item.outcome.cause, PacsConfigurationError) for item in self.deferred)
            if self.delivered or error.status != MOVE_DESTINATION_UNKNOWN or unknown_before + 1 >= PACS_DOWN_AFTER:
                raise
            outcome = SeriesOutcome(
                _series_status(row["pacs_instance_count"], len(before)),
                expected=row["pacs_instance_count"],
                received=len(before),
                error=str(error),
                failure=Failure.FINAL,
                cause=error,
            )
        self.store.update_series(self.run_key, series.study_uid, series.series_uid, **outcome.values())
        return outcome

    def _retrieve(self, series: _Series, before: set[str], head_start: _HeadStart | None) -> SeriesOutcome:
        timings: dict[str, float] = {}
        try:
            clock = time.perf_counter()
            expected = self.retry.call(lambda: self._expected_instances(series))
            timings["list_instances"] = time.perf_counter() - clock
        except PacsTransientError as error:
            self.health.failed(error)
            return SeriesOutcome(
                SeriesStatus.FAILED,
                expected=series.row["pacs_instance_count"],
                received=len(before),  # from an earlier try; not verified against the PACS's list this time
                bytes=self._size(series, before),
                error=str(error),
                failure=Failure.RETRYABLE,
                seconds=timings,
            )
        target = len(expected) if expected else series.row["pacs_instance_count"]
        if expected and len(expected) < self.rules.min_instances:  # the listing had no count; the PACS's list has
            return SeriesOutcome(SeriesStatus.DROPPED, expected=target, drop_reason=DropReason.INSTANCE_COUNT)
        clock = time.perf_counter()
        if expected and self._needs_probe(series.row):
            dropped = self._decide_on_header(series, expected, before, timings)
            if dropped is not None:
                return dropped
        fetch = self._fetch_missing(series, expected, target, head_start)
        timings["retrieve"] = time.perf_counter() - clock
        self._tell_health(fetch, before)
        self.delivered = self.delivered or bool(fetch.present - before)
        received = fetch.present & expected if expected else fetch.present
        if not received and fetch.problem is not None:
            return SeriesOutcome(
                SeriesStatus.FAILED,
                expected=target,
                error=str(fetch.problem),
                failure=fetch.failure,
                seconds=timings,
                cause=fetch.problem,
            )
        if received and not expected and self._needs_probe(series.row):
            # No instance list to probe with (the PACS does not answer image-level queries): decide now.
            reason = self._header_drop_reason(series, min(received), expected)
            if reason:
                return self._discard(series, received - before, reason, target, timings)
        status = _series_status(target, len(received))
        fetched = received - before
        return SeriesOutcome(
            status,
            expected=target,
            received=len(received),
            fetched=len(fetched),
            bytes=self._size(series, received),
            bytes_fetched=self._size(series, fetched),
            error=str(fetch.problem) if fetch.problem is not None and status is not SeriesStatus.COMPLETE else None,
            failure=None if status is SeriesStatus.COMPLETE else fetch.failure,
            seconds=timings,
        )

    def _complete_by_count(self, series: _Series, head_start: _HeadStart | None) -> SeriesOutcome | None:
        """The outcome of a series moved with its study (nothing of it on disk before, the retrieve ended in
        success) that now holds as many instances as the PACS's listing counts: complete, without an image-level
        C-FIND. Each instance was checked as it arrived (its own UIDs file it under this series; one file per SOP
        Instance UID), so that many distinct instances are the series' own. A PACS answers image-level queries
        slowly (Orthanc: ~2 ms per instance, more than the instance's transfer); any other count is verified
        against the PACS's instance list (None)."""
        if head_start is None or head_start.problem is not None:
            return None
        clock = time.perf_counter()
        count = series.row["pacs_instance_count"]
        if count is None:
            return None
        present = self._await_arrivals(series, lambda present: len(present) >= count)
        if len(present) != count:
            return None
        self.delivered = True
        self.health.ok(retrieved=True)
        size = self._size(series, present)
        return SeriesOutcome(
            SeriesStatus.COMPLETE,
            expected=count,
            received=count,
            fetched=count,
            bytes=size,
            bytes_fetched=size,
            seconds={"verify": time.perf_counter() - clock},
        )

    def _decide_on_header(
        self, series: _Series, expected: set[str], before: set[str], timings: dict[str, float]
    ) -> SeriesOutcome | None:
        """Apply the rules to the header of one instance (fetched first when none is on disk): the outcome of a
        dropped series (what was fetched deleted), or None when it is kept or no instance came (then the passes
        fetch everything and say why)."""
        present = before & expected
        if not present:
            sop_uid = min(expected)
            self._try_retrieve("IMAGE", series.keys | {"SOPInstanceUID": sop_uid})
            self.destination.settle()
            present = self._await_arrivals(series, lambda present: sop_uid in present) & expected
            if not present:
                return None
            self.health.ok(retrieved=True)
        reason = self._header_drop_reason(series, min(present), expected)
        if reason is None:
            return None
        return self._discard(series, present, reason, len(expected), timings)

    def _discard(
        self,
        series: _Series,
        fetched: set[str],
        reason: DropReason,
        target: int | None,
        timings: dict[str, float],
    ) -> SeriesOutcome:
        """Delete what was fetched of a series its header shows is not wanted; leave no empty directory."""
        size = self._size(series, fetched)
        for uid in fetched:
            self.layout.instance_path(series.study_uid, series.series_uid, uid).unlink(missing_ok=True)
        self.layout.remove_empty_dirs(series.study_uid, series.series_uid)
        log.debug("series dropped on an instance header (%s): %d instance(s) discarded", reason.value, len(fetched))
        return SeriesOutcome(
            SeriesStatus.DROPPED,
            expected=target,
            fetched=len(fetched),
            bytes=size,
            error=f"decided from the instance header; {len(fetched)} instance(s) fetched and discarded",
            drop_reason=reason,
            seconds=timings,
        )

    def _tell_health(self, fetch: _Fetch, before: set[str]) -> None:
        if fetch.problem is None or fetch.present - before:
            self.health.ok(retrieved=bool(fetch.present - before))
        elif isinstance(fetch.problem, PacsTransientError):
            self.health.failed(fetch.problem)
        elif isinstance(fetch.problem, PacsItemError):
            self.health.retrieve_refused(fetch.problem)

    def _header_drop_reason(self, series: _Series, sop_uid: str, expected: set[str]) -> DropReason | None:
        header = dcmread(
            self.layout.instance_path(series.study_uid, series.series_uid, sop_uid),
            stop_before_pixels=True,
            specific_tags=list(HEADER_RULE_KEYS),
        )
        keys: dict[str, Any] = {key: header.get(key) for key in HEADER_RULE_KEYS}
        if expected:
            keys["NumberOfSeriesRelatedInstances"] = len(expected)
        return self.rules.drop_reason(keys)

    def _size(self, series: _Series, sop_uids: Iterable[str]) -> int:
        return sum(
            self.layout.instance_path(series.study_uid, series.series_uid, uid).stat().st_size for uid in sop_uids
        )

    def _expected_instances(self, series: _Series) -> set[str]:
        """SOP Instance UIDs the PACS holds for a series; empty when it does not answer image-level queries."""
        try:
            result = self.client.find("IMAGE", series.keys | {"SOPInstanceUID": ""})
        except PacsItemError:
            return set()
        return {m["SOPInstanceUID"] for m in result.matches if is_valid_uid(m.get("SOPInstanceUID"))}

    # -- passes ---------------------------------------------------------------------------------------
    def _fetch_missing(
        self, series: _Series, expected: set[str], target: int | None, head_start: _HeadStart | None
    ) -> _Fetch:
        """Retrieve what is not on disk yet, in bounded passes with a growing pause: the whole series when
        nothing is there, else only the missing instances (by SOP Instance UID when the PACS lists them).

        A retrieve that fails after some sub-operations (Orthanc answers a bare 0xC000 when the stream to the
        receiver was cut or stalled) is not the end of the series: what arrived stays and the next pass asks for
        the rest. Passes stop when the series is complete, or when passes in a row were refused and brought
        nothing: the PACS will not send the rest (final). Passes that ran out while instances still arrived, or a
        transient last error, leave the series to a retry of the task (retryable). With a ``head_start``, the
        first pass was the study's retrieve of several series."""
        fetch = _Fetch(set() if head_start else self.layout.stored_sop_uids(series.study_uid, series.series_uid))
        fruitless = 0
        progress: set[str] = set()
        for number, pause in enumerate(self.settings.pass_pauses):
            if _complete(fetch.present, expected, target):
                return _Fetch(fetch.present)
            if number == 0 and head_start is not None:
                fetch.problem = head_start.problem  # the pass was made with the other series of the study
            else:
                time.sleep(pause)
                fetch.problem = self._one_pass(series, expected, fetch.present)
            arrived = self._await_arrivals(series, lambda present: not expected or expected <= present)
            progress, fetch.present = arrived - fetch.present, arrived
            fruitless = fruitless + 1 if fetch.problem is not None and not progress else 0
            if fruitless >= self.settings.refusals_to_give_up:
                break
        if _complete(fetch.present, expected, target):
            return _Fetch(fetch.present)
        # Final: passes in a row refused with nothing arriving (the PACS refuses the instances or no longer holds
        # the series), or answered success without sending the rest. Otherwise (the PACS unavailable, a stream cut
        # while instances still arrived) a retry of the task continues where this one stopped.
        refused = fruitless >= self.settings.refusals_to_give_up
        silent = fetch.problem is None and not progress
        transient = isinstance(fetch.problem, PacsTransientError)
        fetch.failure = Failure.RETRYABLE if transient or not (refused or silent) else Failure.FINAL
        return fetch

    def _one_pass(self, series: _Series, expected: set[str], present: set[str]) -> PacsError | None:
        """Ask for the whole series when nothing is there (or the PACS lists no instances), else for each missing
        instance; the last failure, if any."""
        problem = None
        if not present or not expected:
            problem = self._try_retrieve("SERIES", series.keys)
        else:
            for sop_uid in sorted(expected - present):
                problem = self._try_retrieve("IMAGE", series.keys | {"SOPInstanceUID": sop_uid}) or problem
        self.destination.settle()
        return problem

    def _try_retrieve(self, level: QueryLevel, keys: dict[str, str]) -> PacsError | None:
        """One C-MOVE/C-GET (retried while transient); its failure, if any. Configuration errors propagate."""
        try:
            self.retry.call(
                lambda: self.client.retrieve(level, keys, destination_ae=self.destination.ae_title, layout=self.layout)
            )
        except (PacsTransientError, PacsItemError) as error:
            return error
        return None

    def _await_arrivals(self, series: _Series, arrived: Callable[[set[str]], bool]) -> set[str]:
        """The series' instances on disk once ``arrived`` says they are all there, or when the grace is over."""
        return _await(
            lambda: self.layout.stored_sop_uids(series.study_uid, series.series_uid),
            arrived,
            self.settings.late_arrival_grace,
        )


def _await(look: Callable[[], _Seen], done: Callable[[_Seen], bool], grace: float) -> _Seen:
    """What ``look`` sees once ``done`` says so, or when ``grace`` seconds are over."""
    deadline = time.monotonic() + grace
    while True:
        seen = look()
        if done(seen) or time.monotonic() >= deadline:
            return seen
        time.sleep(ARRIVAL_POLL_SECONDS)


def _complete(present: set[str], expected: set[str], target: int | None) -> bool:
    if expected:
        return expected <= present
    return target is not None and len(present) >= target


def _series_status(expected: int | None, received: int) -> SeriesStatus:
    if expected is None:
        return SeriesStatus.COMPLETE if received else SeriesStatus.FAILED
    if received >= expected:
        return SeriesStatus.COMPLETE
    return SeriesStatus.PARTIAL if received else SeriesStatus.FAILED
