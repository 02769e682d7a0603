"""Stages 3 and 4 for one batch of studies: series listing, filtering and verified retrieval."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Context

from pacsflow.core.dicom.receiver import receiver_for
from pacsflow.core.pipeline import retrieve_batch
from pacsflow.core.series_rules import SeriesRules
from pacsflow.hooks.dicom import DicomHook
from pacsflow.operators.base import PacsflowOperator


class RetrieveStudiesOperator(PacsflowOperator):
    """Retrieves one batch (map it over the resolver's output). Holds a slot of its pool (``pacs``), so the
    deployment never opens more associations than the pool allows."""

    def __init__(
        self,
        *,
        batch: int,
        dicom_conn_id: str = "pacsflow_pacs",
        series_rules: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.batch = batch
        self.dicom_conn_id = dicom_conn_id
        self.series_rules = series_rules or {}

    def run_stage(self, context: Context) -> dict[str, int]:
        rules = SeriesRules.parse(self.series_rules)
        hook = DicomHook(self.dicom_conn_id)
        config = hook.receiver_config()
        layout = self.layout()
        with self.run_context(context) as ctx:
            return retrieve_batch(
                ctx,
                int(self.batch),
                hook.get_conn,
                rules=rules,
                layout=layout,
                destination_ae=config.ae_title,
                receiver=receiver_for(config, layout),
            )
