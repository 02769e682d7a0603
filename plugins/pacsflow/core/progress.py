"""Progress lines for long stages: n/N, rate, MB/s, elapsed and ETA, at most every few seconds (counts only)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

log = logging.getLogger("pacsflow")
EVERY_SECONDS = 10.0


class Progress:
    """Counts units of work (``total`` of them) and logs where a stage is, so a multi-hour task never looks hung."""

    def __init__(self, stage: str, total: int, unit: str, *, every: float = EVERY_SECONDS) -> None:
        self.stage, self.total, self.unit, self.every = stage, total, unit, every
        self.done = 0
        self.bytes = 0
        self.started = self.last = time.monotonic()

    def advance(self, *, units: int = 1, size: int = 0, detail: Mapping[str, Any] | str | None = None) -> None:
        self.done += units
        self.bytes += size
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            log.info("%s", self.line(detail))

    def line(self, detail: Mapping[str, Any] | str | None = None) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.stage}: {self.done}/{self.total} {self.unit}"]
        if self.bytes:
            parts.append(f"{_megabytes(self.bytes)} at {_megabytes(self.bytes / max(elapsed, 1e-9))}/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if 0 < self.done < self.total and rate > 0:
            parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        if detail:
            text = detail if isinstance(detail, str) else ", ".join(f"{k} {v}" for k, v in sorted(detail.items()))
            parts.append(f"({text})")
        return ", ".join(parts)


def _megabytes(size: float) -> str:
    return f"{size / 1e6:.{1 if size >= 1e7 else 2}f} MB"


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))
