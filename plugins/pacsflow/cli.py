"""``pacsflow`` command line: run summaries, the audit store's schema, and a C-ECHO health check."""

from __future__ import annotations

import argparse
import json
import os

from pacsflow.core.audit import AuditStore
from pacsflow.core.report import format_summary

AUDIT_CONN_ID = "pacsflow_audit"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pacsflow")
    commands = parser.add_subparsers(dest="command", required=True)

    summary = commands.add_parser("summary", help="the reconciled summary of a run")
    summary.add_argument("--audit-url", help="SQLAlchemy URL of the audit database; default: the Airflow "
                                             "connection --conn-id")
    summary.add_argument("--conn-id", default=AUDIT_CONN_ID)
    summary.add_argument("--run-key", help="'<dag_id>/<run_id>'; default: the latest run of --dag-id")
    summary.add_argument("--dag-id", default="pacsflow_extract")
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")

    init_audit = commands.add_parser("init-audit", help="create or upgrade the audit store's tables")
    init_audit.add_argument("--audit-url", help="SQLAlchemy URL; default: the Airflow connection --conn-id")
    init_audit.add_argument("--conn-id", default=AUDIT_CONN_ID)

    echo = commands.add_parser("echo", help="C-ECHO a DICOM peer; by default the receiver service of this "
                                            "environment (the container health check)")
    echo.add_argument("--host", default="127.0.0.1")
    echo.add_argument("--port", type=int, default=int(os.environ.get("PACSFLOW_RECEIVER_PORT", "11113")))
    echo.add_argument("--called-ae", default=os.environ.get("PACSFLOW_RECEIVER_AE_TITLE", "PACSFLOW"))
    echo.add_argument("--calling-ae", default=_first_allowed_ae(),
                      help="default: the first of $PACSFLOW_RECEIVER_ALLOWED_AES (the receiver rejects others)")
    echo.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)

    if args.command == "summary":
        return _summary(args)
    if args.command == "init-audit":
        return _init_audit(args)
    return _echo(args)


def _summary(args: argparse.Namespace) -> int:
    with _audit_store(args) as store:
        result = store.summary(args.run_key or store.latest_run_key(args.dag_id))
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_summary(result))
    return 0 if result.reconciled else 1


def _audit_store(args: argparse.Namespace) -> AuditStore:
    """The store at ``--audit-url``, else the one of the Airflow connection ``--conn-id``."""
    if args.audit_url:
        return AuditStore.connect(args.audit_url)
    from pacsflow.hooks.database import DatabaseHook  # Airflow only when a connection is named

    return AuditStore(DatabaseHook(args.conn_id).get_conn())


def _init_audit(args: argparse.Namespace) -> int:
    with _audit_store(args) as store:
        backend = store.engine.url.get_backend_name()
    print(f"audit store ready ({backend})")
    return 0


def _first_allowed_ae() -> str:
    allowed = [ae.strip() for ae in os.environ.get("PACSFLOW_RECEIVER_ALLOWED_AES", "").split(",") if ae.strip()]
    return allowed[0] if allowed else "PACSFLOW"


def _echo(args: argparse.Namespace) -> int:
    from pacsflow.core.dicom.client import PacsClient
    from pacsflow.core.dicom.config import PacsConfig
    from pacsflow.core.dicom.errors import PacsError

    config = PacsConfig(host=args.host, port=args.port, called_ae=args.called_ae, calling_ae=args.calling_ae,
                        acse_timeout=args.timeout, dimse_timeout=args.timeout, network_timeout=args.timeout)
    try:
        with PacsClient(config) as client:
            client.echo()
    except PacsError as error:
        print(f"C-ECHO {args.called_ae}@{args.host}:{args.port} failed: {error}")
        return 1
    print(f"C-ECHO {args.called_ae}@{args.host}:{args.port} succeeded")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
