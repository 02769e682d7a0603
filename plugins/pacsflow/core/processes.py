"""Stopping the child processes pacsflow starts (DCMTK storescp, sandbox PACS)."""

from __future__ import annotations

import subprocess


def stop_process(process: subprocess.Popen[bytes], *, grace: float = 0.0, timeout: float = 20.0) -> None:
    """Let ``process`` end on its own for ``grace`` seconds, then SIGTERM it, then SIGKILL after ``timeout``."""
    try:
        process.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
