from datetime import UTC, datetime

import pytest
from pacsflow.core.audit import (
    RESOLUTION_NEVER_RAN,
    RETRIEVAL_FAILED,
    RETRIEVAL_NEVER_RAN,
    AttemptState,
    AuditStore,
    Outcome,
    SeriesStatus,
    Stage,
)

RUN = "pacsflow_extract/manual__1"


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    url = (
        f"sqlite:///{tmp_path / 'audit.sqlite'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    with AuditStore.connect(url) as audit:
        yield audit
        from pacsflow.core.audit import metadata

        metadata.drop_all(audit.engine)


def cohort_row(an: str) -> dict:
    return {
        "accession_number": an,
        "an_ref": f"an:{an}",
        "patient_id": "P",
        "ris_study_uid": None,
        "exam_datetime": datetime(2021, 1, 1),
        "modality": "CT",
        "occurrences": 1,
    }


def listed(uid: str, drop_reason: str | None = None) -> dict:
    return {
        "series_uid": uid,
        "modality": "CT",
        "description": "AX",
        "body_part": None,
        "pacs_instance_count": 2,
        "drop_reason": drop_reason,
        "status": SeriesStatus.DROPPED if drop_reason else SeriesStatus.PENDING,
    }


def attempt(
    store, stage: Stage, batch: int | None = None, state: AttemptState = AttemptState.SUCCESS, error: str | None = None
) -> None:
    attempt_id = store.begin_attempt(RUN, stage, batch=batch, try_number=1)
    if state is not AttemptState.RUNNING:
        store.end_attempt(attempt_id, state, error=error)


def start(store) -> None:
    store.start_run(
        RUN,
        dag_id="pacsflow_extract",
        run_id="manual__1",
        params={},
        interval=(datetime(2021, 1, 1, tzinfo=UTC), datetime(2022, 1, 1, tzinfo=UTC)),
    )


def test_every_accession_ends_in_exactly_one_outcome(store):
    store.start_run(
        RUN,
        dag_id="pacsflow_extract",
        run_id="manual__1",
        params={"a": 1},
        interval=(datetime(2021, 1, 1, tzinfo=UTC), datetime(2022, 1, 1, tzinfo=UTC)),
    )
    store.replace_cohort(RUN, [cohort_row(an) for an in ("A1", "A2", "A3", "A4", "A5", "A6")])
    resolve = {
        "resolved_by": "accession_number",
        "detail": None,
        "rules_tried": ["accession_number"],
        "batch_of": lambda uid: 0,
    }
    store.record_resolution(RUN, "A1", resolution="resolved", study_uids=["1.1"], **resolve)
    store.record_resolution(RUN, "A2", resolution="resolved", study_uids=["1.2"], **resolve)
    store.record_resolution(RUN, "A3", resolution="not_found", study_uids=[], **resolve)
    store.record_resolution(RUN, "A4", resolution="ambiguous", study_uids=[], **resolve)
    store.record_resolution(RUN, "A5", resolution="resolved", study_uids=["1.5"], **resolve)
    # A6 never resolved: a run that died. It must show up as failed, not vanish.
    assert [a["accession_number"] for a in store.unresolved_accessions(RUN)] == ["A6"]
    store.record_series_listing(RUN, "A1", "1.1", [listed("1.1.1"), listed("1.1.2", "modality")])
    store.record_series_listing(RUN, "A2", "1.2", [listed("1.2.1", "description")])
    store.record_series_listing(RUN, "A5", "1.5", [listed("1.5.1")])
    store.update_series(RUN, "1.1", "1.1.1", status=SeriesStatus.COMPLETE, expected=2, received=2, bytes=10)
    store.update_series(RUN, "1.5", "1.5.1", status=SeriesStatus.PARTIAL, expected=2, received=1, bytes=5)

    for stage in (Stage.COHORT, Stage.RESOLVE, Stage.EXPORT):
        attempt(store, stage)
    attempt(store, Stage.RETRIEVE, batch=0)
    store.settle_outcomes(RUN)
    store.finish_run(RUN)
    outcomes = {an: row["outcome"] for an, row in store.accession_outcomes(RUN).items()}
    assert outcomes == {
        "A1": Outcome.RETRIEVED,
        "A2": Outcome.FILTERED,
        "A3": Outcome.NOT_FOUND,
        "A4": Outcome.FAILED,
        "A5": Outcome.FAILED,
        "A6": Outcome.FAILED,
    }
    summary = store.summary(RUN)
    assert summary.cohort == 6 and summary.reconciled
    assert summary.verdict.state == "success" and not summary.succeeded  # every stage ran; A6 is unfinished
    assert summary.outcomes == {"retrieved": 1, "filtered": 1, "not_found": 1, "failed": 3}
    assert summary.instances == 3 and summary.bytes == 15
    assert summary.reasons["series partial"] == 1
    assert store.latest_run_key("pacsflow_extract") == RUN


def test_extracting_again_replaces_the_run_state(store):
    store.replace_cohort(RUN, [cohort_row("A1"), cohort_row("A2")])
    store.record_resolution(
        RUN,
        "A1",
        resolution="resolved",
        resolved_by="accession_number",
        detail=None,
        rules_tried=[],
        study_uids=["1.1"],
        batch_of=lambda uid: 3,
    )
    assert store.study_batches(RUN) == [3]
    store.replace_cohort(RUN, [cohort_row("A2")])
    assert store.cohort_order(RUN) == ["A2"]
    assert store.study_batches(RUN) == []


def test_series_listing_keeps_known_series_state(store):
    store.replace_cohort(RUN, [cohort_row("A1")])
    store.record_resolution(
        RUN,
        "A1",
        resolution="resolved",
        resolved_by="accession_number",
        detail=None,
        rules_tried=[],
        study_uids=["1.1"],
        batch_of=lambda uid: 0,
    )
    store.record_series_listing(RUN, "A1", "1.1", [listed("1.1.1")])
    store.update_series(RUN, "1.1", "1.1.1", status=SeriesStatus.COMPLETE)
    store.record_series_listing(RUN, "A1", "1.1", [listed("1.1.1"), listed("1.1.2")])
    statuses = {row["series_uid"]: row["status"] for row in store.series_of_study(RUN, "1.1")}
    assert statuses == {"1.1.1": SeriesStatus.COMPLETE, "1.1.2": SeriesStatus.PENDING}


def test_the_summary_command_prints_the_reconciled_run(tmp_path, capsys):
    from pacsflow.cli import main

    url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    with AuditStore.connect(url) as store:
        start(store)
        store.replace_cohort(RUN, [cohort_row("A1")])
        store.record_resolution(
            RUN,
            "A1",
            resolution="not_found",
            resolved_by=None,
            detail=None,
            rules_tried=[],
            study_uids=[],
            batch_of=lambda uid: 0,
        )
        for stage in (Stage.COHORT, Stage.RESOLVE, Stage.EXPORT):
            attempt(store, stage)
        assert main(["summary", "--audit-url", url, "--run-key", RUN]) == 3  # not settled yet: running
        assert "state          running" in capsys.readouterr().out
        store.settle_outcomes(RUN)
        store.finish_run(RUN)
    assert main(["summary", "--audit-url", url, "--dag-id", "pacsflow_extract", "--json"]) == 0
    printed = capsys.readouterr().out
    assert '"not_found": 1' in printed and '"reconciled": true' in printed and "A1" not in printed
    assert '"state": "success"' in printed


def test_the_summary_command_fails_for_an_unknown_run(tmp_path, capsys):
    from pacsflow.cli import main

    url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    assert main(["summary", "--audit-url", url, "--run-key", "pacsflow__demo/nope"]) == 2
    assert "no such run" in capsys.readouterr().err


def test_a_run_that_failed_before_its_cohort_is_failed_and_never_reconciled(store, capsys):
    start(store)
    attempt(store, Stage.COHORT, state=AttemptState.FAILED, error="cohort SQL template 'x.sql' not found")
    store.settle_outcomes(RUN)
    store.finish_run(RUN)
    summary = store.summary(RUN)
    assert (summary.verdict.state, summary.verdict.failed_stage) == ("failed", "cohort")
    assert "not found" in summary.verdict.reason
    assert summary.cohort == 0 and not summary.reconciled and not summary.succeeded
    assert "failed at stage cohort" in summary.failure_message()


def test_unfinished_work_is_told_apart_by_why_it_stopped(store):
    """Batch 0 retrieved, batch 1's task failed midway, batch 2 never ran, and resolution died before A5."""
    start(store)
    store.replace_cohort(RUN, [cohort_row(an) for an in ("A1", "A2", "A3", "A4", "A5")])
    for an, batch in (("A1", 0), ("A2", 1), ("A3", 1), ("A4", 2)):
        store.record_resolution(
            RUN,
            an,
            resolution="resolved",
            resolved_by="accession_number",
            detail=None,
            rules_tried=[],
            study_uids=[f"1.{an[1]}"],
            batch_of=lambda uid, b=batch: b,
        )
    for an in ("A1", "A2", "A3"):
        store.record_series_listing(RUN, an, f"1.{an[1]}", [listed(f"1.{an[1]}.1")])
    store.update_series(RUN, "1.1", "1.1.1", status=SeriesStatus.COMPLETE, expected=1, received=1, bytes=1)
    store.update_series(RUN, "1.2", "1.2.1", status=SeriesStatus.COMPLETE, expected=1, received=1, bytes=1)
    attempt(store, Stage.COHORT)
    attempt(store, Stage.RESOLVE, state=AttemptState.FAILED, error="PACS down")
    attempt(store, Stage.RESOLVE)  # the retry resolved what was left, but not A5 (recorded after)
    attempt(store, Stage.RETRIEVE, batch=0)
    attempt(store, Stage.RETRIEVE, batch=1, state=AttemptState.RUNNING)  # its process was killed
    store.settle_outcomes(RUN)
    store.finish_run(RUN)
    rows = store.accession_outcomes(RUN)
    assert {an: (row["outcome"], row["outcome_reason"]) for an, row in rows.items()} == {
        "A1": (Outcome.RETRIEVED, None),
        "A2": (Outcome.RETRIEVED, None),  # complete on disk although its batch's task died
        "A3": (Outcome.FAILED, RETRIEVAL_FAILED),
        "A4": (Outcome.FAILED, RETRIEVAL_NEVER_RAN),
        "A5": (Outcome.FAILED, "resolution task failed"),
    }
    summary = store.summary(RUN)
    assert summary.unfinished == 3 and summary.reconciled
    assert (summary.verdict.state, summary.verdict.failed_stage) == ("failed", "retrieve")
    assert summary.verdict.reason.startswith("2 retrieval batch(es) did not finish; batch 1: interrupted")


def test_an_accession_never_resolved_because_resolution_never_ran(store):
    start(store)
    store.replace_cohort(RUN, [cohort_row("A1")])
    attempt(store, Stage.COHORT)
    store.settle_outcomes(RUN)
    assert store.accession_outcomes(RUN)["A1"]["outcome_reason"] == RESOLUTION_NEVER_RAN
