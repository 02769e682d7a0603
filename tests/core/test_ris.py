from datetime import datetime

import pytest
from pacsflow.core.ris import CohortQueryError, RisExam, load_template, query_cohort
from pacsflow.demo.environment import REPO_ROOT
from sqlalchemy import Column, DateTime, MetaData, String, Table, create_engine, insert
from sqlalchemy.exc import ProgrammingError

SQL_DIR = REPO_ROOT / "include" / "sql"
INTERVAL = {"interval_start": datetime(2021, 1, 1), "interval_end": datetime(2022, 1, 1)}


def ris_engine(url: str):
    engine = create_engine(url)
    metadata = MetaData()
    exams = Table(
        "exams",
        metadata,
        Column("accession_number", String(16), primary_key=True),
        Column("patient_id", String(64)),
        Column("study_instance_uid", String(64)),
        Column("exam_datetime", DateTime),
        Column("modality", String(16)),
        Column("exam_code", String(16)),
    )
    metadata.drop_all(engine)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(exams),
            [
                {
                    "accession_number": "A1",
                    "patient_id": "P1",
                    "study_instance_uid": "1.2.3",
                    "modality": "CT",
                    "exam_datetime": datetime(2021, 3, 1, 10, 0),
                    "exam_code": "CTSHA",
                },
                {
                    "accession_number": "A2",
                    "patient_id": "P2",
                    "study_instance_uid": None,
                    "modality": "MG",
                    "exam_datetime": datetime(2021, 12, 31, 23, 59),
                    "exam_code": "MGSCR",
                },
                {
                    "accession_number": "A3",
                    "patient_id": "P3",
                    "study_instance_uid": "1.2.4",
                    "modality": "MR",
                    "exam_datetime": datetime(2021, 6, 1),
                    "exam_code": "MRKNE",
                },
                # Exactly at the end of the interval: excluded (half-open), so backfills never overlap.
                {
                    "accession_number": "A4",
                    "patient_id": "P4",
                    "study_instance_uid": "1.2.5",
                    "modality": "CT",
                    "exam_datetime": datetime(2022, 1, 1),
                    "exam_code": "CTSHA",
                },
            ],
        )
    return engine


def run(engine, template, **params):
    return list(query_cohort(engine, load_template(template, SQL_DIR), params=params, **INTERVAL))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_cohort_by_modality_is_bounded_by_the_interval(backend, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'ris.sqlite'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    engine = ris_engine(url)
    exams = run(engine, "cohort_by_modality.sql", modalities=["CT", "MG"])
    assert [e.accession_number for e in exams] == ["A1", "A2"]
    assert exams[0] == RisExam("A1", "P1", "1.2.3", datetime(2021, 3, 1, 10, 0), "CT")
    assert exams[1].study_instance_uid is None


def test_cohort_by_exam_code(tmp_path):
    engine = ris_engine(f"sqlite:///{tmp_path / 'ris.sqlite'}")
    assert [e.accession_number for e in run(engine, "cohort_by_exam_code.sql", exam_codes=["CTSHA"])] == ["A1"]


def test_values_are_bound_not_formatted(tmp_path):
    engine = ris_engine(f"sqlite:///{tmp_path / 'ris.sqlite'}")
    assert run(engine, "cohort_by_modality.sql", modalities=["CT') OR 1=1 --"]) == []


@pytest.mark.parametrize("name", ["../secrets.sql", "/etc/passwd", "cohort.txt", "a b.sql"])
def test_template_names_cannot_escape_the_template_directory(name):
    with pytest.raises(CohortQueryError, match="bare file name"):
        load_template(name, SQL_DIR)


def test_unknown_template_and_missing_parameter_are_explained(tmp_path):
    with pytest.raises(CohortQueryError, match="not found"):
        load_template("nope.sql", SQL_DIR)
    engine = ris_engine(f"sqlite:///{tmp_path / 'ris.sqlite'}")
    with pytest.raises(CohortQueryError, match="modalities"):
        run(engine, "cohort_by_modality.sql")
    with pytest.raises(CohortQueryError, match="empty list"):
        run(engine, "cohort_by_modality.sql", modalities=[])


def test_template_without_accession_number_is_refused(tmp_path):
    engine = ris_engine(f"sqlite:///{tmp_path / 'ris.sqlite'}")
    sql = "SELECT patient_id FROM exams WHERE exam_datetime >= :interval_start AND exam_datetime < :interval_end"
    with pytest.raises(CohortQueryError, match="accession_number"):
        list(query_cohort(engine, sql, params={}, **INTERVAL))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_ris_with_text_dates_needs_the_day_bounds(backend, tmp_path, request):
    """'20210215' >= '2021-02-01 00:00:00' is false as text: on SQLite the natural template silently finds
    nothing (PostgreSQL refuses to compare text with a timestamp); the text-date template (day bounds bound as
    'YYYYMMDD') finds the interval's exams on both."""
    url = f"sqlite:///{tmp_path / 'ris.sqlite'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    engine = create_engine(url)
    metadata = MetaData()
    exams = Table(
        "exams_text_dates",
        metadata,
        Column("accession_number", String(16), primary_key=True),
        Column("patient_id", String(64)),
        Column("study_instance_uid", String(64)),
        Column("exam_date", String(8)),
        Column("modality", String(16)),
    )
    metadata.drop_all(engine)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(exams),
            [
                {"accession_number": "T1", "exam_date": "20210215", "modality": "CT"},
                {"accession_number": "T2", "exam_date": "20210131", "modality": "CT"},  # the day before
                {"accession_number": "T3", "exam_date": "20210301", "modality": "CT"},  # the end: excluded
                {"accession_number": "T4", "exam_date": "20210228", "modality": "CT"},
            ],
        )
    february = {"interval_start": datetime(2021, 2, 1), "interval_end": datetime(2021, 3, 1)}
    naive = (
        "SELECT accession_number FROM exams_text_dates WHERE exam_date >= :interval_start AND exam_date < :interval_end"
    )
    if backend == "sqlite":
        assert list(query_cohort(engine, naive, params={}, **february)) == []
    else:
        with pytest.raises(ProgrammingError):
            list(query_cohort(engine, naive, params={}, **february))
    found = query_cohort(
        engine, load_template("cohort_text_dates.sql", SQL_DIR), params={"modalities": ["CT"]}, **february
    )
    assert [exam.accession_number for exam in found] == ["T1", "T4"]
    engine.dispose()
