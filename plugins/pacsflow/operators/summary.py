"""Stage 6: settle every AN's outcome and report the reconciled run summary."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context

from pacsflow.core.audit import export_run_audit
from pacsflow.core.pipeline import settle_run
from pacsflow.core.report import format_summary
from pacsflow.core.storage import run_token
from pacsflow.operators.base import PacsflowOperator


class AuditSummaryOperator(PacsflowOperator):
    """Settles outcomes, exports the run's audit rows to ``<data_root>/audit/<run>/*.parquet`` and logs the
    summary. Fails if the accounting does not reconcile (cohort = retrieved + filtered + not found + failed)
    or if work was left unfinished by a failed upstream task, so the run shows as failed and can be resumed."""

    def execute(self, context: Context) -> dict[str, Any]:
        with self.run_context(context) as ctx:
            summary = settle_run(ctx)
            export_run_audit(ctx.store, ctx.run_key, self.root / "audit" / run_token(context["run_id"]))
        for line in format_summary(summary).splitlines():
            self.log.info("%s", line)
        if not summary.reconciled:
            raise RuntimeError("audit does not reconcile: some ANs have no outcome; see the audit database")
        if summary.unfinished:
            raise RuntimeError(f"{summary.unfinished} ANs are unfinished; clear the failed tasks to resume the run")
        return summary.as_dict()
