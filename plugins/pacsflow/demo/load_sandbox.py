"""``python -m pacsflow.demo.load_sandbox``: build the demo hospital and C-STORE it into a running PACS.

The ``sandbox`` profile of docker-compose.yaml runs it once: the RIS (SQLite) and the ground truth land in
``--out`` on the shared data root, the DICOM files in the PACS (and are then removed from ``--out``).
Prints counts only.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import PacsConfig
from pacsflow.core.dicom.errors import PacsError
from pacsflow.demo.hospital import build_hospital
from pacsflow.demo.sandbox import SandboxPacs

LOADER_AE = "LOADER"


def wait_for_pacs(config: PacsConfig, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with PacsClient(config) as client:
                client.echo()
            return
        except PacsError:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"the PACS {config.called_ae}@{config.host}:{config.port} did not answer "
                    f"C-ECHO within {timeout:.0f} s"
                ) from None
            time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pacsflow.demo.load_sandbox", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="where the RIS and ground truth go")
    parser.add_argument("--accessions", type=int, default=60)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--pacs-host", required=True)
    parser.add_argument("--pacs-port", type=int, required=True)
    parser.add_argument("--pacs-ae", required=True, help="the PACS's (called) AE title")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the PACS")
    args = parser.parse_args(argv)

    config = PacsConfig(
        host=args.pacs_host,
        port=args.pacs_port,
        called_ae=args.pacs_ae,
        calling_ae=LOADER_AE,
        acse_timeout=10,
        dimse_timeout=60,
        network_timeout=60,
    )
    wait_for_pacs(config, args.timeout)
    hospital = build_hospital(args.out, accessions=args.accessions, seed=args.seed)
    files = sorted(hospital.dicom_dir.rglob("*.dcm"))
    loaded = SandboxPacs(config).load(files)
    shutil.rmtree(hospital.dicom_dir)  # the PACS holds them now; the data root is for what pacsflow retrieves
    print(f"demo hospital: {args.accessions} ANs, {loaded} of {len(files)} instances stored in the PACS")
    return 0 if loaded == len(files) else 1


if __name__ == "__main__":
    raise SystemExit(main())
