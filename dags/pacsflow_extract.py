"""Research cohort extraction: RIS -> AN -> StudyInstanceUID -> series filter -> C-MOVE -> Parquet -> audit.

Thin by design: every stage is an operator from the pacsflow package; nothing here touches a network or a
database at import time. Connections: ``pacsflow_ris`` (the RIS database), ``pacsflow_pacs`` (type ``dicom``),
``pacsflow_audit`` (the audit/state database). The PACS-facing tasks take a slot of the ``pacs`` pool,
which caps concurrent associations across the deployment.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

from airflow.sdk import Asset, Param, dag

from pacsflow.operators.cohort import RisCohortOperator
from pacsflow.operators.export import ExportMetadataOperator
from pacsflow.operators.release import ReleaseOperator
from pacsflow.operators.resolve import ResolveAccessionsOperator
from pacsflow.operators.retrieve import RetrieveStudiesOperator
from pacsflow.operators.summary import AuditSummaryOperator

INCLUDE_DIR = Path(__file__).resolve().parent.parent / "include"
DATA_ROOT = os.environ.get("PACSFLOW_DATA_ROOT", "/var/lib/pacsflow")
METADATA_ASSET = Asset(name="pacsflow_metadata", uri=f"file://{DATA_ROOT}/metadata")


@dag(
    dag_id="pacsflow_extract",
    description="Extract a research cohort of DICOM studies from the PACS, with a Parquet metadata table",
    schedule="@weekly",
    start_date=datetime(2020, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,
    tags=["pacsflow", "dicom", "research-extraction"],
    default_args={
        "retries": 3,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
        "data_root": "{{ params.data_root }}",
        "audit_conn_id": "pacsflow_audit",
    },
    params={
        "interval_start": Param(None, type=["null", "string"],
                                description="Override of the data interval start (ISO 8601); empty: the run's "
                                            "data interval."),
        "interval_end": Param(None, type=["null", "string"],
                              description="Override of the data interval end (ISO 8601, exclusive)."),
        "sql_template": Param("cohort_by_modality.sql", type="string", pattern=r"^[A-Za-z0-9_-]+\.sql$",
                              description="Cohort SQL template in include/sql."),
        "cohort_params": Param({"modalities": ["CT", "MG"]}, type="object",
                               description="Values bound to the template's named parameters."),
        "resolution": Param({"strip_leading_zeros": True, "site_prefixes": []}, type="object",
                            description="AN -> study fallback settings."),
        "series_rules": Param({"include_modalities": ["CT", "MG"],
                               "exclude_descriptions": ["scout", "localizer", "topogram"], "min_instances": 1},
                              type="object", description="Which series to keep."),
        "batch_size": Param(50, type="integer", minimum=1, description="ANs per retrieval task."),
        "data_root": Param(DATA_ROOT, type="string", description="Where DICOM files and metadata are written."),
        "release": Param({"enabled": True, "project": "default"}, type="object",
                         description="De-identified research release (README: Research release)."),
    },
)
def pacsflow_extract() -> None:
    cohort = RisCohortOperator(
        task_id="ris_cohort",
        template_dir=str(INCLUDE_DIR / "sql"),
        sql_template="{{ params.sql_template }}",
        cohort_params="{{ params.cohort_params }}",
        interval_start="{{ params.interval_start }}",
        interval_end="{{ params.interval_end }}",
        batch_size="{{ params.batch_size }}",
    )
    resolve = ResolveAccessionsOperator(
        task_id="resolve_accessions", pool="pacs", resolution="{{ params.resolution }}",
        batch_size="{{ params.batch_size }}",
    )
    retrieve = RetrieveStudiesOperator.partial(
        task_id="retrieve_batch", pool="pacs", series_rules="{{ params.series_rules }}",
    ).expand(batch=resolve.output)
    export = ExportMetadataOperator(task_id="export_metadata", trigger_rule="none_failed", outlets=[METADATA_ASSET])
    release = ReleaseOperator(task_id="release", release="{{ params.release }}", trigger_rule="none_failed")
    summary = AuditSummaryOperator(task_id="audit_summary", trigger_rule="all_done", retries=0)
    cohort >> resolve >> retrieve >> export >> release >> summary


pacsflow_extract()
