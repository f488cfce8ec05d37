"""Retry policy: a frozen value that computes the next delay; the journal keeps the schedule."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, capped; `Retry-After` honoured up to a cap."""

    base_s: float = 1.0
    max_s: float = 300.0
    max_retry_after_s: float = 900.0

    def delay(self, attempt: int, retry_after_s: float | None = None,
              rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before attempt `attempt + 1` (attempt counts from 1)."""
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.max_retry_after_s)
        ceiling = min(self.max_s, self.base_s * 2 ** min(max(attempt - 1, 0), 32))
        return float(rand() * ceiling)
