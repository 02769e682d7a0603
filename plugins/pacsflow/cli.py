"""``pacsflow`` command line: run summaries from the audit database, and the standalone receiver."""

from __future__ import annotations

import argparse
import json

from pacsflow.core.audit import AuditStore
from pacsflow.core.report import format_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pacsflow")
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", help="the reconciled summary of a run")
    summary.add_argument("--audit-url", required=True, help="SQLAlchemy URL of the audit database")
    summary.add_argument("--run-key", help="'<dag_id>/<run_id>'; default: the latest run of --dag-id")
    summary.add_argument("--dag-id", default="pacsflow_extract")
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    with AuditStore.connect(args.audit_url) as store:
        result = store.summary(args.run_key or store.latest_run_key(args.dag_id))
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_summary(result))
    return 0 if result.reconciled else 1


if __name__ == "__main__":
    raise SystemExit(main())
