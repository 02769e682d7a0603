"""The ``pacsflow cohort`` dry run: what a definition's author checks before scheduling it."""

from __future__ import annotations

import re
from datetime import timedelta

from pacsflow.cli import main
from pacsflow.demo.environment import DEMO_DEFINITION
from pacsflow.demo.hospital import build_hospital, load_ground_truth


def test_the_dry_run_counts_the_cohort_of_an_interval_without_retrieving(tmp_path, capsys):
    hospital = build_hospital(tmp_path / "hospital", accessions=25, seed=5)
    truth = load_ground_truth(hospital.ground_truth_path)
    start, end = hospital.interval
    args = ["cohort", str(DEMO_DEFINITION), "--ris-url", hospital.ris_url]
    assert main([*args, "--start", start.isoformat(), "--end", end.isoformat()]) == 0
    printed = capsys.readouterr().out
    in_cohort = [a for a in truth["accessions"] if a["in_cohort"]]
    assert f"distinct ANs  {len(in_cohort)}\n" in printed
    assert "naive UTC datetime" in printed
    assert not any(a["accession_number"] in printed for a in truth["accessions"])  # counts only

    empty_end = start + timedelta(seconds=1)
    assert main([*args, "--start", start.isoformat(), "--end", empty_end.isoformat()]) == 0
    assert "the cohort is empty" in capsys.readouterr().out


def test_the_dry_run_names_a_broken_definition(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    text = re.sub(r"(?m)^schedule: .*$", 'schedule: "@often"', DEMO_DEFINITION.read_text())
    broken.write_text(text.replace("id: demo", "id: broken"))
    assert main(["cohort", str(broken), "--ris-url", "sqlite://", "--start", "2021-01-01", "--end", "2021-02-01"]) == 1
    assert "broken.yaml: schedule" in capsys.readouterr().err
