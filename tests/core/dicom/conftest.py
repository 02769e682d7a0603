"""A demo hospital in Orthanc, and free ports for receivers, shared by the network-layer tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from pacsflow.demo.hospital import Hospital, build_hospital
from pacsflow.demo.sandbox import SandboxPacs, orthanc
from tests.conftest import free_port

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
