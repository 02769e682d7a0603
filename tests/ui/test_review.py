"""The review read model on an audit store filled through the store's own API (SQLite and PostgreSQL):
pagination and filters in SQL, per-AN stories by reference only, series references, downloads and the
comparison of two runs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pacsflow.core.audit import AttemptState, AuditStore, Stage
from pacsflow.core.audit.migrate import remove as remove_audit_store
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.ui.review import AccessionFilter, AuditReview, Page, RunFilter, series_ref
from sqlalchemy import create_engine

KEY = Pseudonymizer(b"review-test-key-0123456789")
INTERVAL = (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC))


def fill_run(store: AuditStore, run_id: str, found: set[int], partial: set[int], size: int = 30) -> str:
    """ANs A00..: those in ``found`` resolve to one study with a kept and a dropped series; ``partial`` of
    them received half their instances."""
    run_key = f"extract/{run_id}"
    store.start_run(run_key, dag_id="extract", run_id=run_id, params={}, interval=INTERVAL, run_type="manual")
    for stage, batch in ((Stage.COHORT, None), (Stage.RESOLVE, None), (Stage.RETRIEVE, 0), (Stage.EXPORT, None)):
        store.end_attempt(
            store.begin_attempt(run_key, stage, batch=batch, try_number=1),
            AttemptState.SUCCESS,
            counts={"bytes_fetched": 1000} if stage is Stage.RETRIEVE else {},
        )
    numbers = [f"A{i:02d}" for i in range(size)]
    store.replace_cohort(run_key, [{"accession_number": n, "an_ref": KEY.ref(n), "modality": "CT"} for n in numbers])
    for i, number in enumerate(numbers):
        study = f"1.2.3.{i}"
        store.record_resolution(
            run_key,
            number,
            resolution="resolved" if i in found else "not_found",
            resolved_by="accession_number" if i in found else None,
            detail=None,
            rules_tried=["accession_number"],
            study_uids=[study] if i in found else [],
            batch_of=lambda _uid: 0,
        )
        if i not in found:
            continue
        store.record_series_listing(
            run_key,
            number,
            study,
            [
                {
                    "series_uid": f"{study}.1",
                    "modality": "CT",
                    "description": "AXIAL",
                    "body_part": None,
                    "pacs_instance_count": 10,
                    "drop_reason": None,
                    "status": "pending",
                },
                {
                    "series_uid": f"{study}.2",
                    "modality": "CT",
                    "description": "SCOUT",
                    "body_part": None,
                    "pacs_instance_count": 1,
                    "drop_reason": "description",
                    "status": "dropped",
                },
            ],
        )
        received = 5 if i in partial else 10
        store.update_series(
            run_key,
            study,
            f"{study}.1",
            status="partial" if i in partial else "complete",
            expected=10,
            received=received,
            fetched=received,
            bytes=received * 1000,
        )
    store.settle_outcomes(run_key)
    store.finish_run(run_key)
    return run_key


def fill(store: AuditStore) -> None:
    fill_run(store, "first", found=set(range(20)), partial={3, 4})
    fill_run(store, "second", found=set(range(25)), partial={4, 5, 6})


@pytest.fixture(scope="module")
def filled_sqlite(tmp_path_factory) -> Path:
    """The SQLite store filled once; each test works on its own copy of the file."""
    path = tmp_path_factory.mktemp("review") / "audit.sqlite"
    store = AuditStore(create_engine(f"sqlite:///{path}", hide_parameters=True))
    try:
        fill(store)
    finally:
        store.close()
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def review(request, tmp_path) -> Iterator[AuditReview]:
    if request.param == "sqlite":
        copy = shutil.copy(request.getfixturevalue("filled_sqlite"), tmp_path / "audit.sqlite")
        store = AuditStore(create_engine(f"sqlite:///{copy}", hide_parameters=True))
    else:
        store = AuditStore(create_engine(request.getfixturevalue("postgres_url"), hide_parameters=True))
        fill(store)
    try:
        yield AuditReview(store)
    finally:
        remove_audit_store(store.engine)  # the PostgreSQL database is shared by the session
        store.close()


def test_runs_are_listed_newest_first_for_the_readable_dags_only(review):
    listing = review.runs(["extract"], RunFilter(), Page.of(1, 25))
    assert [row["run"].run_id for row in listing.rows] == ["second", "first"]
    second = listing.rows[0]["run"]
    assert (second.cohort, second.outcomes, second.reconciled) == (
        30,
        {"retrieved": 22, "failed": 3, "not_found": 5},
        True,
    )
    assert second.studies_retrieved == 22 and second.bytes == (22 * 10 + 3 * 5) * 1000
    assert review.runs(["other"], RunFilter(), Page()).total == 0
    assert (second.state, first_state(review)) == ("success", "success")
    assert review.runs(["extract"], RunFilter(state="running"), Page()).total == 0
    assert review.runs(["extract"], RunFilter(state="success"), Page.of(1, 25)).total == 2
    assert review.runs(["extract"], RunFilter(state="failed"), Page()).total == 0
    assert review.runs(["extract"], RunFilter(started_to=datetime(2020, 1, 1).date()), Page()).total == 0


def first_state(review: AuditReview) -> str:
    return review.run("extract", "first").state


def test_a_run_whose_retrieval_failed_is_listed_as_failed_with_the_stage(review):
    store = review.store
    store.end_attempt(
        store.begin_attempt("extract/first", Stage.RETRIEVE, batch=0, try_number=2),
        AttemptState.FAILED,
        error="the PACS looks unavailable",
    )
    failed = review.runs(["extract"], RunFilter(state="failed"), Page())
    assert [row["run"].run_id for row in failed.rows] == ["first"]
    assert failed.rows[0]["run"].failed_stage == "retrieve"
    labels = [stage["label"] for stage in review.stages("extract/first")]
    assert labels == ["cohort", "resolve", "retrieve[0]", "export", "retrieve[0] try 2"]


def test_the_an_table_pages_and_filters_in_sql_and_shows_references_only(review):
    first_page = review.accessions("extract/second", AccessionFilter(), Page.of(1, 25))
    second_page = review.accessions("extract/second", AccessionFilter(), Page.of(2, 25))
    assert (first_page.total, len(first_page.rows), len(second_page.rows), first_page.pages) == (30, 25, 5, 2)
    refs = [row["an_ref"] for row in first_page.rows + second_page.rows]
    assert sorted(refs) == sorted(KEY.ref(f"A{i:02d}") for i in range(30))
    assert all("accession_number" not in row and "patient_id" not in row for row in first_page.rows)
    failed = review.accessions("extract/second", AccessionFilter(reason="series partial"), Page())
    assert sorted(row["an_ref"] for row in failed.rows) == sorted(KEY.ref(f"A{i:02d}") for i in (4, 5, 6))


def test_an_an_is_found_by_its_keyed_reference_with_its_series(review):
    story = review.accession("extract/second", KEY.ref("A05"))
    assert (story["outcome"], story["outcome_reason"], story["studies"]) == ("failed", "series partial", 1)
    assert {(s["description"], s["status"]) for s in story["series"]} == {("AXIAL", "partial"), ("SCOUT", "dropped")}
    assert "accession_number" not in story and "ris_study_uid" not in story
    assert review.accession("extract/second", KEY.ref("A99")) is None
    found = review.series_by_ref("extract/second", KEY, series_ref(KEY, "1.2.3.5", "1.2.3.5.1"))
    assert (found.study_uid, found.series_uid) == ("1.2.3.5", "1.2.3.5.1")
    assert review.series_by_ref("extract/second", KEY, "0" * 16) is None


def test_two_runs_compared_an_by_an(review):
    diff = review.compare("extract/first", "extract/second")
    refs = {name: sorted(row["an_ref"] for row in diff[name]["rows"]) for name in ("resolved", "failed", "partial")}
    assert refs["resolved"] == sorted(KEY.ref(f"A{i:02d}") for i in range(20, 25))
    assert refs["partial"] == sorted(KEY.ref(f"A{i:02d}") for i in (5, 6))
    assert refs["failed"] == refs["partial"]
    assert diff["outcomes"]["retrieved"] == (18, 22) and (diff["only_a"], diff["only_b"]) == (0, 0)


def test_the_download_has_one_row_per_an_with_series_counts(review):
    rows = list(review.export_rows("extract/second"))
    assert len(rows) == 30
    by_ref = {row["an_ref"]: row for row in rows}
    assert by_ref[KEY.ref("A05")]["series_partial"] == 1 and by_ref[KEY.ref("A05")]["series_dropped"] == 1
    assert by_ref[KEY.ref("A05")]["instances_received"] == 5 and by_ref[KEY.ref("A29")]["series_complete"] == 0
    assert all("accession_number" not in row and "patient_id" not in row for row in rows)


def test_chart_labels_are_escaped():
    from pacsflow.ui.charts import bar_chart

    svg = str(bar_chart({"<script>alert(1)</script>": 3}, title="a & b"))
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "a &amp; b" in svg
