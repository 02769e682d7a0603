"""One DAG per extraction definition (``include/extractions/*.yaml``), built the same way for every project.

Called by the thin file in ``dags/``; it reads YAML and builds operators, nothing else (no connection, no
network, no database at parse time).
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG, Asset, CronDataIntervalTimetable

from pacsflow.core.settings import DefinitionError, ExtractionDefinition, definitions_dir, load_definition
from pacsflow.notifications import RunFailedWebhook
from pacsflow.operators.cohort import InvalidDefinitionOperator, RisCohortOperator
from pacsflow.operators.export import ExportMetadataOperator
from pacsflow.operators.release import ReleaseOperator
from pacsflow.operators.resolve import ResolveAccessionsOperator
from pacsflow.operators.retrieve import RetrieveStudiesOperator
from pacsflow.operators.summary import AuditSummaryOperator

log = logging.getLogger("pacsflow")


def extraction_dags(include_dir: Path) -> dict[str, DAG]:
    """Every definition's DAG, by DAG id. A broken definition never takes the other projects' DAGs down with
    it: it becomes a DAG tagged ``invalid-definition`` whose page shows the file, the key and the problem, and
    whose only task fails with them if triggered."""
    dags: dict[str, DAG] = {}
    for path in sorted(definitions_dir(include_dir / "extractions").glob("*.yaml")):
        try:
            definition = load_definition(path)
        except DefinitionError as error:
            log.error("pacsflow extraction definition is invalid: %s", error)
            dag = invalid_definition_dag(path, error)
        else:
            dag = build_dag(definition, include_dir)
        dags[dag.dag_id] = dag
    return dags


def invalid_definition_dag(path: Path, error: DefinitionError) -> DAG:
    dag_id = "pacsflow__" + re.sub(r"[^a-z0-9_]+", "_", path.stem.lower())
    with DAG(
        dag_id=dag_id,
        description=f"INVALID DEFINITION {path.name}: fix the file",
        schedule=None,
        start_date=datetime(2020, 1, 1, tzinfo=UTC),
        tags=["pacsflow", "invalid-definition"],
        doc_md=f"# Invalid extraction definition\n\n`{path.name}`: {error}\n\nFix the file; this DAG "
        "then becomes the extraction it describes.",
        default_args={"owner": "pacsflow", "retries": 0},
    ) as dag:
        InvalidDefinitionOperator(task_id="invalid_definition", problem=str(error))
    return dag


def build_dag(definition: ExtractionDefinition, include_dir: Path) -> DAG:
    run = definition.run
    connections = definition.connections
    # A data-interval timetable: each scheduled, catch-up or backfill run covers [start, end) of its own
    # interval (a bare cron string would give Airflow 3's trigger timetable, whose runs have no interval).
    schedule = CronDataIntervalTimetable(definition.schedule, timezone="UTC") if definition.schedule else None
    with DAG(
        dag_id=definition.dag_id,
        description=definition.description,
        doc_md=_doc(definition),
        schedule=schedule,
        start_date=definition.start_date,
        catchup=definition.catchup,
        max_active_runs=1,
        dagrun_timeout=timedelta(hours=run.run_timeout_hours),
        tags=["pacsflow", *definition.tags],
        on_failure_callback=RunFailedWebhook(conn_id=run.alert_conn_id) if run.alert_conn_id else None,
        default_args={
            "owner": definition.owner,
            "retries": run.retries,
            "retry_delay": definition.retry_delay,
            "retry_exponential_backoff": 2.0,
            "max_retry_delay": timedelta(seconds=run.max_retry_delay_seconds),
            "execution_timeout": timedelta(hours=run.task_timeout_hours),
            "audit_conn_id": connections.audit,
        },
    ) as dag:
        cohort = RisCohortOperator(
            task_id="ris_cohort",
            template_dir=str(include_dir / "sql"),
            sql_template=definition.cohort.sql_template,
            cohort_params=dict(definition.cohort.params),
            ris_conn_id=connections.ris,
            batch_size=definition.retrieval.batch_size,
            max_cohort_size=definition.cohort.max_size,
            definition=definition.model_dump(mode="json"),
        )
        resolve = ResolveAccessionsOperator(
            task_id="resolve_accessions",
            pool=definition.retrieval.pool,
            dicom_conn_id=connections.pacs,
            resolution=definition.resolution.model_dump(mode="json"),
            batch_size=definition.retrieval.batch_size,
        )
        retrieve = RetrieveStudiesOperator.partial(
            task_id="retrieve_batch",
            pool=definition.retrieval.pool,
            dicom_conn_id=connections.pacs,
            series_rules=definition.series_rules.model_dump(mode="json"),
        ).expand(batch=resolve.output)
        # Both wait for every retrieval attempt (retries included) to end: the export takes what arrived,
        # the summary settles only when nothing is still running, and as the only leaf it decides the run.
        export = ExportMetadataOperator(
            task_id="export_metadata",
            trigger_rule="all_done",
            outlets=[Asset(name=f"pacsflow_metadata__{definition.id}")],
        )
        summary = AuditSummaryOperator(task_id="audit_summary", trigger_rule="all_done", retries=0)
        cohort >> resolve >> retrieve >> export >> summary
        [cohort, resolve, retrieve] >> summary
        if definition.release.enabled:
            release = ReleaseOperator(task_id="release", release=definition.release_settings.model_dump(mode="json"))
            export >> release >> summary
    return dag


def _doc(definition: ExtractionDefinition) -> str:
    when = f"`{definition.schedule}` (each run extracts its data interval)" if definition.schedule else "on demand"
    return "\n".join(
        [
            f"# {definition.id}",
            "",
            definition.description,
            "",
            f"- owner: {definition.owner}",
            f"- schedule: {when}, from {definition.start_date:%Y-%m-%d}, "
            f"catch-up {'on' if definition.catchup else 'off'}",
            f"- cohort: `{definition.cohort.sql_template}` with {sorted(definition.cohort.params)}, "
            f"at most {definition.cohort.max_size} ANs",
            f"- retrieval: batches of {definition.retrieval.batch_size} ANs in pool `{definition.retrieval.pool}`",
            "",
            "Trigger from the UI with a logical date (the last complete interval before it) or a data interval.",
        ]
    )
