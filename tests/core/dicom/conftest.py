"""Real peers shared by the network-layer tests: a demo hospital in Orthanc and in qrscp, receiver ports, a PKI."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pacsflow.demo.hospital import Hospital, build_hospital
from pacsflow.demo.sandbox import SandboxPacs, orthanc, qrscp
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.helpers import free_port

RECEIVER_AE = "PACSFLOW"
UNWELCOMING_AE = "UNWELCOMING"  # a destination whose receiver refuses Orthanc


@pytest.fixture(scope="package")
def hospital(tmp_path_factory) -> Hospital:
    return build_hospital(tmp_path_factory.mktemp("hospital"), accessions=20, seed=3)


@pytest.fixture(scope="package")
def files(hospital) -> list[Path]:
    return sorted(hospital.dicom_dir.rglob("*.dcm"))


@pytest.fixture(scope="package")
def receiver_ports() -> dict[str, int]:
    return {RECEIVER_AE: free_port(), UNWELCOMING_AE: free_port()}


@pytest.fixture(scope="package")
def pacs(files, receiver_ports, tmp_path_factory) -> Iterator[SandboxPacs]:
    destinations = {ae: ("127.0.0.1", port) for ae, port in receiver_ports.items()}
    with orthanc(tmp_path_factory.mktemp("orthanc"), move_destinations=destinations) as sandbox:
        assert sandbox.load(files) == len(files)
        yield sandbox


@pytest.fixture(scope="package")
def a_series(files) -> tuple[str, str, int]:
    """(StudyInstanceUID, SeriesInstanceUID, instance count) of a CT series with several instances."""
    counts: dict[tuple[str, str], int] = {}
    for path in files:
        header = dcmread(path, stop_before_pixels=True)
        if header.Modality == "CT":
            key = (header.StudyInstanceUID, header.SeriesInstanceUID)
            counts[key] = counts.get(key, 0) + 1
    (study, series), count = max(counts.items(), key=lambda item: item[1])
    return study, series, count


@pytest.fixture(scope="package")
def qr_pacs(files, receiver_ports, tmp_path_factory) -> Iterator[SandboxPacs]:
    """pynetdicom's qrscp holding the same files; it knows the receiver as a move destination."""
    destinations = {RECEIVER_AE: ("127.0.0.1", receiver_ports[RECEIVER_AE])}
    with qrscp(tmp_path_factory.mktemp("qrscp"), move_destinations=destinations) as sandbox:
        assert sandbox.load(files) == len(files)
        yield sandbox


@pytest.fixture(scope="package")
def headers(files) -> list[Dataset]:
    return [dcmread(path, stop_before_pixels=True) for path in files]


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="package")
def pki(tmp_path_factory) -> Pki:
    """A throw-away CA with a server certificate for 127.0.0.1 and a client certificate (openssl CLI)."""
    directory = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca")
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        extension = ["-extfile", "server.ext"] if name == "server" else []
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "1",
            *extension,
        )
    return Pki(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
        directory / "client.pem",
        directory / "client.key",
    )
