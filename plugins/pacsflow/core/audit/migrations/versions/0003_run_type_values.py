"""Run types as Airflow's API names them: the cohort task recorded ``str()`` of Airflow's enum, which on
Python 3.11 is "DagRunType.MANUAL" where "manual" was meant; the audit pages showed it so.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ENUM_PREFIX = "DagRunType."

runs = sa.table("pacsflow_runs", sa.column("run_type", sa.String))  # as this revision knows it


def upgrade() -> None:
    op.execute(
        runs.update()
        .where(runs.c.run_type.like(f"{ENUM_PREFIX}%"))
        .values(run_type=sa.func.lower(sa.func.substr(runs.c.run_type, len(ENUM_PREFIX) + 1)))
    )


def downgrade() -> None:
    pass  # "manual" is what the earlier revisions meant too: nothing to restore
