"""Stages 3 and 4 for one batch of studies: series listing, filtering and verified retrieval."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Any

from airflow.sdk import Context

from pacsflow.core.dicom.receiver import open_receiver
from pacsflow.core.pipeline import retrieve_batch
from pacsflow.core.series_rules import SeriesRules
from pacsflow.hooks.dicom import DicomHook
from pacsflow.operators.base import PacsflowOperator


class RetrieveStudiesOperator(PacsflowOperator):
    """Retrieves one batch (map it over the resolver's output). Holds a ``pacs`` pool slot, so the
    deployment never opens more associations than the pool allows (set ``pool="pacs"``)."""

    template_fields = (*PacsflowOperator.template_fields, "series_rules")

    def __init__(self, *, batch: int, dicom_conn_id: str = "pacsflow_pacs",
                 series_rules: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch = batch
        self.dicom_conn_id = dicom_conn_id
        self.series_rules = series_rules or {}

    def execute(self, context: Context) -> dict[str, int]:
        rules = SeriesRules.from_mapping(self.series_rules)
        hook = DicomHook(self.dicom_conn_id)
        receiver_config = hook.receiver_config()
        layout = self.layout()
        receiver = partial(open_receiver, receiver_config, layout) if receiver_config.embedded else nullcontext
        with self.run_context(context) as ctx:
            return retrieve_batch(ctx, int(self.batch), hook.get_conn, rules=rules, layout=layout,
                                  destination_ae=receiver_config.ae_title, receiver=receiver)
