"""Stage 5: the Parquet metadata of the run's retrieved instances (emits the metadata Asset)."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowSkipException

from pacsflow.core.audit import Stage, StageBook
from pacsflow.core.pipeline import export_metadata
from pacsflow.operators.base import PacsflowOperator

METADATA_DIR = "metadata"


class ExportMetadataOperator(PacsflowOperator):
    """Writes ``<data_root>/metadata/<dag_id>`` (Hive-partitioned by study date); re-running a run replaces its
    rows (extractions keep their own folders: two DAGs' runs can share a run id).
    Runs once every retrieval attempt has ended (also when one failed: what was retrieved is exported); skipped
    when the run has no cohort."""

    def run_stage(self, context: Context) -> dict[str, Any]:
        with self.run_context(context) as ctx:
            if not StageBook(ctx.store.attempts(ctx.run_key)).succeeded(Stage.COHORT):
                raise AirflowSkipException("the run has no cohort: nothing to export")
            directory = self.root / METADATA_DIR / context["dag"].dag_id
            counts = export_metadata(ctx, self.layout(), directory, context["run_id"])
        return {**counts, "path": str(directory)}
