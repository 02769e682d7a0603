from datetime import datetime, timezone

import pytest

from pacsflow.core.audit import AuditStore, Outcome, SeriesStatus

RUN = "pacsflow_extract/manual__1"


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    url = (f"sqlite:///{tmp_path / 'audit.sqlite'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    with AuditStore.connect(url) as audit:
        yield audit
        from pacsflow.core.audit import metadata
        metadata.drop_all(audit.engine)


def cohort_row(an: str) -> dict:
    return {"accession_number": an, "an_ref": f"an:{an}", "patient_id": "P", "ris_study_uid": None,
            "exam_datetime": datetime(2021, 1, 1), "modality": "CT", "occurrences": 1}


def listed(uid: str, drop_reason: str | None = None) -> dict:
    return {"series_uid": uid, "modality": "CT", "description": "AX", "body_part": None,
            "pacs_instance_count": 2, "drop_reason": drop_reason,
            "status": SeriesStatus.DROPPED if drop_reason else SeriesStatus.PENDING}


def test_every_accession_ends_in_exactly_one_outcome(store):
    store.start_run(RUN, dag_id="pacsflow_extract", run_id="manual__1", params={"a": 1},
                    interval=(datetime(2021, 1, 1, tzinfo=timezone.utc), datetime(2022, 1, 1, tzinfo=timezone.utc)))
    store.replace_cohort(RUN, [cohort_row(an) for an in ("A1", "A2", "A3", "A4", "A5", "A6")])
    resolve = dict(resolved_by="accession_number", detail=None, rules_tried=["accession_number"],
                   batch_of=lambda uid: 0)
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

    store.settle_outcomes(RUN)
    outcomes = {an: row["outcome"] for an, row in store.accession_outcomes(RUN).items()}
    assert outcomes == {"A1": Outcome.RETRIEVED, "A2": Outcome.FILTERED, "A3": Outcome.NOT_FOUND,
                        "A4": Outcome.FAILED, "A5": Outcome.FAILED, "A6": Outcome.FAILED}
    summary = store.summary(RUN)
    assert summary.cohort == 6 and summary.reconciled
    assert summary.outcomes == {"retrieved": 1, "filtered": 1, "not_found": 1, "failed": 3}
    assert summary.instances == 3 and summary.bytes == 15
    assert summary.reasons["series partial"] == 1
    assert store.latest_run_key("pacsflow_extract") == RUN


def test_extracting_again_replaces_the_run_state(store):
    store.replace_cohort(RUN, [cohort_row("A1"), cohort_row("A2")])
    store.record_resolution(RUN, "A1", resolution="resolved", resolved_by="accession_number", detail=None,
                            rules_tried=[], study_uids=["1.1"], batch_of=lambda uid: 3)
    assert store.study_batches(RUN) == [3]
    store.replace_cohort(RUN, [cohort_row("A2")])
    assert store.cohort_order(RUN) == ["A2"]
    assert store.study_batches(RUN) == []


def test_series_listing_keeps_known_series_state(store):
    store.replace_cohort(RUN, [cohort_row("A1")])
    store.record_resolution(RUN, "A1", resolution="resolved", resolved_by="accession_number", detail=None,
                            rules_tried=[], study_uids=["1.1"], batch_of=lambda uid: 0)
    store.record_series_listing(RUN, "A1", "1.1", [listed("1.1.1")])
    store.update_series(RUN, "1.1", "1.1.1", status=SeriesStatus.COMPLETE)
    store.record_series_listing(RUN, "A1", "1.1", [listed("1.1.1"), listed("1.1.2")])
    statuses = {row["series_uid"]: row["status"] for row in store.series_of_study(RUN, "1.1")}
    assert statuses == {"1.1.1": SeriesStatus.COMPLETE, "1.1.2": SeriesStatus.PENDING}


def test_the_summary_command_prints_the_reconciled_run(tmp_path, capsys):
    from pacsflow.cli import main

    url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    with AuditStore.connect(url) as store:
        store.start_run(RUN, dag_id="pacsflow_extract", run_id="manual__1", params={},
                        interval=(datetime(2021, 1, 1, tzinfo=timezone.utc), datetime(2022, 1, 1, tzinfo=timezone.utc)))
        store.replace_cohort(RUN, [cohort_row("A1")])
        store.record_resolution(RUN, "A1", resolution="not_found", resolved_by=None, detail=None, rules_tried=[],
                                study_uids=[], batch_of=lambda uid: 0)
        store.settle_outcomes(RUN)
    assert main(["summary", "--audit-url", url, "--json"]) == 0
    printed = capsys.readouterr().out
    assert '"not_found": 1' in printed and '"reconciled": true' in printed and "A1" not in printed
