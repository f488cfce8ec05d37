"""Pause points for the adversarial tests: hold the daemon at one named step, once.

Used only by tests, and inert unless `SCANWATCH_PAUSE_AT` is set (a comma-separated
list of point names) together with `SCANWATCH_PAUSE_DIR`. When a listed point is
reached the first time, `<dir>/<point>.reached` is created and the thread waits until
the test creates `<dir>/<point>.go` (at most `_MAX_WAIT_S`), so a test can race the
daemon at exactly that step: swap a file, make a hardlink, or SIGKILL the process.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

__all__ = ["pause"]

_MAX_WAIT_S = 60.0
# Read once: the tests set it in the environment the daemon starts with (asked per file).
_WANTED = frozenset(os.environ.get("SCANWATCH_PAUSE_AT", "").split(",")) - {""}
_passed: set[str] = set()
_lock = threading.Lock()


def pause(point: str) -> None:
    """Wait at `point` the first time it is reached, if the environment asks for it."""
    if point not in _WANTED:
        return
    with _lock:
        if point in _passed:
            return
        _passed.add(point)
    folder = Path(os.environ["SCANWATCH_PAUSE_DIR"])
    (folder / f"{point}.reached").touch()
    deadline = time.monotonic() + _MAX_WAIT_S
    while not (folder / f"{point}.go").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
