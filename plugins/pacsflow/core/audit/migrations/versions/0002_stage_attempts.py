"""Stage attempts replace stage events (issue 9): one row per try of a stage, with how it ended, so the run's
verdict needs nothing from Airflow.

The previous release recorded an event only when ``resolve`` or a ``retrieve[N]`` batch finished; each event
becomes a successful attempt of that stage (and batch) with its times and counts, so no row is lost. The release
recorded no cohort or export stage and no failed tries, so none are made up here: a run of the previous release
shows those stages as never run.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BATCH_STAGE = re.compile(r"(?P<stage>[a-z_]+)\[(?P<batch>\d+)\]")  # "retrieve[3]": stage retrieve, batch 3

# The tables as this revision knows them (never the current models: a later revision may change those).
events = sa.table(
    "pacsflow_stage_events",
    sa.column("id", sa.Integer),
    sa.column("run_key", sa.String),
    sa.column("stage", sa.String),
    sa.column("started_at", sa.DateTime(timezone=True)),
    sa.column("finished_at", sa.DateTime(timezone=True)),
    sa.column("counts", sa.JSON),
)
attempts = sa.table(
    "pacsflow_stage_attempts",
    sa.column("id", sa.Integer),
    sa.column("run_key", sa.String),
    sa.column("stage", sa.String),
    sa.column("batch", sa.Integer),
    sa.column("started_at", sa.DateTime(timezone=True)),
    sa.column("finished_at", sa.DateTime(timezone=True)),
    sa.column("state", sa.String),
    sa.column("counts", sa.JSON),
)


def upgrade() -> None:
    # Development builds between the two releases created the current tables without a version row: keep theirs.
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("pacsflow_stage_attempts"):
        op.create_table(
            "pacsflow_stage_attempts",
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("run_key", sa.String(250), nullable=False),
            sa.Column("stage", sa.String(32), nullable=False),
            sa.Column("batch", sa.Integer),
            sa.Column("try_number", sa.Integer),
            sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("finished_at", sa.DateTime(timezone=True)),
            sa.Column("state", sa.String(16), nullable=False),
            sa.Column("error", sa.Text),
            sa.Column("counts", sa.JSON),
        )
        op.create_index("ix_pacsflow_stage_attempts_run_key", "pacsflow_stage_attempts", ["run_key"])
    if not inspector.has_table("pacsflow_stage_events"):
        return
    rows = op.get_bind().execute(sa.select(events).order_by(events.c.id)).mappings().all()  # oldest first
    if rows:
        op.bulk_insert(attempts, [_attempt(row) for row in rows])
    op.drop_index("ix_pacsflow_stage_events_run_key", table_name="pacsflow_stage_events")
    op.drop_table("pacsflow_stage_events")


def _attempt(event: Any) -> dict[str, Any]:
    batched = BATCH_STAGE.fullmatch(event["stage"])
    return {
        "run_key": event["run_key"],
        "stage": batched["stage"] if batched else event["stage"],
        "batch": int(batched["batch"]) if batched else None,
        "started_at": event["started_at"],
        "finished_at": event["finished_at"],
        "state": "success",  # the previous release recorded a stage only when it finished
        "counts": event["counts"],
    }


def downgrade() -> None:
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
    # Only finished successful attempts have an event form; the others are lost by going back.
    finished = (
        sa.select(attempts)
        .where(attempts.c.state == "success", attempts.c.finished_at.is_not(None))
        .order_by(attempts.c.id)
    )
    rows = op.get_bind().execute(finished).mappings().all()
    if rows:
        op.bulk_insert(
            events,
            [
                {
                    "run_key": row["run_key"],
                    "stage": row["stage"] if row["batch"] is None else f"{row['stage']}[{row['batch']}]",
                    "started_at": row["started_at"],
                    "finished_at": row["finished_at"],
                    "counts": row["counts"],
                }
                for row in rows
            ],
        )
    op.drop_index("ix_pacsflow_stage_attempts_run_key", table_name="pacsflow_stage_attempts")
    op.drop_table("pacsflow_stage_attempts")
