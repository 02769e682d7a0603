"""The durable state and audit store: one row per run, AN, study and series, plus one per stage attempt.

- :mod:`.schema`: the tables;
- :mod:`.store`: :class:`AuditStore`, which reads and writes them;
- :mod:`.outcome`: the rules that turn the rows into each AN's outcome and the run's verdict;
- :mod:`.migrate` and ``migrations/``: the schema's Alembic migrations (``pacsflow db upgrade``, or first use).
"""

from pacsflow.core.audit.migrate import SchemaUpgradeError, ensure_current_schema, upgrade
from pacsflow.core.audit.outcome import (
    RESOLUTION_FAILED,
    RESOLUTION_NEVER_RAN,
    RETRIEVAL_FAILED,
    RETRIEVAL_NEVER_RAN,
    UNFINISHED_REASONS,
    AttemptState,
    Outcome,
    RunSummary,
    SeriesStatus,
    Stage,
    StageBook,
    Verdict,
    accession_outcome,
)
from pacsflow.core.audit.schema import (
    AUDIT_TABLES,
    VERSION_TABLE,
    accession_column_length,
    accessions,
    metadata,
    runs,
    series,
    stage_attempts,
    studies,
)
from pacsflow.core.audit.store import AuditStore, export_run_audit, utcnow

__all__ = [
    "AUDIT_TABLES",
    "RESOLUTION_FAILED",
    "RESOLUTION_NEVER_RAN",
    "RETRIEVAL_FAILED",
    "RETRIEVAL_NEVER_RAN",
    "UNFINISHED_REASONS",
    "VERSION_TABLE",
    "AttemptState",
    "AuditStore",
    "Outcome",
    "RunSummary",
    "SchemaUpgradeError",
    "SeriesStatus",
    "Stage",
    "StageBook",
    "Verdict",
    "accession_column_length",
    "accession_outcome",
    "accessions",
    "ensure_current_schema",
    "export_run_audit",
    "metadata",
    "runs",
    "series",
    "stage_attempts",
    "studies",
    "upgrade",
    "utcnow",
]
