"""``pacsflow`` command line: run summaries from the audit database.

Exit codes of ``pacsflow summary``: 0 the run succeeded, 1 it failed (the state line says at which stage and
why), 2 no such run, 3 the run is still in progress. The receiver service is ``python -m pacsflow.core.dicom``.
"""

from __future__ import annotations

import argparse
import json
import sys

from pacsflow.core.audit import AttemptState, AuditStore
from pacsflow.core.report import format_summary

EXIT_FAILED, EXIT_UNKNOWN, EXIT_RUNNING = 1, 2, 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pacsflow")
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", help="the reconciled summary and state of a run")
    summary.add_argument("--audit-url", required=True, help="SQLAlchemy URL of the audit database")
    which = summary.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-key", help="'<dag_id>/<run_id>'")
    which.add_argument("--dag-id", help="the latest run of this DAG (e.g. pacsflow__demo)")
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    with AuditStore.connect(args.audit_url) as store:
        try:
            result = store.summary(args.run_key or store.latest_run_key(args.dag_id))
        except LookupError as error:
            print(f"pacsflow summary: {error}", file=sys.stderr)
            return EXIT_UNKNOWN
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_summary(result))
    if result.verdict.state == AttemptState.RUNNING:
        return EXIT_RUNNING
    return 0 if result.succeeded else EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
