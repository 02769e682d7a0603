"""The demo RIS: one ``exams`` table, SQLAlchemy Core with portable types (SQLite, PostgreSQL, ...)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from sqlalchemy import Column, Date, DateTime, Index, MetaData, String, Table, Unicode, create_engine, insert

from pacsflow.demo.hospital.plan import PlannedExam

INSERT_CHUNK = 1000

metadata = MetaData()
exams_table = Table(
    "exams",
    metadata,
    Column("accession_number", String(16), primary_key=True),
    Column("patient_id", String(64), nullable=False),
    Column("patient_name", Unicode(128)),
    Column("patient_birth_date", Date),
    Column("study_instance_uid", String(64)),  # the RIS's copy: may be stale or missing
    Column("exam_datetime", DateTime, nullable=False),  # naive UTC
    Column("modality", String(16), nullable=False),
    Column("exam_code", String(16), nullable=False),
    Column("exam_description", String(64)),
    Column("body_part", String(16)),
    Index("ix_exams_exam_datetime", "exam_datetime"),
)


def ris_row(exam: PlannedExam) -> dict[str, Any]:
    return {
        "accession_number": exam.accession_number,
        "patient_id": exam.patient.patient_id,
        "patient_name": exam.patient.name,
        "patient_birth_date": exam.patient.birth_date,
        "study_instance_uid": exam.ris_study_uid,
        "exam_datetime": exam.exam_datetime,
        "modality": exam.exam_type.modality,
        "exam_code": exam.exam_type.code,
        "exam_description": exam.exam_type.description,
        "body_part": exam.exam_type.body_part,
    }


def write_ris(url: str, exams: Iterable[PlannedExam]) -> int:
    """Replace the ``exams`` table at ``url`` (drop, create, fill); returns the number of rows."""
    engine = create_engine(url, hide_parameters=True)
    try:
        count = 0
        with engine.begin() as connection:
            exams_table.drop(connection, checkfirst=True)
            exams_table.create(connection)
            for chunk in _chunks((ris_row(exam) for exam in exams), INSERT_CHUNK):
                connection.execute(insert(exams_table), chunk)
                count += len(chunk)
        return count
    finally:
        engine.dispose()


def _chunks(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    iterator = iter(rows)
    while chunk := list(islice(iterator, size)):
        yield chunk
