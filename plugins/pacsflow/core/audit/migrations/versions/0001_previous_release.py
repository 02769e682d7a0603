"""The schema of the release before migrations (main at 430716e): runs, accessions, studies, series and the
stage events, as that release's ``create_all`` made them. Its databases have these tables and no version row;
they are stamped at this revision and upgraded from here.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pacsflow_runs",
        sa.Column("run_key", sa.String(250), primary_key=True),
        sa.Column("dag_id", sa.String(250)),
        sa.Column("run_id", sa.String(250)),
        sa.Column("run_type", sa.String(32)),
        sa.Column("triggered_by", sa.String(250)),
        sa.Column("params", sa.JSON),
        sa.Column("interval_start", sa.DateTime(timezone=True)),
        sa.Column("interval_end", sa.DateTime(timezone=True)),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "pacsflow_accessions",
        sa.Column("run_key", sa.String(250), primary_key=True),
        sa.Column("accession_number", sa.String(64), primary_key=True),
        sa.Column("an_ref", sa.String(32), nullable=False),
        sa.Column("patient_id", sa.String(64)),
        sa.Column("ris_study_uid", sa.String(64)),
        sa.Column("exam_datetime", sa.DateTime),
        sa.Column("modality", sa.String(16)),
        sa.Column("occurrences", sa.Integer, nullable=False),
        sa.Column("resolution", sa.String(16)),
        sa.Column("resolved_by", sa.String(32)),
        sa.Column("resolution_detail", sa.Text),
        sa.Column("rules_tried", sa.JSON),
        sa.Column("outcome", sa.String(16)),
        sa.Column("outcome_reason", sa.Text),
        sa.Column("updated_at", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "pacsflow_studies",
        sa.Column("run_key", sa.String(250), primary_key=True),
        sa.Column("accession_number", sa.String(64), primary_key=True),
        sa.Column("study_uid", sa.String(64), primary_key=True),
        sa.Column("batch", sa.Integer, nullable=False),
        sa.Column("listed", sa.Boolean, nullable=False),
        sa.Column("error", sa.Text),
    )
    op.create_table(
        "pacsflow_series",
        sa.Column("run_key", sa.String(250), primary_key=True),
        sa.Column("study_uid", sa.String(64), primary_key=True),
        sa.Column("series_uid", sa.String(64), primary_key=True),
        sa.Column("accession_number", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16)),
        sa.Column("description", sa.String(128)),
        sa.Column("body_part", sa.String(32)),
        sa.Column("pacs_instance_count", sa.Integer),
        sa.Column("drop_reason", sa.String(32)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("expected", sa.Integer),
        sa.Column("received", sa.Integer),
        sa.Column("fetched", sa.Integer),
        sa.Column("bytes", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("seconds", sa.JSON),
        sa.Column("updated_at", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "pacsflow_stage_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_key", sa.String(250), nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("counts", sa.JSON),
    )
    op.create_index("ix_pacsflow_stage_events_run_key", "pacsflow_stage_events", ["run_key"])


def downgrade() -> None:
    op.drop_index("ix_pacsflow_stage_events_run_key", table_name="pacsflow_stage_events")
    for table in (
        "pacsflow_stage_events",
        "pacsflow_series",
        "pacsflow_studies",
        "pacsflow_accessions",
        "pacsflow_runs",
    ):
        op.drop_table(table)
