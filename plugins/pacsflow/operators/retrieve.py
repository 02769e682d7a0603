"""Stages 3 and 4 for one batch of studies: series listing, filtering and verified retrieval."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

from airflow.sdk import Context

from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.dicom.receiver import open_receiver
from pacsflow.core.dicom.sharing import shared_receiver
from pacsflow.core.pipeline import retrieve_batch
from pacsflow.core.series_rules import SeriesRules
from pacsflow.core.storage import StorageLayout
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


def receiver_for(config: ReceiverConfig, layout: StorageLayout) -> Callable[[], AbstractContextManager[Any]]:
    """How a retrieval task gets a move destination, by ``receiver_mode``."""
    if config.mode == "embedded":
        return partial(open_receiver, config, layout)
    if config.mode == "shared":
        return lambda: _shared(config, layout)
    return nullcontext


def _shared(config: ReceiverConfig, layout: StorageLayout) -> AbstractContextManager[None]:
    layout.root.mkdir(parents=True, exist_ok=True)
    return shared_receiver(config, layout.root)
