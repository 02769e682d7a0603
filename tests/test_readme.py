"""The README's commands, run as written: the quick start against a sandbox PACS (Orthanc loaded with a demo
hospital), checked against the ground truth; the compose commands name services that exist.

Blocks are marked in README.md by an HTML comment on the line before their fence:
``<!-- readme-test: connections -->`` (the site's values: the test sets the same variables to the sandbox's),
``<!-- readme-test: run -->`` (run verbatim with bash), ``<!-- readme-test: compose -->`` (checked against
docker-compose.yaml; no container engine here).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from dataclasses import replace
from datetime import UTC, date, datetime
from itertools import pairwise

import pytest
import yaml
from pacsflow.core.audit import AuditStore
from pacsflow.core.dicom.config import PacsConfig, ReceiverConfig
from pacsflow.core.settings import load_definition
from pacsflow.demo.environment import DEMO_DAG_ID, DEMO_DEFINITION, REPO_ROOT, connection_environment
from pacsflow.demo.hospital import build_hospital, expected_instances, expected_outcomes, load_ground_truth, within
from pacsflow.demo.sandbox import orthanc

from tests.helpers import free_port

README = REPO_ROOT / "README.md"
MARKED_BLOCK = re.compile(r"<!-- readme-test: (?P<name>[a-z-]+) -->\n```bash\n(?P<body>.*?)\n```", re.DOTALL)
DAG_ID = DEMO_DAG_ID
YEAR_2024 = (datetime(2024, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC))  # the block's run
RUN_SECONDS = 600


def blocks(name: str) -> list[str]:
    found = [m.group("body") for m in MARKED_BLOCK.finditer(README.read_text()) if m.group("name") == name]
    assert found, f"README.md has no block marked <!-- readme-test: {name} -->"
    return found


def exported_names(script: str) -> set[str]:
    return set(re.findall(r"^export ([A-Z0-9_]+)=", script, re.MULTILINE))


def test_the_connections_block_sets_the_three_connections_as_json():
    (script,) = blocks("connections")
    probe = (
        script + "\npython3 -c 'import json, os; print(json.dumps({k: json.loads(v) for k, v in os.environ."
        'items() if k.startswith("AIRFLOW_CONN_")}))\''
    )
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", probe],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    connections = json.loads(done.stdout)
    # the variables the quick-start test points at the sandbox are exactly those the README has users set
    sandbox = connection_environment(
        ris_url="sqlite://",
        audit_url="sqlite://",
        receiver=ReceiverConfig(),
        pacs=PacsConfig(host="127.0.0.1", port=104, called_ae="PACS_AE"),
    )
    assert set(connections) == exported_names(script) == set(sandbox)
    assert connections["AIRFLOW_CONN_PACSFLOW_PACS"]["conn_type"] == "dicom"


@pytest.mark.orthanc
@pytest.mark.airflow
def test_the_quick_start_runs_as_written_against_a_sandbox_pacs(tmp_path):
    (script,) = blocks("run")
    hospital = build_hospital(
        tmp_path / "hospital", accessions=20, seed=31, first_day=YEAR_2024[0].date(), last_day=date(2024, 12, 31)
    )
    receiver = ReceiverConfig(ae_title="PACSFLOW", port=free_port())
    workdir = tmp_path / "checkout"  # the repository as the user has it; var/ lands here, not in the repo
    workdir.mkdir()
    for name in ("dags", "include", ".venv"):
        (workdir / name).symlink_to(REPO_ROOT / name)
    audit_url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    with orthanc(tmp_path / "orthanc", move_destinations={receiver.ae_title: (receiver.host, receiver.port)}) as pacs:
        pacs.load(sorted(hospital.dicom_dir.rglob("*.dcm")))
        connections = connection_environment(
            ris_url=hospital.ris_url,
            audit_url=audit_url,
            pacs=replace(pacs.config, calling_ae="PACSFLOW"),
            receiver=receiver,
        )
        env = {name: value for name, value in os.environ.items() if not name.startswith("AIRFLOW")}
        env.update(connections)
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_SECONDS,
            check=False,
        )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    truth = within(load_ground_truth(hospital.ground_truth_path), *YEAR_2024)
    data_root = workdir / "var" / "data"
    on_disk = {(p.parent.parent.name, p.parent.name, p.stem) for p in (data_root / "dicom").glob("*/*/*.dcm")}
    assert on_disk == expected_instances(truth)
    with AuditStore.connect(audit_url) as store:
        run_key = store.latest_run_key(DAG_ID)
        outcomes = {an: row["outcome"] for an, row in store.accession_outcomes(run_key).items()}
        assert store.summary(run_key).succeeded
    assert outcomes == expected_outcomes(truth)


@pytest.mark.airflow
def test_the_quick_start_test_run_leaves_every_scheduled_run_to_the_scheduler():
    # a test run holds its logical date: on a schedule boundary it takes the scheduled run's, which is then skipped
    from airflow.sdk.timezone import parse
    from airflow.timetables.interval import CronDataIntervalTimetable

    (script,) = blocks("run")
    (day,) = re.findall(rf"^airflow dags test {DAG_ID} (\S+)", script, re.MULTILINE)
    logical_date = parse(day)
    schedule = CronDataIntervalTimetable(load_definition(DEMO_DEFINITION).schedule, timezone="UTC")
    interval = schedule.infer_manual_data_interval(run_after=logical_date)
    assert (interval.start, interval.end) == YEAR_2024
    assert logical_date not in (interval.start, interval.end)


def test_the_compose_commands_name_services_and_profiles_that_exist():
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yaml").read_text())
    services, profiles = (
        set(compose["services"]),
        {p for s in compose["services"].values() for p in s.get("profiles", [])},
    )
    lines = [line.split("#")[0].strip() for block in blocks("compose") for line in block.splitlines()]
    commands = [shlex.split(line) for line in lines if line.startswith("docker compose")]
    assert commands
    for words in commands:
        for flag, value in pairwise(words):
            if flag == "--profile":
                assert value in profiles, value
            if flag == "--scale":
                assert value.split("=")[0] in services, value
        if words[2] in {"exec", "logs"}:  # their first operand is a service
            assert next(word for word in words[3:] if not word.startswith("-")) in services, words
    scripts = [shlex.split(line) for line in lines if line.startswith("bash ")]
    assert all((REPO_ROOT / words[1]).is_file() for words in scripts)


def layout_table() -> list[tuple[str, str]]:
    """The rows (path column, description) of the README's Layout table."""
    section = README.read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    return [(path.strip(), what.strip()) for path, what in rows]


def test_every_path_in_the_layout_table_exists():
    package = REPO_ROOT / "plugins" / "pacsflow"
    named = [path for column, _ in layout_table() for path in re.findall(r"`([^`]+)`", column)]
    assert named
    missing = [path for path in named if not (REPO_ROOT / path).exists() and not (package / path).exists()]
    assert not missing, f"README's Layout table names paths that are not in the tree: {missing}"


def test_the_layout_table_names_every_module_of_the_package():
    table = "\n".join(f"{column} {what}" for column, what in layout_table())
    package = REPO_ROOT / "plugins" / "pacsflow"
    modules = [
        entry
        for folder in (package, package / "core")
        for entry in folder.iterdir()
        if (entry.suffix == ".py" and entry.name != "__init__.py") or (entry / "__init__.py").exists()
    ]
    unnamed = [
        str(entry.relative_to(package)) for entry in modules if not re.search(rf"[`/]{re.escape(entry.name)}/?`", table)
    ]
    assert not unnamed, f"README's Layout table does not describe: {unnamed}"
