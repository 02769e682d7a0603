"""Identifiers stay contained on the failure paths a reviewer forces: a locked audit database, a RIS value
that does not fit its column, two tasks listing the same study at once. None of them may put an AN, a
patient ID or a UID into an exception or a log line, and none may fail the whole cohort."""

from __future__ import annotations

import logging
import sqlite3
import threading
from datetime import datetime

import pytest
from pacsflow.core.audit import AuditStore, SeriesStatus, series
from pacsflow.core.pipeline import RunContext, extract_cohort
from pacsflow.core.privacy import Pseudonymizer
from pacsflow.core.ris import RisExam, query_cohort
from sqlalchemy import Column, DateTime, MetaData, String, Table, create_engine, insert, select
from sqlalchemy.exc import OperationalError

RUN_KEY = "test/containment"
AN, PATIENT_ID = "20240001", "PID-7731-CONFIDENTIAL"
STUDY_UID, SERIES_UID = "1.2.826.0.1.3680043.10.1234.55.1.1", "1.2.826.0.1.3680043.10.1234.55.2.1"
IDENTIFIERS = (AN, PATIENT_ID, STUDY_UID, SERIES_UID)


def _context(store: AuditStore) -> RunContext:
    return RunContext(store=store, run_key=RUN_KEY, pseudonymizer=Pseudonymizer(b"k" * 32))


def _assert_contained(*texts: str) -> None:
    leaked = [identifier for identifier in IDENTIFIERS for text in texts if identifier in text]
    assert leaked == []


def test_a_locked_audit_database_shows_no_identifier(tmp_path, caplog):
    path = tmp_path / "audit.sqlite"
    with AuditStore.connect(f"sqlite:///{path}") as store:
        extract_cohort(_context(store), lambda: [RisExam(AN, PATIENT_ID)], batch_size=10)
    locker = sqlite3.connect(path)
    locker.execute("BEGIN IMMEDIATE")  # another process is writing: reads work, writes wait and time out
    try:
        with (
            caplog.at_level(logging.DEBUG),
            AuditStore.connect(f"sqlite:///{path}?timeout=0.2") as store,
            pytest.raises(OperationalError) as raised,
        ):
            store.record_resolution(
                RUN_KEY,
                AN,
                resolution="resolved",
                resolved_by="accession_number",
                detail=None,
                rules_tried=[],
                study_uids=[STUDY_UID],
                batch_of=lambda _: 0,
            )
    finally:
        locker.rollback()
        locker.close()
    assert "database is locked" in str(raised.value)
    _assert_contained(str(raised.value), repr(raised.value), caplog.text)


@pytest.fixture(params=["sqlite", "postgresql"])
def audit_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.sqlite'}"
    url = request.getfixturevalue("postgres_url")
    engine = create_engine(url)
    with engine.begin() as conn:  # each test starts from empty tables
        for table in ("pacsflow_series", "pacsflow_studies", "pacsflow_accessions"):
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
    engine.dispose()
    return url


def test_an_over_long_ris_value_makes_only_its_an_invalid(audit_url, tmp_path, caplog):
    ris = create_engine(f"sqlite:///{tmp_path / 'ris.sqlite'}", hide_parameters=True)
    exams = Table(
        "exams",
        MetaData(),
        Column("accession_number", String),
        Column("patient_id", String),
        Column("modality", String),
        Column("exam_datetime", DateTime),
    )
    exams.create(ris)
    moment = datetime(2024, 3, 1, 10, 0)
    rows = [
        {"accession_number": f"2024{i:04d}", "patient_id": f"P{i}", "modality": "CT", "exam_datetime": moment}
        for i in range(2, 18)
    ]
    rows.append(
        {
            "accession_number": AN,
            "patient_id": PATIENT_ID,
            "modality": "CT ARTHRO SHOULDER LEFT",
            "exam_datetime": moment,
        }
    )  # longer than the 16 characters of a DICOM CS / the audit column
    with ris.begin() as conn:
        conn.execute(insert(exams), rows)
    sql = "SELECT * FROM exams WHERE exam_datetime >= :interval_start AND exam_datetime < :interval_end"
    with caplog.at_level(logging.DEBUG), AuditStore.connect(audit_url) as store:
        found = query_cohort(
            ris, sql, interval_start=datetime(2024, 1, 1), interval_end=datetime(2025, 1, 1), params={}
        )
        counts = extract_cohort(_context(store), lambda: found, batch_size=10)
        outcomes = store.accession_outcomes(RUN_KEY)
    ris.dispose()
    assert counts["accessions"] == 17 and counts["invalid"] == 1
    assert outcomes[AN]["resolution"] == "invalid"
    assert outcomes[AN]["resolution_detail"] == "RIS modality longer than 16 characters"
    assert outcomes[AN]["modality"] is None and outcomes[AN]["patient_id"] == PATIENT_ID
    assert sum(row["resolution"] is None for row in outcomes.values()) == 16  # the others go on to resolution
    _assert_contained(caplog.text)


def test_two_tasks_listing_the_same_study_do_not_collide(audit_url, caplog):
    """Task A's listing is in flight (its transaction holds the row) when task B lists the same study."""
    with AuditStore.connect(audit_url) as store:
        extract_cohort(_context(store), lambda: [RisExam(AN, PATIENT_ID)], batch_size=10)
        store.record_resolution(
            RUN_KEY,
            AN,
            resolution="resolved",
            resolved_by="accession_number",
            detail=None,
            rules_tried=[],
            study_uids=[STUDY_UID],
            batch_of=lambda _: 0,
        )
        listed = [
            {
                "series_uid": SERIES_UID,
                "modality": "CT",
                "description": None,
                "body_part": None,
                "pacs_instance_count": 3,
                "drop_reason": None,
                "status": SeriesStatus.PENDING,
            }
        ]
        errors: list[BaseException] = []

        def task_b() -> None:
            try:
                store.record_series_listing(RUN_KEY, AN, STUDY_UID, listed)
            except BaseException as error:
                errors.append(error)

        task_a = store.engine.connect()
        transaction = task_a.begin()
        task_a.execute(
            insert(series), [{"run_key": RUN_KEY, "study_uid": STUDY_UID, "accession_number": AN, **listed[0]}]
        )
        other = threading.Thread(target=task_b)
        with caplog.at_level(logging.DEBUG):
            other.start()
            other.join(timeout=1.0)  # PostgreSQL: B waits on A's row; SQLite: B waits on A's write lock
            transaction.commit()
            task_a.close()
            other.join(timeout=30)
        assert not other.is_alive()
        assert errors == []
        with store.engine.connect() as conn:
            rows = conn.execute(select(series.c.series_uid).where(series.c.run_key == RUN_KEY)).all()
    assert rows == [(SERIES_UID,)]
    _assert_contained(caplog.text)


def test_every_engine_hides_bound_parameters(tmp_path):
    from pacsflow.hooks.database import DatabaseHook

    with AuditStore.connect(f"sqlite:///{tmp_path / 'a.sqlite'}") as store:
        assert store.engine.hide_parameters
    hook = DatabaseHook.__new__(DatabaseHook)
    hook.sqlalchemy_url = lambda: create_engine("sqlite://").url  # type: ignore[method-assign]
    assert hook.get_conn().hide_parameters


def test_database_error_details_are_withheld_at_the_operator_boundary(postgres_url):
    """PostgreSQL's DETAIL quotes the key even with hidden parameters; operators re-raise without it."""
    from pacsflow.core.privacy import DatabaseError, database_errors_withheld
    from sqlalchemy.exc import IntegrityError

    engine = create_engine(postgres_url, hide_parameters=True)
    table = Table("containment_keys", MetaData(), Column("an", String(16), primary_key=True))
    table.drop(engine, checkfirst=True)
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), [{"an": AN}])
    with pytest.raises(IntegrityError) as raw, engine.begin() as conn:
        conn.execute(insert(table), [{"an": AN}])
    assert AN in str(raw.value)  # what hide_parameters alone lets through
    with pytest.raises(DatabaseError) as withheld, database_errors_withheld(), engine.begin() as conn:
        conn.execute(insert(table), [{"an": AN}])
    engine.dispose()
    assert "UniqueViolation 23505" in str(withheld.value)
    assert withheld.value.__cause__ is None and withheld.value.__suppress_context__
    _assert_contained(str(withheld.value))


def test_uids_in_library_log_records_are_replaced_by_keyed_references(caplog):
    """pynetdicom warns with the SOP Instance UID in clear (e.g. a non-conformant UID); its modules log
    through child loggers, which a filter on the parent logger alone would not reach."""
    import pynetdicom.utils
    from pacsflow.core.privacy import redact_uids_in_library_logs

    pseudonymizer = Pseudonymizer(b"k" * 32)
    redact_uids_in_library_logs(pseudonymizer)
    with caplog.at_level(logging.DEBUG, logger="pynetdicom"):
        pynetdicom.utils.set_uid(STUDY_UID + ".01", "Affected SOP Instance UID", True, False, True)
    assert "Non-conformant" in caplog.text
    assert pseudonymizer.ref(STUDY_UID + ".01", "uid") in caplog.text
    _assert_contained(caplog.text)
