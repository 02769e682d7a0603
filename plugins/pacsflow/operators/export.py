"""Stage 5: the Parquet metadata of the run's retrieved instances (emits the metadata Asset)."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context

from pacsflow.core.audit import utcnow
from pacsflow.core.export import export_instances
from pacsflow.core.pipeline import retrieved_files
from pacsflow.operators.base import PacsflowOperator

METADATA_DIR = "metadata"


class ExportMetadataOperator(PacsflowOperator):
    """Writes ``<data_root>/metadata`` (Hive-partitioned by study date); re-running a run replaces its rows."""

    def execute(self, context: Context) -> dict[str, Any]:
        with self.run_context(context) as ctx:
            started = utcnow()
            report = export_instances(retrieved_files(ctx, self.layout()), self.root / METADATA_DIR,
                                      context["run_id"])
            counts = {"instances": report.instances, "series": report.series, "studies": report.studies,
                      "rejected": len(report.rejected)}
            ctx.store.record_stage(ctx.run_key, "export", started, counts)
            for path, reason in report.rejected:  # the file name is a SOP Instance UID: a keyed reference
                self.log.warning("export skipped %s: %s", ctx.pseudonymizer.ref(path.stem, "sop"), reason)
        return {**counts, "path": str(self.root / METADATA_DIR)}
