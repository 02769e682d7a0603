"""Stage 2: every AN to its StudyInstanceUID(s) through the recorded fallback chain."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context

from pacsflow.core.pipeline import resolve_cohort
from pacsflow.core.resolve import ResolutionSettings
from pacsflow.hooks.dicom import DicomHook
from pacsflow.operators.base import PacsflowOperator


class ResolveAccessionsOperator(PacsflowOperator):
    """Resolves the run's unresolved ANs on one association; returns the batch numbers to retrieve
    (a small list, the input of the mapped retrieval)."""

    def __init__(
        self,
        *,
        dicom_conn_id: str = "pacsflow_pacs",
        resolution: dict[str, Any] | None = None,
        batch_size: int = 50,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.dicom_conn_id = dicom_conn_id
        self.resolution = resolution or {}
        self.batch_size = batch_size

    def run_stage(self, context: Context) -> list[int]:
        settings = ResolutionSettings.parse(self.resolution)
        hook = DicomHook(self.dicom_conn_id)
        with self.run_context(context) as ctx:
            return resolve_cohort(ctx, hook.get_conn, settings, self.batch_size)
