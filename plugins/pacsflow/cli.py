"""``pacsflow`` command line: ``summary`` (a run's reconciled summary), ``cohort`` (a dry run of a definition's
cohort), ``db upgrade`` (the audit store's schema; ``init-audit`` is its older name) and ``echo`` (a C-ECHO
health check).

Exit codes of ``pacsflow summary``: 0 the run succeeded, 1 it failed (the state line says at which stage and
why), 2 no such run, 3 the run is still in progress. The receiver is not a ``pacsflow`` command: its service
runs as ``python -m pacsflow.core.dicom``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from pacsflow.core.audit import AttemptState, AuditStore
from pacsflow.core.audit import upgrade as upgrade_audit_schema
from pacsflow.core.db import make_engine
from pacsflow.core.errors import ConfigurationError
from pacsflow.core.privacy import use_private_umask
from pacsflow.core.report import format_summary
from pacsflow.core.ris import load_template, query_cohort
from pacsflow.core.settings import load_definition

EXIT_FAILED, EXIT_UNKNOWN, EXIT_RUNNING = 1, 2, 3
AUDIT_CONN_ID = "pacsflow_audit"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pacsflow")
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", help="the reconciled summary and state of a run")
    summary.add_argument(
        "--audit-url", help="SQLAlchemy URL of the audit database; default: the Airflow connection --conn-id"
    )
    summary.add_argument("--conn-id", default=AUDIT_CONN_ID)
    which = summary.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-key", help="'<dag_id>/<run_id>'")
    which.add_argument("--dag-id", help="the latest run of this DAG (e.g. pacsflow__demo)")
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cohort = commands.add_parser("cohort", help="dry run: a definition's cohort for one interval, nothing retrieved")
    cohort.add_argument("definition", type=Path, help="an extraction definition (include/extractions/*.yaml)")
    cohort.add_argument("--ris-url", required=True, help="SQLAlchemy URL of the RIS database")
    cohort.add_argument("--start", required=True, type=_utc, help="interval start, ISO 8601 (UTC if no offset)")
    cohort.add_argument("--end", required=True, type=_utc, help="interval end (exclusive)")
    cohort.add_argument("--sql-dir", type=Path, help="template folder (default: ../sql beside the definition)")
    db = commands.add_parser("db", help="the audit store's schema").add_subparsers(dest="db_command", required=True)
    for upgrade in (
        db.add_parser("upgrade", help="create the audit store's tables, or bring them to the current schema"),
        commands.add_parser("init-audit", help="the same as `pacsflow db upgrade` (kept for existing set-ups)"),
    ):
        upgrade.add_argument("--audit-url", help="SQLAlchemy URL; default: the Airflow connection --conn-id")
        upgrade.add_argument("--conn-id", default=AUDIT_CONN_ID)
    echo = commands.add_parser(
        "echo",
        help="C-ECHO a DICOM peer; by default the receiver service of this environment (the container health check)",
    )
    echo.add_argument("--host", default="127.0.0.1")
    echo.add_argument("--port", type=int, default=int(os.environ.get("PACSFLOW_RECEIVER_PORT", "11113")))
    echo.add_argument("--called-ae", default=os.environ.get("PACSFLOW_RECEIVER_AE_TITLE", "PACSFLOW"))
    echo.add_argument(
        "--calling-ae",
        default=_first_allowed_ae(),
        help="default: the first of $PACSFLOW_RECEIVER_ALLOWED_AES (the receiver rejects others)",
    )
    echo.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    use_private_umask()  # an audit database created here holds patient data: the service account only
    if args.command == "cohort":
        return dry_run(args.definition, args.ris_url, args.start, args.end, args.sql_dir)
    if args.command in ("db", "init-audit"):
        return _db_upgrade(args)
    if args.command == "echo":
        return _echo(args)

    with _audit_store(args) as store:
        try:
            result = store.summary(args.run_key or store.latest_run_key(args.dag_id))
        except LookupError as error:
            print(f"pacsflow summary: {error}", file=sys.stderr)
            return EXIT_UNKNOWN
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_summary(result))
    if result.verdict.state == AttemptState.RUNNING:
        return EXIT_RUNNING
    return 0 if result.succeeded else EXIT_FAILED


def _audit_store(args: argparse.Namespace) -> AuditStore:
    """The store at ``--audit-url``, else the one of the Airflow connection ``--conn-id``."""
    return AuditStore(_audit_engine(args))


def _audit_engine(args: argparse.Namespace) -> Engine:
    if args.audit_url:
        return make_engine(args.audit_url)
    from pacsflow.hooks.database import DatabaseHook  # Airflow only when a connection is named

    return DatabaseHook(args.conn_id).get_conn()


def _db_upgrade(args: argparse.Namespace) -> int:
    engine = _audit_engine(args)
    try:
        before, after = upgrade_audit_schema(engine)
    except (ConfigurationError, SQLAlchemyError) as error:  # on PostgreSQL and SQLite nothing was changed
        print(f"pacsflow db upgrade: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        engine.dispose()
    backend = engine.url.get_backend_name()
    if before == after:
        print(f"audit store ({backend}) already at schema revision {after}")
    elif before == "new":
        print(f"audit store ({backend}) created at schema revision {after}")
    else:
        print(f"audit store ({backend}) upgraded from schema revision {before or 'of the previous release'} to {after}")
    return 0


def _first_allowed_ae() -> str:
    allowed = [ae.strip() for ae in os.environ.get("PACSFLOW_RECEIVER_ALLOWED_AES", "").split(",") if ae.strip()]
    return allowed[0] if allowed else "PACSFLOW"


def _echo(args: argparse.Namespace) -> int:
    from pacsflow.core.dicom.client import PacsClient
    from pacsflow.core.dicom.config import PacsConfig
    from pacsflow.core.dicom.errors import PacsError

    config = PacsConfig(
        host=args.host,
        port=args.port,
        called_ae=args.called_ae,
        calling_ae=args.calling_ae,
        acse_timeout=args.timeout,
        dimse_timeout=args.timeout,
        network_timeout=args.timeout,
    )
    try:
        with PacsClient(config) as client:
            client.echo()
    except PacsError as error:
        print(f"C-ECHO {args.called_ae}@{args.host}:{args.port} failed: {error}")
        return 1
    print(f"C-ECHO {args.called_ae}@{args.host}:{args.port} succeeded")
    return 0


def dry_run(path: Path, ris_url: str, start: datetime, end: datetime, sql_dir: Path | None) -> int:
    """What the cohort stage would bind and count for ``[start, end)``; counts only, nothing stored."""
    try:
        definition = load_definition(path)
        sql = load_template(definition.cohort.sql_template, sql_dir or path.resolve().parent.parent / "sql")
    except ConfigurationError as error:
        print(f"pacsflow cohort: {error}", file=sys.stderr)
        return EXIT_FAILED
    bound_start, bound_end = (moment.astimezone(UTC).replace(tzinfo=None) for moment in (start, end))
    print(f"template      {definition.cohort.sql_template}")
    print(
        f"interval      {bound_start} .. {bound_end} (naive UTC datetime; day text {bound_start:%Y%m%d} .. "
        f"{bound_end:%Y%m%d})"
    )
    engine = make_engine(ris_url)
    try:
        accessions = Counter(
            exam.accession_number
            for exam in query_cohort(
                engine, sql, interval_start=bound_start, interval_end=bound_end, params=definition.cohort.params
            )
        )
    finally:
        engine.dispose()
    rows = sum(accessions.values())
    print(f"RIS rows      {rows}\ndistinct ANs  {len(accessions)}\nduplicates    {rows - len(accessions)}")
    if len(accessions) > definition.cohort.max_size:
        print(f"the cohort is over cohort.max_size ({definition.cohort.max_size}): a run would fail")
    if not accessions:
        print(
            "the cohort is empty: if the interval holds exams, check how the template compares dates "
            "(README: cohort templates)"
        )
    return 0


def _utc(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


if __name__ == "__main__":
    raise SystemExit(main())
