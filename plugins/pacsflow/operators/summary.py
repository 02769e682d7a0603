"""Stage 6: settle every AN's outcome, record the run's verdict and report the reconciled summary."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowFailException

from pacsflow.core.audit import export_run_audit
from pacsflow.core.pipeline import settle_run
from pacsflow.core.report import format_summary
from pacsflow.core.storage import run_token
from pacsflow.operators.base import PacsflowOperator


class AuditSummaryOperator(PacsflowOperator):
    """The run's only leaf, so its state is the run's state. It runs once every other task has ended (retries
    included), settles outcomes from the audit, exports the run's audit rows to
    ``<data_root>/audit/<dag_id>/<run>/*.parquet`` and fails, with the stage and reason, unless every stage succeeded
    and every AN is accounted for."""

    def run_stage(self, context: Context) -> dict[str, Any]:
        with self.run_context(context) as ctx:
            if ctx.store.run_row(ctx.run_key) is None:
                raise AirflowFailException(
                    "the run never reached the audit database: its first task failed "
                    "before recording it (see the ris_cohort task log)"
                )
            summary = settle_run(ctx)
            export_run_audit(
                ctx.store, ctx.run_key, self.root / "audit" / context["dag"].dag_id / run_token(context["run_id"])
            )
        for line in format_summary(summary).splitlines():
            self.log.info("%s", line)
        if not summary.succeeded:
            raise AirflowFailException(summary.failure_message())
        return summary.as_dict()
