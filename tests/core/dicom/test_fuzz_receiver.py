"""A bounded fuzz run against both receivers: mutated associations from a fixed seed (tests/core/dicom/fuzz.py).

The receiver must survive every case, answer success only for an instance that is then complete in the layout
(pynetdicom backend; the DCMTK backend's storescp answers before pacsflow examines the file, so there every
answered instance is either complete in the layout or refused and absent), keep no partial file, and stay within
its memory bound. ``PACSFLOW_FUZZ_CASES`` sets the cases per backend (CI: 40; the README's figures: 2,000).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter

import pytest
from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.dicom.header import is_complete
from pacsflow.core.storage import TEMP_PREFIX
from pydicom import dcmread

from tests.core.dicom.fuzz import make_case, run_case
from tests.core.dicom.peers import RECEIVER_AE, ReceiverProcess, legitimate_store_succeeds, stored_files

# Each attack runs against a receiver server in a child process: the slow tier (`orthanc`: a DICOM server process).
pytestmark = pytest.mark.orthanc

SEED = 20261202
CASES = int(os.environ.get("PACSFLOW_FUZZ_CASES", "40"))
RSS_LIMIT_MB = 250


def fuzz(backend: str, root, cases: int, seed: int = SEED) -> dict:
    """Run ``cases`` mutated associations; returns the figures (and asserts the properties)."""
    config = ReceiverConfig(
        ae_title=RECEIVER_AE, port=0, backend=backend, acse_timeout=2, dimse_timeout=3, network_timeout=3, max_pdu=65536
    )
    rng = random.Random(seed)
    answered: dict[str, tuple[int | None, tuple[str, str]]] = {}
    mutations: Counter[str] = Counter()
    with ReceiverProcess(config, root) as receiver:
        for number in range(cases):
            case = make_case(rng, number)
            mutations[case.mutation] += 1
            answered[case.sop_uid] = (run_case(receiver.port, case), (case.study_uid, case.series_uid))
            assert receiver.alive(), f"the receiver died at case {number} ({case.mutation})"
        assert legitimate_store_succeeds(receiver), "a legitimate association failed after the fuzz run"
        layout = receiver.layout
        for sop_uid, (status, (study, series)) in answered.items():
            path = layout.instance_path(study, series, sop_uid)
            if status == 0x0000 and backend == "pynetdicom":
                assert path.is_file(), "success answered for an instance not in the layout"
        outcome = receiver.stop()
    files = stored_files(root)
    for path in files:
        assert is_complete(path), "an incomplete file in the layout"
        dcmread(path)  # and pydicom reads all of it
    assert not [p for p in root.rglob("*") if p.is_file() and p.name.startswith(TEMP_PREFIX)]
    assert outcome.peak_rss_mb < RSS_LIMIT_MB
    successes = sum(1 for status, _ in answered.values() if status == 0x0000)
    return {
        "backend": backend,
        "cases": cases,
        "seed": seed,
        "crashes": 0,
        "answered_success": successes,
        "filed": len(files) - 1,
        "peak_rss_mb": outcome.peak_rss_mb,
        "mutations": dict(mutations),
        "rejected_reasons": outcome.rejected_reasons,
    }


@pytest.mark.parametrize("backend", ["pynetdicom", "dcmtk"])
def test_the_receiver_survives_mutated_associations(backend, tmp_path):
    figures = fuzz(backend, tmp_path / "root", CASES)
    print(json.dumps(figures))  # pytest -s: the figures the README's reliability section quotes
    assert figures["answered_success"] > 0 and figures["filed"] > 0  # the run reaches the store path too
