"""Sandbox PACS on loopback for the demo and the tests: Orthanc (Debian) and pynetdicom's ``qrscp``.

Each runs in its own work directory on free ports, knows the given move destinations, and is stopped when
the context closes. Never expose either to a network (qrscp had a path-traversal CVE in 2026).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, StoragePresentationContexts

from pacsflow.core.dicom.client import PacsClient
from pacsflow.core.dicom.config import PacsConfig
from pacsflow.core.dicom.errors import PacsError
from pacsflow.core.dicom.transport import tune_for_latency
from pacsflow.core.processes import stop_process

ORTHANC_BINARY = "/usr/sbin/Orthanc"
STARTUP_SECONDS = 60.0


@dataclass(frozen=True)
class SandboxPacs:
    config: PacsConfig
    http_url: str | None = None

    def load(self, files: Iterable[Path]) -> int:
        """C-STORE the files into the PACS over one association; returns how many it accepted."""
        ae = AE(ae_title="LOADER")
        ae.requested_contexts = StoragePresentationContexts
        assoc = ae.associate(self.config.host, self.config.port, ae_title=self.config.called_ae)
        if not assoc.is_established:
            raise RuntimeError("the sandbox PACS refused the loader's association")
        tune_for_latency(assoc)
        stored = 0
        try:
            for path in files:
                status = assoc.send_c_store(dcmread(path))
                stored += int(status is not None and status.get("Status") == 0x0000)
        finally:
            assoc.release()
        return stored


def free_port() -> int:
    """A loopback TCP port free right now (the demo's and the tests' one way to pick a port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def orthanc(
    workdir: Path,
    *,
    move_destinations: Mapping[str, tuple[str, int]],
    ae_title: str = "ORTHANC",
    result_cap: int | None = None,
    default_encoding: str = "Utf8",
) -> Iterator[SandboxPacs]:
    """Orthanc with its own configuration, storage and ports; TCP_NODELAY on (DCMTK's switch).

    With ``result_cap`` Orthanc stops C-FIND at that many matches and answers 0xFE00. Orthanc 1.10 answers
    C-FIND in ``default_encoding`` whatever the request asks ("Latin1" gives ISO_IR 100 answers)."""
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "pacsflow-sandbox",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowStore": True,
        "UnknownSopClassAccepted": True,
        "MaximumPduLength": 65536,
        "DicomModalities": {name.lower(): [name, host, port] for name, (host, port) in move_destinations.items()},
        "Plugins": [],
        "StorageCompression": False,
        "LimitFindResults": result_cap or 0,
        "LimitFindInstances": result_cap or 0,
        "DefaultEncoding": default_encoding,
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    env = {**os.environ, "TCP_NODELAY": "1"}
    with (workdir / "orthanc.log").open("wb") as log:
        process = subprocess.Popen(
            [ORTHANC_BINARY, f"--logdir={workdir}", str(config_path)], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    pacs = SandboxPacs(
        PacsConfig(host="127.0.0.1", port=dicom_port, called_ae=ae_title, calling_ae="PACSFLOW", result_cap=result_cap),
        http_url=f"http://127.0.0.1:{http_port}",
    )
    with _running(process, pacs):
        yield pacs


@contextmanager
def qrscp(
    workdir: Path, *, move_destinations: Mapping[str, tuple[str, int]], ae_title: str = "QRSCP"
) -> Iterator[SandboxPacs]:
    """pynetdicom's qrscp app, with its SQLite database and instance store in ``workdir``.

    qrscp answers C-FIND without SpecificCharacterSet (names outside Latin-1 come back as '?') and at STUDY
    and SERIES level once per matching instance."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    sections = "\n".join(
        f"[{name}]\n    address: {host}\n    port: {dest_port}\n"
        for name, (host, dest_port) in move_destinations.items()
    )
    (workdir / "qrscp.ini").write_text(
        "[DEFAULT]\n"
        f"    ae_title: {ae_title}\n    port: {port}\n    max_pdu: 0\n"
        "    acse_timeout: 30\n    dimse_timeout: 60\n    network_timeout: 60\n"
        "    bind_address: 127.0.0.1\n"
        f"    instance_location: {workdir / 'instances'}\n"
        f"    database_location: {workdir / 'instances.sqlite'}\n"
        "    log_identifier: False\n\n" + sections
    )
    with (workdir / "qrscp.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pynetdicom", "qrscp", "-q", "-c", str(workdir / "qrscp.ini")],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    pacs = SandboxPacs(PacsConfig(host="127.0.0.1", port=port, called_ae=ae_title, calling_ae="PACSFLOW"))
    with _running(process, pacs):
        yield pacs


@contextmanager
def _running(process: subprocess.Popen[bytes], pacs: SandboxPacs) -> Iterator[None]:
    try:
        _wait_until_answering(process, pacs.config)
        yield
    finally:
        stop_process(process)


def _wait_until_answering(process: subprocess.Popen[bytes], config: PacsConfig) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the sandbox PACS exited at start-up (code {process.returncode}); see its log")
        try:
            with PacsClient(config) as client:
                client.echo()
            return
        except PacsError:
            time.sleep(0.2)
    raise RuntimeError("the sandbox PACS did not answer C-ECHO in time")
