"""``make demo``: build a demo hospital, serve it from a sandbox PACS, run the demo extraction through a real
Airflow (api-server, scheduler, dag-processor; LocalExecutor; the README's ``pacs`` pool of 4): unpaused, the
yearly definition catches up one run per year since 2020, each extracting its own year. Report every run.

Everything lives under ``var/demo`` in the repository; the sandbox PACS and Airflow are stopped on the way out.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from pacsflow.core.audit import AuditStore
from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.demo.deployment import local_deployment
from pacsflow.demo.environment import DEMO_DAG_ID, REPO_ROOT, connection_environment
from pacsflow.demo.hospital import build_hospital
from pacsflow.demo.sandbox import free_port, qrscp

RECEIVER_AE = "PACSFLOW"
PACS_AE = "QRSCP"
PACS_POOL_SLOTS = 4
RUN_TIMEOUT_SECONDS = 1200
FIRST_YEAR = 2020  # the demo definition's start_date


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--accessions", type=int, default=60, help="cohort size of the demo hospital")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "var" / "demo")
    args = parser.parse_args(argv)

    workdir: Path = args.workdir.resolve()
    shutil.rmtree(workdir / "airflow", ignore_errors=True)  # a fresh Airflow each time; the data root stays
    data_root = workdir / "data"
    data_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    print(f"building the demo hospital ({args.accessions} ANs, seed {args.seed}) ...", flush=True)
    hospital = build_hospital(workdir / "hospital", accessions=args.accessions, seed=args.seed)
    audit_url = f"sqlite:///{data_root / 'audit.sqlite'}"
    receiver = ReceiverConfig(ae_title=RECEIVER_AE, port=free_port(), allowed_calling_aes=(PACS_AE,))

    with qrscp(
        workdir / "pacs", move_destinations={RECEIVER_AE: (receiver.host, receiver.port)}, ae_title=PACS_AE
    ) as pacs:
        loaded = pacs.load(sorted(hospital.dicom_dir.rglob("*.dcm")))
        print(f"sandbox PACS (pynetdicom qrscp) on port {pacs.config.port}: {loaded} instances loaded", flush=True)
        env = connection_environment(ris_url=hospital.ris_url, audit_url=audit_url, pacs=pacs.config, receiver=receiver)
        print("starting Airflow (api-server, scheduler, dag-processor; LocalExecutor) ...", flush=True)
        with local_deployment(
            workdir / "airflow", data_root=data_root, pool_slots=PACS_POOL_SLOTS, extra_env=env
        ) as airflow:
            airflow.wait_for_dag(DEMO_DAG_ID)
            years = datetime.now(UTC).year - FIRST_YEAR
            print(f"unpausing {DEMO_DAG_ID}: {years} yearly catch-up runs (UI: {airflow.api_url}) ...", flush=True)
            airflow.unpause(DEMO_DAG_ID)
            runs = airflow.wait_for_runs(DEMO_DAG_ID, years, RUN_TIMEOUT_SECONDS)

    succeeded, totals = True, Counter[str]()
    with AuditStore.connect(audit_url) as store:
        for run in runs:
            summary = store.summary(f"{DEMO_DAG_ID}/{run['dag_run_id']}")
            succeeded &= run["state"] == "success" and summary.succeeded
            totals.update(cohort=summary.cohort, instances=summary.instances, **summary.outcomes)
            print(
                f"{run['data_interval_start'][:10]} .. {run['data_interval_end'][:10]}  Airflow {run['state']:<8}"
                f"  audit {summary.verdict.state:<8} {_counts(summary.cohort, summary.outcomes)}"
            )
    print(f"all runs                                            {_counts(totals.pop('cohort'), totals)}")
    print(f"  DICOM files    {data_root / 'dicom'}")
    print(f"  Parquet        {data_root / 'metadata' / DEMO_DAG_ID}")
    print(f"  release        {data_root / 'release' / 'demo'} (de-identified: what researchers get)")
    print(f"  audit          {audit_url}")
    print(f"  ground truth   {hospital.ground_truth_path}")
    print(f"  Airflow logs   {workdir / 'airflow' / 'home' / 'logs'}")
    return 0 if succeeded else 1


def _counts(cohort: int, counts: dict[str, int]) -> str:
    return f"{cohort:>3} ANs: " + ", ".join(f"{key} {value}" for key, value in sorted(counts.items()))


if __name__ == "__main__":
    os.umask(0o077)  # the demo's files hold (synthetic) patient data: service account only
    raise SystemExit(main())
