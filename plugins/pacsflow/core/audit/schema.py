"""The audit store's tables: one row per run, AN, study and series, plus one per stage attempt.

A change here needs a migration in ``migrations/versions`` (the test of the migrations fails until the migrated
schema equals these tables again).
"""

from __future__ import annotations

from sqlalchemy import JSON, Boolean, Column, DateTime, Integer, MetaData, String, Table, Text

metadata = MetaData()

# Alembic's bookkeeping table for these tables; its own name, so it never meets Airflow's ``alembic_version``
# when the audit store shares Airflow's metadata database.
VERSION_TABLE = "pacsflow_alembic_version"

runs = Table(
    "pacsflow_runs",
    metadata,
    Column("run_key", String(250), primary_key=True),
    Column("dag_id", String(250)),
    Column("run_id", String(250)),
    Column("run_type", String(32)),
    Column("triggered_by", String(250)),
    Column("params", JSON),
    Column("interval_start", DateTime(timezone=True)),
    Column("interval_end", DateTime(timezone=True)),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
)

accessions = Table(
    "pacsflow_accessions",
    metadata,
    Column("run_key", String(250), primary_key=True),
    Column("accession_number", String(64), primary_key=True),
    Column("an_ref", String(32), nullable=False),
    Column("patient_id", String(64)),
    Column("ris_study_uid", String(64)),
    Column("exam_datetime", DateTime),
    Column("modality", String(16)),
    Column("occurrences", Integer, nullable=False, default=1),
    Column("resolution", String(16)),
    Column("resolved_by", String(32)),
    Column("resolution_detail", Text),
    Column("rules_tried", JSON),
    Column("outcome", String(16)),
    Column("outcome_reason", Text),
    Column("updated_at", DateTime(timezone=True)),
)

studies = Table(
    "pacsflow_studies",
    metadata,
    Column("run_key", String(250), primary_key=True),
    Column("accession_number", String(64), primary_key=True),
    Column("study_uid", String(64), primary_key=True),
    Column("batch", Integer, nullable=False),
    Column("listed", Boolean, nullable=False, default=False),
    Column("error", Text),
)

series = Table(
    "pacsflow_series",
    metadata,
    Column("run_key", String(250), primary_key=True),
    Column("study_uid", String(64), primary_key=True),
    Column("series_uid", String(64), primary_key=True),
    Column("accession_number", String(64), nullable=False),
    Column("modality", String(16)),
    Column("description", String(128)),
    Column("body_part", String(32)),
    Column("pacs_instance_count", Integer),
    Column("drop_reason", String(32)),
    Column("status", String(16), nullable=False),
    Column("expected", Integer),
    Column("received", Integer),
    Column("fetched", Integer),
    Column("bytes", Integer),
    Column("error", Text),
    Column("seconds", JSON),
    Column("updated_at", DateTime(timezone=True)),
)

# One row per attempt of a stage (a task try): when it ran, how it ended and what it counted. The run's verdict
# and the reasons of unfinished ANs are derived from these rows, so the audit needs nothing from Airflow.
stage_attempts = Table(
    "pacsflow_stage_attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_key", String(250), nullable=False, index=True),
    Column("stage", String(32), nullable=False),
    Column("batch", Integer),
    Column("try_number", Integer),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Column("state", String(16), nullable=False),
    Column("error", Text),
    Column("counts", JSON),
)

AUDIT_TABLES = {
    "runs": runs,
    "accessions": accessions,
    "studies": studies,
    "series": series,
    "stage_attempts": stage_attempts,
}


def accession_column_length(name: str) -> int:
    """The longest value the accessions table stores in column ``name`` (RIS values are checked against it)."""
    length = accessions.c[name].type.length  # type: ignore[attr-defined]  # String columns only
    if not isinstance(length, int):
        raise TypeError(f"pacsflow_accessions.{name} has no length")
    return length
