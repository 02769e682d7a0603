"""Bounded retries with exponential backoff for transient PACS failures, inside one task attempt."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pacsflow.core.dicom.errors import PacsTransientError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    first_delay: float = 1.0
    multiplier: float = 2.0

    def call(self, operation: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
        """Run ``operation``; on a transient PACS error wait and try again, re-raising the last failure."""
        delay = self.first_delay
        for attempt in range(1, self.attempts + 1):
            try:
                return operation()
            except PacsTransientError:
                if attempt == self.attempts:
                    raise
                sleep(delay)
                delay *= self.multiplier
        raise AssertionError("unreachable")
