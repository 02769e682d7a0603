"""Stage 1: the cohort's Accession Numbers from the RIS, bounded by the run's data interval."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from airflow.sdk import Context

from pacsflow.core.audit import utcnow
from pacsflow.core.pipeline import extract_cohort
from pacsflow.core.ris import load_template, query_cohort
from pacsflow.hooks.database import DatabaseHook
from pacsflow.operators.base import PacsflowOperator


class RisCohortOperator(PacsflowOperator):
    """Runs the SQL template ``sql_template`` (from ``template_dir``) with ``interval_start``/``interval_end``
    bound to the data interval (or to the explicit overrides) and ``cohort_params`` bound by name."""

    template_fields = (*PacsflowOperator.template_fields, "sql_template", "cohort_params", "interval_start",
                       "interval_end", "batch_size")

    def __init__(self, *, sql_template: str, template_dir: str, ris_conn_id: str = "pacsflow_ris",
                 cohort_params: dict[str, Any] | None = None, interval_start: str | None = None,
                 interval_end: str | None = None, batch_size: int = 50, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sql_template = sql_template
        self.template_dir = template_dir
        self.ris_conn_id = ris_conn_id
        self.cohort_params = cohort_params or {}
        self.interval_start = interval_start
        self.interval_end = interval_end
        self.batch_size = batch_size

    def execute(self, context: Context) -> dict[str, int]:
        start, end = self._interval(context)
        sql = load_template(self.sql_template, Path(self.template_dir))
        engine = DatabaseHook(self.ris_conn_id).get_conn()
        try:
            with self.run_context(context) as ctx:
                started = utcnow()
                dag_run = context["dag_run"]
                ctx.store.start_run(ctx.run_key, dag_id=context["dag"].dag_id, run_id=context["run_id"],
                                    params=dict(context["params"]), interval=(start, end),
                                    run_type=str(getattr(dag_run, "run_type", "") or "") or None,
                                    triggered_by=getattr(dag_run, "triggering_user_name", None))
                exams = query_cohort(engine, sql, interval_start=_naive_utc(start), interval_end=_naive_utc(end),
                                     params=self.cohort_params)
                counts = extract_cohort(ctx, exams, int(self.batch_size))
                ctx.store.record_stage(ctx.run_key, "cohort", started, counts)
        finally:
            engine.dispose()
        return counts

    def _interval(self, context: Context) -> tuple[datetime, datetime]:
        start = _parse(self.interval_start) or context.get("data_interval_start")
        end = _parse(self.interval_end) or context.get("data_interval_end")
        if start is None or end is None:
            raise ValueError("no data interval: schedule the DAG, or set the interval_start and interval_end params")
        if start >= end:
            raise ValueError("interval_start must be before interval_end")
        return start, end


def _parse(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _naive_utc(moment: datetime) -> datetime:
    """RIS timestamps are compared as naive UTC (see README: RIS time zone)."""
    return moment.astimezone(timezone.utc).replace(tzinfo=None)
