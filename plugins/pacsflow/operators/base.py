"""What every pacsflow operator shares: the run's key, its audit store and the pseudonymizer for logs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator, Context

from pacsflow.core.audit import AuditStore
from pacsflow.core.pipeline import RunContext
from pacsflow.core.privacy import (
    Pseudonymizer,
    database_errors_withheld,
    make_private_dir,
    redact_uids_in_library_logs,
    use_private_umask,
)
from pacsflow.core.storage import StorageLayout
from pacsflow.hooks.database import DatabaseHook

KEY_FILE = ".pacsflow-key"


class PacsflowOperator(BaseOperator):
    """Base of the pacsflow stage operators. ``data_root`` holds DICOM files, metadata and the log key."""

    template_fields = ("data_root",)

    def __init__(self, *, data_root: str, audit_conn_id: str = "pacsflow_audit", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_root = data_root
        self.audit_conn_id = audit_conn_id

    @property
    def root(self) -> Path:
        if not self.data_root:
            raise ValueError("data_root is empty: set the data_root param or $PACSFLOW_DATA_ROOT")
        return Path(self.data_root)

    def layout(self) -> StorageLayout:
        return StorageLayout(self.root / "dicom")

    @contextmanager
    def run_context(self, context: Context) -> Iterator[RunContext]:
        run_key = f"{context['dag'].dag_id}/{context['run_id']}"
        use_private_umask()  # everything a stage writes (audit DB, Parquet, DICOM, keys) is for the service account
        make_private_dir(self.root)
        pseudonymizer = Pseudonymizer.from_environment(self.root / KEY_FILE)
        redact_uids_in_library_logs(pseudonymizer)
        with database_errors_withheld(), AuditStore(DatabaseHook(self.audit_conn_id).get_conn()) as store:
            yield RunContext(store=store, run_key=run_key, pseudonymizer=pseudonymizer)
