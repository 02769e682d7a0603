"""One receiver per data root: the locks that let parallel retrieval tasks share it, on real sockets and
real processes."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.dicom.receiver import open_receiver
from pacsflow.core.dicom.sharing import (
    RECEIVER_LOCK,
    ReceiverUnavailable,
    receiver_lock,
    receiver_running,
    shared_receiver,
)
from pacsflow.core.storage import TEMP_PREFIX, StorageLayout

from tests.helpers import free_port

# tasks in child processes share a receiver server: the slow tier (`orthanc`: a DICOM server process)
pytestmark = pytest.mark.orthanc

BACKENDS = ["pynetdicom", "dcmtk"]


def receiver_processes(root: Path) -> list[int]:
    found = subprocess.run(
        ["pgrep", "-f", f"pacsflow.core.dicom --root {root} "], check=False, capture_output=True, text=True
    )
    return [int(pid) for pid in found.stdout.split()]


def wait_for(condition, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_receiver_on_one_data_root_refuses_and_touches_nothing(tmp_path, backend):
    layout = StorageLayout(tmp_path / "dicom")
    first = ReceiverConfig(port=free_port(), backend=backend)
    with open_receiver(first, layout):
        in_flight = layout.root / f"{TEMP_PREFIX}in-flight.dcm"  # an instance the first receiver is writing
        in_flight.write_bytes(b"partial")
        with (
            pytest.raises(ReceiverUnavailable, match="receiver_mode"),
            open_receiver(ReceiverConfig(port=free_port(), backend=backend), layout),
        ):
            pass
        assert in_flight.read_bytes() == b"partial"


def test_a_receiver_starting_during_a_probe_is_not_refused(tmp_path):
    """The task that starts the shared receiver probes ``receiver_running`` (an instant's hold of the receiver
    lock) until it listens; a receiver taking the lock during a probe must wait for it, not conclude that
    another receiver runs (a scheduled run once failed so)."""
    root = tmp_path / "dicom"
    root.mkdir()
    probe = os.fdopen(os.open(root / RECEIVER_LOCK, os.O_RDWR | os.O_CREAT, 0o600), "r+b")
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    threading.Timer(0.1, probe.close).start()  # a slow probe: far longer than a real one
    with receiver_lock(root):
        assert receiver_running(root)
    assert not receiver_running(root)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_receiver_that_cannot_listen_names_the_port_setting_and_releases_the_root(tmp_path, backend):
    layout = StorageLayout(tmp_path / "dicom")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with (
            pytest.raises(ReceiverUnavailable, match=f"receiver_port {port}"),
            open_receiver(ReceiverConfig(port=port, backend=backend), layout),
        ):
            pass
    assert not receiver_running(layout.root)  # the failed start left no lock behind


def test_tasks_share_one_receiver_which_stops_when_none_needs_it(tmp_path):
    root = tmp_path / "dicom"
    config = ReceiverConfig(port=free_port())
    with shared_receiver(config, root):
        [daemon] = receiver_processes(root)
        with shared_receiver(config, root):  # a second task on the host: same receiver
            assert receiver_processes(root) == [daemon]
        assert receiver_processes(root) == [daemon]  # the first task still holds its lease
        with socket.create_connection(("127.0.0.1", config.port), timeout=5):
            pass
    assert wait_for(lambda: not receiver_processes(root))
    assert not receiver_running(root)
    with shared_receiver(config, root):  # the next task starts a fresh one
        [again] = receiver_processes(root)
        assert again != daemon
    assert wait_for(lambda: not receiver_processes(root))


def test_a_killed_task_does_not_keep_the_shared_receiver_alive(tmp_path):
    root = tmp_path / "dicom"
    config = ReceiverConfig(port=free_port())
    task = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from pacsflow.core.dicom.config import ReceiverConfig; "
            "from pacsflow.core.dicom.sharing import shared_receiver\n"
            f"with shared_receiver(ReceiverConfig(port={config.port}), Path(sys.argv[1])):\n"
            "    print('ready', flush=True); time.sleep(600)",
            str(root),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert task.stdout.readline().strip() == "ready"
    assert receiver_processes(root)
    task.send_signal(signal.SIGKILL)
    task.wait()
    assert wait_for(lambda: not receiver_processes(root))


def test_runs_take_turns_on_a_series(tmp_path):
    layout = StorageLayout(tmp_path / "dicom")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from pacsflow.core.storage import StorageLayout\n"
            "with StorageLayout(Path(sys.argv[1])).series_lock('1.2.3'):\n"
            "    print('locked', flush=True); time.sleep(2)",
            str(layout.root),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert holder.stdout.readline().strip() == "locked"
    started = time.monotonic()
    with layout.series_lock("1.2.3"):
        waited = time.monotonic() - started
    holder.wait()
    assert waited > 1.0  # blocked until the other process let go
    assert not any(path.name.startswith("1.2.3") for path in layout.root.rglob("*"))  # no UID in a lock name
