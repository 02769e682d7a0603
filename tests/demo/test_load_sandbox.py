"""The sandbox profile's loader: the demo hospital into a running PACS (Orthanc), its RIS on the data root."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pacsflow.core.dicom.client import PacsClient
from pacsflow.demo.hospital import exams_table, load_ground_truth
from pacsflow.demo.sandbox import orthanc
from sqlalchemy import create_engine, func, select

pytestmark = pytest.mark.orthanc


def test_the_loader_fills_the_pacs_and_leaves_the_ris_and_the_truth(tmp_path):
    out = tmp_path / "sandbox"
    with orthanc(tmp_path / "orthanc", move_destinations={}) as pacs:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pacsflow.demo.load_sandbox",
                "--out",
                str(out),
                "--accessions",
                "20",
                "--pacs-host",
                pacs.config.host,
                "--pacs-port",
                str(pacs.config.port),
                "--pacs-ae",
                pacs.config.called_ae,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        truth = load_ground_truth(out / "ground_truth.json")
        study_uids = {
            study["study_instance_uid"] for accession in truth["accessions"] for study in accession["studies"]
        }
        with PacsClient(pacs.config) as client:
            found = {match["StudyInstanceUID"] for match in client.find("STUDY", {"StudyInstanceUID": ""}).matches}
    assert found == study_uids
    assert not (out / "dicom").exists()
    engine = create_engine(f"sqlite:///{out / 'ris.sqlite'}")
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(exams_table)).scalar_one() == 20
    engine.dispose()
    assert "stored in the PACS" in done.stdout and "1." not in done.stdout  # counts, no UIDs


def test_the_loader_names_the_pacs_it_waited_for(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pacsflow.demo.load_sandbox",
            "--out",
            str(tmp_path),
            "--pacs-host",
            "127.0.0.1",
            "--pacs-port",
            "9",
            "--pacs-ae",
            "NOBODY",
            "--timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "NOBODY@127.0.0.1:9 did not answer C-ECHO" in done.stderr
