"""Stage 1: the cohort's Accession Numbers from the RIS, bounded by the run's data interval."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from pacsflow.core.errors import ConfigurationError
from pacsflow.core.pipeline import extract_cohort
from pacsflow.core.ris import load_template, query_cohort
from pacsflow.hooks.database import DatabaseHook
from pacsflow.operators.base import PacsflowOperator

log = logging.getLogger("pacsflow")


class RisCohortOperator(PacsflowOperator):
    """Runs the SQL template ``sql_template`` (from ``template_dir``) with ``interval_start``/``interval_end``
    bound to the run's data interval and ``cohort_params`` bound by name. The run is recorded in the audit
    before anything else, so even a run that fails here is accounted for."""

    def __init__(
        self,
        *,
        sql_template: str,
        template_dir: str,
        ris_conn_id: str = "pacsflow_ris",
        cohort_params: dict[str, Any] | None = None,
        batch_size: int = 50,
        max_cohort_size: int | None = None,
        definition: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.definition = definition or {}  # recorded with the run: what was extracted, and which stages it has
        self.sql_template = sql_template
        self.template_dir = template_dir
        self.ris_conn_id = ris_conn_id
        self.cohort_params = cohort_params or {}
        self.batch_size = batch_size
        self.max_cohort_size = max_cohort_size

    def run_stage(self, context: Context) -> dict[str, int]:
        start, end = context.get("data_interval_start"), context.get("data_interval_end")
        with self.run_context(context) as ctx:
            dag_run = context["dag_run"]
            ctx.store.start_run(
                ctx.run_key,
                dag_id=context["dag"].dag_id,
                run_id=context["run_id"],
                params=self.definition,
                interval=(start, end),
                run_type=_run_type(dag_run),
                triggered_by=getattr(dag_run, "triggering_user_name", None),
            )
            return extract_cohort(ctx, lambda: self._exams(start, end), self.batch_size, max_size=self.max_cohort_size)

    def _exams(self, start: datetime | None, end: datetime | None) -> Any:
        interval_start, interval_end = _checked_interval(start, end)
        sql = load_template(self.sql_template, Path(self.template_dir))
        bound = {"interval_start": interval_start, "interval_end": interval_end}
        log.info(
            "cohort query %s over [%s, %s) (bound as naive UTC %s), values %s",
            self.sql_template,
            start,
            end,
            type(interval_start).__name__,
            sorted(self.cohort_params),
        )
        engine = DatabaseHook(self.ris_conn_id).get_conn()
        try:
            yield from query_cohort(engine, sql, params=self.cohort_params, **bound)
        finally:
            engine.dispose()


class InvalidDefinitionOperator(BaseOperator):
    """Stands for the stages of an extraction whose definition does not validate: fails with the problem."""

    def __init__(self, *, problem: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.problem = problem

    def execute(self, context: Context) -> None:
        raise AirflowFailException(f"the extraction definition is invalid: {self.problem}")


def _checked_interval(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
    if start is None or end is None:
        raise ConfigurationError(
            "this run has no data interval (triggered without a logical date): trigger it from the UI, whose form "
            "sets one, or through the API with logical_date or data_interval_start/data_interval_end"
        )
    if start >= end:
        raise ConfigurationError(
            f"the run's data interval is empty ({start.isoformat()} to {end.isoformat()}): give the trigger a data "
            "interval, and schedule pacsflow DAGs with a data-interval timetable (their definitions do)"
        )
    return _naive_utc(start), _naive_utc(end)


def _naive_utc(moment: datetime) -> datetime:
    """RIS timestamps are compared as naive UTC (see README: RIS time zone)."""
    return moment.astimezone(UTC).replace(tzinfo=None)


def _run_type(dag_run: Any) -> str | None:
    """ "scheduled", "manual", "backfill"...: the enum's value (``str()`` of Airflow's DagRunType on Python 3.11
    gives "DagRunType.MANUAL")."""
    run_type = getattr(dag_run, "run_type", None)
    return str(getattr(run_type, "value", run_type) or "") or None
