"""The receiver service configured the container way (``PACSFLOW_RECEIVER_*`` variables, no command line), and
``pacsflow echo``, its health check."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pacsflow.core.dicom.__main__ import parse_args

from tests.helpers import free_port

# the receiver service runs as its own process: the slow tier (`orthanc`: a DICOM server process)
pytestmark = pytest.mark.orthanc

PACSFLOW = str(Path(sys.executable).with_name("pacsflow"))


def echo(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PACSFLOW, "echo", "--timeout", "5", *args], check=False, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("backend", ["pynetdicom", "dcmtk"])
def test_the_service_reads_its_settings_from_the_environment_and_answers_its_health_check(tmp_path, backend):
    env = {
        **os.environ,
        "PACSFLOW_DATA_ROOT": str(tmp_path),
        "PACSFLOW_RECEIVER_AE_TITLE": "RECV",
        "PACSFLOW_RECEIVER_PORT": str(free_port()),
        "PACSFLOW_RECEIVER_BACKEND": backend,
        "PACSFLOW_RECEIVER_ALLOWED_AES": "THEPACS,OTHER",
        "PACSFLOW_RECEIVER_ALLOWED_ADDRESSES": "localhost",
        "PACSFLOW_RECEIVER_MAX_ASSOCIATIONS": "2",
    }
    service = subprocess.Popen([sys.executable, "-m", "pacsflow.core.dicom"], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while (healthy := echo(env)).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert healthy.returncode == 0, healthy.stdout
        assert "C-ECHO RECV@127.0.0.1" in healthy.stdout
        assert echo(env, "--calling-ae", "INTRUDER").returncode == 1  # the allow-list came from the environment
    finally:
        service.send_signal(signal.SIGTERM)
        _, log = service.communicate(timeout=30)
    assert service.returncode == 0
    assert f"({backend} backend)".encode() in log
    assert (tmp_path / "dicom").is_dir()  # $PACSFLOW_DATA_ROOT/dicom, as the workers expect


def test_an_unresolvable_allowed_address_names_the_setting(monkeypatch, capsys):
    monkeypatch.setenv("PACSFLOW_RECEIVER_ALLOWED_ADDRESSES", "127.0.0.1,no-such-host.invalid")
    with pytest.raises(SystemExit):
        parse_args(["--root", "/tmp/unused"])
    assert "PACSFLOW_RECEIVER_ALLOWED_ADDRESSES" in capsys.readouterr().err


def test_host_names_become_addresses_and_options_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("PACSFLOW_RECEIVER_ALLOWED_ADDRESSES", "localhost")
    monkeypatch.setenv("PACSFLOW_RECEIVER_PORT", "4000")
    args = parse_args(["--root", "/tmp/unused", "--port", "5000"])
    assert "127.0.0.1" in args.allow_address
    assert args.port == 5000


def test_without_a_root_the_error_names_the_variable(monkeypatch, capsys):
    monkeypatch.delenv("PACSFLOW_DATA_ROOT", raising=False)
    with pytest.raises(SystemExit):
        parse_args([])
    assert "PACSFLOW_DATA_ROOT" in capsys.readouterr().err
