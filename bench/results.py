"""Shared by every benchmark: merge one measured entry into ``bench/results.json`` by name, atomically."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

RESULTS_PATH = Path(__file__).resolve().with_name("results.json")


def record(
    name: str, unit: str, pacsflow: float, reference: float, *, results_path: Path = RESULTS_PATH, **extra: Any
) -> dict[str, Any]:
    """Store ``{"name", "unit", "pacsflow", "reference", "ratio", **extra}``, replacing the entry of that name.

    ``ratio`` is pacsflow / reference (higher is better for rates; say so in ``unit`` when lower is better).
    The file is rewritten through a temp file and ``os.replace``, so a reader never sees half of it.
    """
    entry: dict[str, Any] = {
        "name": name,
        "unit": unit,
        "pacsflow": pacsflow,
        "reference": reference,
        "ratio": round(pacsflow / reference, 3) if reference else None,
        **extra,
    }
    results_path.parent.mkdir(parents=True, exist_ok=True)
    # The lock serialises read-modify-write between benchmarks running at the same time. It lives in the
    # temp directory (keyed by the results path) so that no lock file lands in the repository.
    with open(_lock_path(results_path), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = [existing for existing in _load(results_path) if existing.get("name") != name]
        entries.append(entry)
        entries.sort(key=lambda existing: str(existing.get("name")))
        _write_atomically(results_path, json.dumps(entries, indent=2) + "\n")
    return entry


def _lock_path(results_path: Path) -> Path:
    key = hashlib.sha256(str(results_path.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"pacsflow-bench-results-{key}.lock"


def _load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    loaded = json.loads(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, list) else []


def _write_atomically(path: Path, text: str) -> None:
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
