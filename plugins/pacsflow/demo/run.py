"""``make demo``: build a demo hospital, serve it from a sandbox PACS, run the DAG through Airflow, report.

Everything lives under ``var/demo`` in the repository; the sandbox PACS is stopped on the way out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from pacsflow.core.audit import AuditStore
from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.report import format_summary
from pacsflow.demo.environment import REPO_ROOT, airflow_environment, connection_environment
from pacsflow.demo.hospital import build_hospital
from pacsflow.demo.sandbox import qrscp

DAG_ID = "pacsflow_extract"
RECEIVER_AE = "PACSFLOW"
PACS_AE = "QRSCP"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def airflow(env: dict[str, str], *args: str, log: Path | None = None) -> None:
    command = [str(Path(sys.executable).with_name("airflow")), *args]
    if log is None:
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        return
    with log.open("w") as handle:
        completed = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if completed.returncode:
        raise SystemExit(f"airflow {' '.join(args[:2])} failed (exit {completed.returncode}); see {log}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--accessions", type=int, default=60, help="cohort size of the demo hospital")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "var" / "demo")
    args = parser.parse_args(argv)

    workdir: Path = args.workdir.resolve()
    data_root, airflow_home = workdir / "data", workdir / "airflow"
    for directory in (data_root, airflow_home):
        directory.mkdir(parents=True, exist_ok=True)
    print(f"building the demo hospital ({args.accessions} ANs, seed {args.seed}) ...", flush=True)
    hospital = build_hospital(workdir / "hospital", accessions=args.accessions, seed=args.seed)
    audit_url = f"sqlite:///{data_root / 'audit.sqlite'}"
    receiver = ReceiverConfig(ae_title=RECEIVER_AE, port=free_port(), allowed_calling_aes=(PACS_AE,))

    with qrscp(workdir / "pacs", move_destinations={RECEIVER_AE: (receiver.host, receiver.port)},
               ae_title=PACS_AE) as pacs:
        loaded = pacs.load(sorted(hospital.dicom_dir.rglob("*.dcm")))
        print(f"sandbox PACS (pynetdicom qrscp) on port {pacs.config.port}: {loaded} instances loaded", flush=True)
        env = {
            **os.environ,
            **airflow_environment(airflow_home),
            **connection_environment(ris_url=hospital.ris_url, audit_url=audit_url, pacs=pacs.config,
                                     receiver=receiver),
            "PACSFLOW_DATA_ROOT": str(data_root),
        }
        airflow(env, "db", "migrate")
        airflow(env, "pools", "set", "pacs", "4", "Concurrent associations to the PACS")
        conf = json.loads((REPO_ROOT / "include" / "config" / "demo_run.json").read_text())
        conf["data_root"] = str(data_root)
        print("running the DAG with `airflow dags test` ...", flush=True)
        airflow(env, "dags", "test", DAG_ID, "--conf", json.dumps(conf), log=workdir / "dag_test.log")

    with AuditStore.connect(audit_url) as store:
        run_key = store.latest_run_key(DAG_ID)
        summary = store.summary(run_key)
    print(format_summary(summary))
    print(f"  DICOM files    {data_root / 'dicom'}")
    print(f"  Parquet        {data_root / 'metadata'}")
    print(f"  release        {data_root / 'release' / 'default'} (de-identified: what researchers get)")
    print(f"  audit          {audit_url}")
    print(f"  ground truth   {hospital.ground_truth_path}")
    print(f"  Airflow log    {workdir / 'dag_test.log'}")
    return 0 if summary.reconciled else 1


if __name__ == "__main__":
    raise SystemExit(main())
