"""The child processes pacsflow starts: stopping them (DCMTK storescp, sandbox PACS) and starting worker pools."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import threading


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


def worker_context() -> multiprocessing.context.BaseContext:
    """fork while this process has a single thread (workers start in ms, not the ~0.2 s of a new
    interpreter); forkserver otherwise, as forking a multi-threaded process can deadlock the child."""
    if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver")


def default_workers(workers: int | None) -> int:
    """``workers``, else one per core; 1 inside a daemonic process (an Airflow task under Celery's prefork
    pool), which may not start children."""
    if workers is not None:
        return workers
    return 1 if multiprocessing.current_process().daemon else os.cpu_count() or 1
