"""The distribution as a site installs it: the wheel built from this tree, installed with its declared
dependencies into a fresh virtual environment that holds only Airflow, registers the provider, the ``dicom``
connection type, the audit plugin and the ``pacsflow`` command.

Both installs take their versions from requirements.txt as a constraints file, so the environment is the tested
one; what is missing from the pins, or a declared range the pins do not satisfy, fails here. Downloads from the
package index (pip's cache makes a second run quick).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.packaging, pytest.mark.airflow]

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements.txt"
INSTALL_SECONDS = 1800
COMMAND_SECONDS = 300
# What a virtual environment has before anything is installed, and the distribution under test.
NOT_PINNED = {"pip", "setuptools", "pacsflow"}


def pins(requirements: Path) -> dict[str, str]:
    """``{normalized name: version}`` of a requirements file's ``name==version`` lines."""
    found = {}
    for line in requirements.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if match:
            found[normalized(match.group(1))] = match.group(2)
    return found


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run(command: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the tree (the build writes build/ and egg-info next to the sources)."""
    source = tmp_path_factory.mktemp("source")
    shutil.copy2(REPO / "pyproject.toml", source)
    shutil.copytree(REPO / "plugins", source / "plugins", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    # no build isolation: the build backend is the setuptools pinned in requirements-dev.txt, not a fresh download
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), "."],
        cwd=source,
        timeout=COMMAND_SECONDS,
    )
    (built,) = out.glob("pacsflow-*.whl")
    return built


@pytest.fixture(scope="module")
def bare_airflow(tmp_path_factory, wheel: Path) -> Path:
    """A fresh virtual environment with Airflow, then the wheel with what it declares; returns its bin/."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout=COMMAND_SECONDS)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--constraint", str(REQUIREMENTS)]
    airflow = f"apache-airflow=={pins(REQUIREMENTS)['apache-airflow']}"
    run([*pip, airflow], timeout=INSTALL_SECONDS)
    run([*pip, str(wheel)], timeout=INSTALL_SECONDS)
    return venv / "bin"


@pytest.fixture
def bare_env(tmp_path, bare_airflow: Path) -> dict[str, str]:
    """Nothing of the test session's Airflow (its AIRFLOW__* settings name this repository's plugins folder)."""
    home = tmp_path / "airflow-home"
    home.mkdir()
    return {
        "PATH": f"{bare_airflow}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "AIRFLOW_HOME": str(home),
        "LANG": "C.UTF-8",
    }


def in_bare(bare_airflow: Path, env: dict[str, str], *args: str) -> str:
    # cwd outside the repository: nothing of the source tree is importable
    return run([str(bare_airflow / args[0]), *args[1:]], timeout=COMMAND_SECONDS, env=env, cwd=env["HOME"]).stdout


def test_the_wheel_holds_the_package_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "pacsflow/py.typed" in names
    assert any(re.fullmatch(r"pacsflow/ui/templates/[^/]+\.html", name) for name in names)
    assert any(re.fullmatch(r"pacsflow/ui/static/[^/]+\.css", name) for name in names)
    assert not [name for name in names if name.startswith(("tests/", "bench/", "dags/"))]


def test_the_environment_is_the_pinned_one(bare_airflow: Path, bare_env: dict[str, str]) -> None:
    in_bare(bare_airflow, bare_env, "python", "-m", "pip", "check")
    frozen = json.loads(in_bare(bare_airflow, bare_env, "python", "-m", "pip", "list", "--format", "json"))
    installed = {normalized(item["name"]): item["version"] for item in frozen}
    pinned = pins(REQUIREMENTS)
    unpinned = sorted(set(installed) - set(pinned) - NOT_PINNED)
    assert not unpinned, f"installed with pacsflow but not pinned in requirements.txt: {unpinned}"
    assert {name: version for name, version in installed.items() if name in pinned} == {
        name: pinned[name] for name in installed if name in pinned
    }
    # the package comes from the wheel, not from a source tree on the path
    where = in_bare(bare_airflow, bare_env, "python", "-c", "import pacsflow; print(pacsflow.__file__)")
    assert Path(where.strip()).is_relative_to(bare_airflow.parent / "lib")


def test_airflow_lists_the_provider(bare_airflow: Path, bare_env: dict[str, str]) -> None:
    providers = json.loads(in_bare(bare_airflow, bare_env, "airflow", "providers", "list", "--output", "json"))
    (pacsflow,) = [provider for provider in providers if provider["package_name"] == "pacsflow"]
    version = in_bare(
        bare_airflow, bare_env, "python", "-c", "import importlib.metadata as m; print(m.version('pacsflow'))"
    )
    assert pacsflow["version"] == version.strip()


def test_the_dicom_connection_type_is_registered(bare_airflow: Path, bare_env: dict[str, str]) -> None:
    hooks = json.loads(in_bare(bare_airflow, bare_env, "airflow", "providers", "hooks", "--output", "json"))
    (dicom,) = [hook for hook in hooks if hook["connection_type"] == "dicom"]
    assert dicom["class"] == "pacsflow.hooks.dicom.DicomHook"
    assert dicom["package_name"] == "pacsflow"


def test_the_audit_plugin_is_loaded(bare_airflow: Path, bare_env: dict[str, str]) -> None:
    plugins = json.loads(in_bare(bare_airflow, bare_env, "airflow", "plugins", "--output", "json"))
    (audit,) = [plugin for plugin in plugins if plugin["name"] == "pacsflow_audit"]
    assert "pacsflow" in json.dumps(audit)


def test_the_pacsflow_command_runs(bare_airflow: Path, bare_env: dict[str, str]) -> None:
    usage = in_bare(bare_airflow, bare_env, "pacsflow", "--help")
    for command in ("summary", "cohort", "echo"):
        assert command in usage
