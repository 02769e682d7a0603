"""What every pacsflow operator shares: the run's key, its audit store, the log pseudonymizer, and the rule
that configuration errors fail the task at once (no retry can fix them) while transient errors are retried."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowFailException

from pacsflow.core.audit import AuditStore
from pacsflow.core.dicom.errors import PacsConfigurationError
from pacsflow.core.errors import ConfigurationError
from pacsflow.core.pipeline import RunContext
from pacsflow.core.privacy import (
    Pseudonymizer,
    database_errors_withheld,
    make_private_dir,
    redact_uids_in_library_logs,
    use_private_umask,
)
from pacsflow.core.settings import data_root
from pacsflow.core.storage import StorageLayout
from pacsflow.hooks.database import DatabaseHook

KEY_FILE = ".pacsflow-key"
CONFIGURATION_ERRORS = (ConfigurationError, PacsConfigurationError)


class PacsflowOperator(BaseOperator):
    """Base of the pacsflow stage operators; subclasses implement :meth:`run_stage`.

    The data root (DICOM files, metadata, the log key) is a deployment setting (``$PACSFLOW_DATA_ROOT``), read
    where the task runs, never a run parameter."""

    def __init__(self, *, audit_conn_id: str = "pacsflow_audit", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.audit_conn_id = audit_conn_id

    @property
    def root(self) -> Path:
        return data_root()

    def layout(self) -> StorageLayout:
        return StorageLayout(self.root / "dicom")

    def execute(self, context: Context) -> Any:
        try:
            return self.run_stage(context)
        except CONFIGURATION_ERRORS as error:
            raise AirflowFailException(str(error)) from error

    def run_stage(self, context: Context) -> Any:
        raise NotImplementedError

    @contextmanager
    def run_context(self, context: Context) -> Iterator[RunContext]:
        run_key = f"{context['dag'].dag_id}/{context['run_id']}"
        use_private_umask()  # everything a stage writes (audit DB, Parquet, DICOM, keys) is for the service account
        make_private_dir(self.root)
        pseudonymizer = Pseudonymizer.from_environment(self.root / KEY_FILE)
        redact_uids_in_library_logs(pseudonymizer)
        with database_errors_withheld(), AuditStore(DatabaseHook(self.audit_conn_id).get_conn()) as store:
            yield RunContext(
                store=store, run_key=run_key, try_number=context["ti"].try_number, pseudonymizer=pseudonymizer
            )
