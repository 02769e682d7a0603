"""One receiver per data root, shared by every retrieval task of a host.

The PACS knows one move destination (AE title -> host:port), so parallel retrieval tasks on a host cannot each
start a receiver. Three file locks in the layout root make sharing safe by construction (``flock`` locks die
with their process, so a killed task or receiver never leaves a lock behind):

- ``.receiver.lock``: held exclusively by the running receiver, whatever started it. A second receiver on the
  same root refuses to start, so no receiver ever sweeps another one's in-flight files.
- ``.receiver-lease``: every task that needs the receiver holds it shared. The receiver process started for
  the tasks (``receiver_mode: shared``) stops once it can take the lease exclusively, that is when no task
  needs it any more; while it stops it holds the lease, so a new task waits and then starts a fresh one.
- ``.receiver-start``: serialises "is a receiver running? if not, start one".
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from pacsflow.core.dicom.config import ReceiverConfig
from pacsflow.core.dicom.errors import PacsConfigurationError

RECEIVER_LOCK = ".receiver.lock"
LEASE = ".receiver-lease"
START_LOCK = ".receiver-start"
LOG_NAME = ".receiver.log"
READY_SECONDS = 60.0
# ``receiver_running`` probes by taking the receiver lock for an instant (flock has no test-only call): a
# receiver starting during a probe waits this long before it concludes that another receiver holds the lock.
PROBE_GRACE_SECONDS = 0.5


class ReceiverUnavailable(PacsConfigurationError):
    """No receiver can serve this task; the message names the setting to change."""


def _open_lock(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+b")


@contextmanager
def receiver_lock(root: Path) -> Iterator[None]:
    """Held for a receiver's whole life on ``root``; refuses a second receiver on the same root."""
    handle = _open_lock(root / RECEIVER_LOCK)
    try:
        if not _lock_exclusively(handle, wait_seconds=PROBE_GRACE_SECONDS):
            raise ReceiverUnavailable(
                "another pacsflow receiver is already running on this data root; with several retrieval tasks "
                "at once use receiver_mode 'shared' (the default) or 'service' in the dicom connection"
            )
        yield
    finally:
        handle.close()


def _lock_exclusively(handle: IO[bytes], *, wait_seconds: float = 0.0) -> bool:
    """Take ``handle``'s lock exclusively, trying for up to ``wait_seconds``; False if another holds it."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def port_unavailable(config: ReceiverConfig, error: OSError) -> ReceiverUnavailable:
    return ReceiverUnavailable(
        f"the receiver cannot listen on receiver_host {config.host} receiver_port "
        f"{config.port}: {error.strerror}; free the port or change the setting"
    )


def receiver_running(root: Path) -> bool:
    handle = _open_lock(root / RECEIVER_LOCK)
    try:
        return not _lock_exclusively(handle)
    finally:
        handle.close()


@contextmanager
def receiver_lease(root: Path) -> Iterator[IO[bytes]]:
    """A task's claim on the shared receiver (blocks while a previous receiver is stopping)."""
    handle = _open_lock(root / LEASE)
    try:
        fcntl.flock(handle, fcntl.LOCK_SH)
        yield handle
    finally:
        handle.close()


def idle(lease_path: Path) -> IO[bytes] | None:
    """For the shared receiver: the lease held exclusively (keep it open until the process exits) when no
    task holds it, else None."""
    handle = _open_lock(lease_path)
    if _lock_exclusively(handle):
        return handle
    handle.close()
    return None


@contextmanager
def shared_receiver(config: ReceiverConfig, root: Path) -> Iterator[None]:
    """Use the host's receiver for ``root``, starting it first if none is running; it stops by itself once no
    task holds a lease."""
    with receiver_lease(root):
        start = _open_lock(root / START_LOCK)
        try:
            fcntl.flock(start, fcntl.LOCK_EX)
            if not receiver_running(root):
                _start(config, root)
        finally:
            start.close()
        yield


def service_arguments(config: ReceiverConfig) -> list[str]:
    """The receiver service's command-line options for ``config`` (see ``python -m pacsflow.core.dicom``)."""
    args = [
        "--ae-title",
        config.ae_title,
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--max-associations",
        str(config.max_associations),
        "--backend",
        config.backend,
        "--acse-timeout",
        str(config.acse_timeout),
        "--dimse-timeout",
        str(config.dimse_timeout),
        "--network-timeout",
        str(config.network_timeout),
        "--max-pdu",
        str(config.max_pdu),
        "--max-inflated-bytes",
        str(config.max_inflated_bytes),
    ]
    for syntax in config.transfer_syntaxes:
        args += ["--transfer-syntax", syntax]
    for ae in config.allowed_calling_aes:
        args += ["--allow-ae", ae]
    for address in config.allowed_addresses:
        args += ["--allow-address", address]
    if config.tls is not None:
        args += [
            "--tls-ca",
            config.tls.ca_file,
            "--tls-cert",
            config.tls.cert_file or "",
            "--tls-key",
            config.tls.key_file or "",
        ]
    return args


def _start(config: ReceiverConfig, root: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "pacsflow.core.dicom",
        "--root",
        str(root),
        "--stop-when-idle",
        *service_arguments(config),
    ]
    log_path = root / LOG_NAME
    with os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
        # Its own session: it outlives the task that started it and is not killed with the task's group.
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True
        )
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ReceiverUnavailable(
                f"the shared receiver exited at start (code {process.returncode}); check receiver_port "
                f"{config.port} is free and see {log_path}"
            )
        if receiver_running(root) and _accepts(config):
            return
        time.sleep(0.1)
    process.kill()
    raise ReceiverUnavailable(
        f"the shared receiver did not start listening on receiver_port {config.port} "
        f"within {READY_SECONDS:.0f} s; see {log_path}"
    )


def _accepts(config: ReceiverConfig) -> bool:
    host = "127.0.0.1" if config.host in ("0.0.0.0", "") else "::1" if config.host == "::" else config.host
    try:
        with socket.create_connection((host, config.port), timeout=1.0):
            return True
    except OSError:
        return False
