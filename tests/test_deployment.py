"""docker-compose.yaml, Dockerfile and .env.example, checked without a container engine.

The compose file is validated by Debian's ``docker-compose config`` and compared with the topology in
``pacsflow.deployment``, from which the natively run deployment of tests/dags/test_distributed.py is built:
same services, same commands, same variable names, the data root shared by the same services.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pacsflow.deployment import CONTAINER_DATA_ROOT, DATA_ROOT_ENV, SERVICES, init_steps

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"
DATA_VOLUME = "pacsflow-data"
POOL_SLOTS_VARIABLE = "${PACSFLOW_PACS_POOL_SLOTS:-4}"
# Variables only the containers need, and why.
COMPOSE_ONLY_ENV = {
    "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK",  # the scheduler container's health check endpoint
    "DUMB_INIT_SETSID",  # the official image's init: warm shutdown of Celery workers
}
# Services of the compose file that are not long-running pacsflow/Airflow services of the topology.
INFRASTRUCTURE = {"postgres", "redis", "airflow-init"}
SANDBOX = {"orthanc", "sandbox-loader", "sandbox-extraction"}
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def generated_env(tmp_path_factory) -> Path:
    env_file = tmp_path_factory.mktemp("env") / ".env"
    subprocess.run(["bash", str(REPO / "scripts" / "make-env.sh"), str(env_file)], check=True, capture_output=True)
    return env_file


def docker_compose(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed: run `make test` (it installs the Debian packages)")
    return subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), *args], capture_output=True, text=True, cwd=REPO, check=False
    )


def env_example() -> dict[str, str]:
    pairs = (
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line.strip() and not line.startswith("#")
    )
    return dict(pairs)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """volume -> path in the container"""
    return dict(entry.split(":")[:2] for entry in service.get("volumes", []) if ":" in entry)


# -- validity -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", [[], ["--profile", "sandbox"]], ids=["default", "sandbox"])
def test_docker_compose_validates_the_file(generated_env, profile):
    done = docker_compose("--env-file", str(generated_env), *profile, "config", "--quiet")
    assert done.returncode == 0, done.stderr


def test_the_generated_env_file_is_private_and_complete(generated_env):
    assert generated_env.stat().st_mode & 0o077 == 0
    values = dict(
        line.split("=", 1) for line in generated_env.read_text().splitlines() if line and not line.startswith("#")
    )
    assert set(values) == set(env_example())
    assert all(values.values())


def test_no_secret_is_committed_and_compose_names_the_missing_one():
    secrets = {name for name, value in env_example().items() if not value}
    assert {"POSTGRES_PASSWORD", "AIRFLOW_JWT_SECRET", "AIRFLOW_FERNET_KEY", "PACSFLOW_LOG_KEY"} <= secrets
    done = docker_compose("--env-file", str(ENV_EXAMPLE), "config", "--quiet")
    assert done.returncode != 0
    assert re.search(r"set [A-Z_]+ in \.env", done.stderr), done.stderr


def test_every_variable_of_the_compose_file_is_explained_in_env_example():
    used = set(VARIABLE.findall(COMPOSE_FILE.read_text()))
    documented = env_example()
    assert used == set(documented)
    text = ENV_EXAMPLE.read_text()
    for name in documented:  # a comment right above each variable (or its group) explains it
        above = text.split(f"\n{name}=")[0].rstrip().splitlines()[-1]
        assert above.startswith("#") or re.fullmatch(r"[A-Z0-9_]+=.*", above), name


def test_the_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).with_name("hadolint")
    done = subprocess.run(
        [str(hadolint), "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- the same topology as the native deployment ------------------------------------------------------------------
def test_the_compose_services_are_the_topology(compose):
    topology = {spec.name for spec in SERVICES}
    assert set(compose["services"]) == topology | INFRASTRUCTURE | SANDBOX
    assert {name for name, svc in compose["services"].items() if "sandbox" in svc.get("profiles", [])} == SANDBOX


@pytest.mark.parametrize("spec", SERVICES, ids=lambda spec: spec.name)
def test_each_service_runs_the_topology_command_with_its_variables(compose, spec):
    service = compose["services"][spec.name]
    assert tuple(service["command"]) == spec.command
    names = set(service["environment"])
    assert spec.environment <= names, sorted(spec.environment - names)
    assert names - spec.environment <= COMPOSE_ONLY_ENV, sorted(names - spec.environment - COMPOSE_ONLY_ENV)
    assert "healthcheck" in service
    assert "scale" not in service and "container_name" not in service  # would stop --scale


@pytest.mark.parametrize("spec", SERVICES, ids=lambda spec: spec.name)
def test_the_data_root_is_shared_by_the_services_that_need_it(compose, spec):
    service = compose["services"][spec.name]
    assert (mounts(service).get(DATA_VOLUME) == CONTAINER_DATA_ROOT) == spec.data_root
    if DATA_ROOT_ENV in spec.environment:
        assert service["environment"][DATA_ROOT_ENV] == CONTAINER_DATA_ROOT


def test_the_init_service_runs_the_topology_init_steps_in_order(compose):
    script = compose["services"]["airflow-init"]["command"][-1]
    lines = [shlex.split(line) for line in script.splitlines() if line.strip() and not line.startswith("set ")]
    assert lines == init_steps(pool_slots=POOL_SLOTS_VARIABLE)
    conditions = {name: dep["condition"] for name, dep in compose["services"]["airflow-init"]["depends_on"].items()}
    assert conditions == {"postgres": "service_healthy", "redis": "service_healthy"}


@pytest.mark.parametrize("spec", [s for s in SERVICES if s.command[0] == "airflow"], ids=lambda spec: spec.name)
def test_airflow_services_start_after_the_init(compose, spec):
    depends = compose["services"][spec.name]["depends_on"]
    assert depends["airflow-init"]["condition"] == "service_completed_successfully"


def test_the_receiver_is_published_and_checked_by_c_echo(compose):
    receiver = compose["services"]["pacsflow-receiver"]
    assert receiver["ports"] == ["${PACSFLOW_RECEIVER_PORT:-11113}:${PACSFLOW_RECEIVER_PORT:-11113}"]
    assert receiver["healthcheck"]["test"] == ["CMD", "pacsflow", "echo"]
    assert receiver["environment"]["PACSFLOW_RECEIVER_HOST"] == "0.0.0.0"


def test_the_sandbox_pacs_knows_the_receiver_and_the_connection_knows_the_pacs(compose):
    orthanc = json.loads((REPO / "deploy" / "sandbox" / "orthanc.json").read_text())
    env = compose["services"]["airflow-worker"]["environment"]
    receiver_env = compose["services"]["pacsflow-receiver"]["environment"]
    defaults = env_example()
    pacs = json.loads(VARIABLE.sub(lambda m: defaults[m.group(1)], env["AIRFLOW_CONN_PACSFLOW_PACS"]))
    assert orthanc["DicomModalities"] == {
        "pacsflow": [pacs["extra"]["receiver_ae"], "pacsflow-receiver", pacs["extra"]["receiver_port"]]
    }
    assert (pacs["host"], pacs["port"], pacs["login"]) == ("orthanc", orthanc["DicomPort"], orthanc["DicomAet"])
    assert pacs["extra"]["receiver_mode"] == "service"
    allowed = VARIABLE.sub(lambda m: defaults[m.group(1)], receiver_env["PACSFLOW_RECEIVER_ALLOWED_AES"])
    assert orthanc["DicomAet"] in allowed.split(",")
    # the defaults in the compose file are those of .env.example
    for match in re.finditer(r"\$\{([A-Z0-9_]+):-([^}]*)\}", COMPOSE_FILE.read_text()):
        assert defaults[match.group(1)] == match.group(2), match.group(1)


def test_the_build_context_holds_what_the_dockerfile_copies_and_no_secret():
    patterns = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert patterns[0] == "*"  # everything excluded, then what the image needs
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    copied = {
        line.split()[-2].split("/")[0]
        for line in (REPO / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
    }
    assert copied <= allowed
    assert not any(name.startswith(".env") or name == "var" for name in allowed)
    assert "/.env" in (REPO / ".gitignore").read_text().splitlines()
