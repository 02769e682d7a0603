"""Stage 6: settle every AN's outcome and report the reconciled run summary."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context

from pacsflow.core.pipeline import settle_run
from pacsflow.core.report import format_summary
from pacsflow.operators.base import PacsflowOperator


class AuditSummaryOperator(PacsflowOperator):
    """Fails loudly if the accounting does not reconcile: cohort = retrieved + filtered + not found + failed."""

    def execute(self, context: Context) -> dict[str, Any]:
        with self.run_context(context) as ctx:
            summary = settle_run(ctx)
        for line in format_summary(summary).splitlines():
            self.log.info("%s", line)
        if not summary.reconciled:
            raise RuntimeError("audit does not reconcile: some ANs have no outcome; see the audit database")
        return summary.as_dict()
