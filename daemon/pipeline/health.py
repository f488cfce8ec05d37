"""Each engine's health as the scanners see it: the one owner of the engines' down-map.

The pipeline makes one `EngineHealth` and hands it to both scanners (one engine, several);
it journals an engine going down or coming back, only the changes, for `status`, the
metrics and the readiness check (docs/operations.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

from daemon.journal import Journal

__all__ = ["EngineHealth"]

log = structlog.get_logger("scanwatch.pipeline")


class EngineHealth:
    """Which engines are down, read from and written to the journal; thread-safe."""

    def __init__(self, journal: Journal, clock: Callable[[], float]) -> None:
        self._journal = journal
        self._clock = clock
        self._lock = threading.Lock()
        self._down: dict[str, bool] = {}

    def load(self) -> None:
        """Take the engines' health as the journal has it (the start-up probe's view)."""
        health = self._journal.engine_health()
        with self._lock:
            self._down = {name: not healthy for name, (healthy, _, _) in health.items()}

    def set(self, name: str, error: str | None) -> None:
        """Journal engine `name` going down (`error`: why) or coming back (None), if it did."""
        is_down = error is not None
        with self._lock:
            if self._down.get(name, False) == is_down:
                return
            self._down[name] = is_down
            self._journal.set_engine_health(name, not is_down, error or "answering", self._clock())
        if is_down:
            log.warning("engine.unhealthy", engine=name, error=error)
        else:
            log.info("engine.recovered", engine=name)
