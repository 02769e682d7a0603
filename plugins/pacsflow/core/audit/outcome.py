"""The outcome rules: what became of each AN, and how a run ended, derived from the audit rows alone.

Pure functions of rows already read (no database access), so the rules are the same for the store, the UI and
the summary operator.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


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


class StageBook:
    """The last attempt of every stage (and retrieval batch) of a run: what ran, what failed, what never ran."""

    def __init__(self, attempts: Iterable[Mapping[str, Any]], *, release_expected: bool = False) -> None:
        self.release_expected = release_expected
        self.last: dict[tuple[str, int | None], Mapping[str, Any]] = {}
        for attempt in attempts:  # oldest first: a later try replaces an earlier one
            self.last[(attempt["stage"], attempt["batch"])] = attempt

    def state(self, stage: Stage, batch: int | None = None) -> str | None:
        attempt = self.last.get((stage.value, batch))
        return str(attempt["state"]) if attempt else None

    def succeeded(self, stage: Stage, batch: int | None = None) -> bool:
        return self.state(stage, batch) == AttemptState.SUCCESS

    def verdict(self, batches: Iterable[int]) -> Verdict:
        expected: list[tuple[Stage, int | None]] = [
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


def accession_outcome(  # noqa: PLR0911 - one return per rule, in order of precedence
    accession: Mapping[Any, Any],
    study_rows: Iterable[Mapping[Any, Any]],
    series_statuses: Iterable[str],
    book: StageBook,
) -> tuple[str, str | None]:
    """An AN's outcome and its reason, from its row, its studies' rows, its series' statuses and the attempts."""
    resolution = accession["resolution"]
    if resolution is None:
        return Outcome.FAILED, RESOLUTION_FAILED if book.state(Stage.RESOLVE) else RESOLUTION_NEVER_RAN
    if resolution == "not_found":
        return Outcome.NOT_FOUND, None
    if resolution != "resolved":
        return Outcome.FAILED, f"resolution {resolution}"
    study_rows = list(study_rows)
    kept = [s for s in series_statuses if s != SeriesStatus.DROPPED]
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
