"""Progress of a long command on stderr: a bar on a terminal, else one JSON line per 1 000 files."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import TextIO

__all__ = ["Progress"]

_EVERY_FILES = 1000
_BAR_EVERY_S = 0.1
_BAR_WIDTH = 30


class Progress:
    """Reports `done` of `total` with counts; `event` names the JSON lines (`rescan.progress`)."""

    def __init__(self, stream: TextIO, event: str, fields: Mapping[str, object], total: int) -> None:
        self._stream = stream
        self._event = event
        self._fields = dict(fields)
        self._total = total
        self._is_tty = stream.isatty()
        self._drawn_at = 0.0

    def update(self, done: int, counts: Mapping[str, int]) -> None:
        """Report after one more file (a JSON line only at each 1 000th)."""
        if self._is_tty:
            if time.monotonic() - self._drawn_at >= _BAR_EVERY_S or done == self._total:
                self._bar(done, counts)
        elif done % _EVERY_FILES == 0:
            self._line(self._event, done, counts)

    def finish(self, done: int, counts: Mapping[str, int]) -> None:
        """The last report: the bar completed, or a `<event>` line with `finished: true`."""
        if self._is_tty:
            self._bar(done, counts)
            self._stream.write("\n")
            self._stream.flush()
        else:
            self._line(self._event, done, counts, finished=True)

    def _bar(self, done: int, counts: Mapping[str, int]) -> None:
        filled = _BAR_WIDTH * done // self._total if self._total else _BAR_WIDTH
        tallies = " ".join(f"{name} {count}" for name, count in counts.items())
        self._stream.write(f"\r[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {done}/{self._total} {tallies}")
        self._stream.flush()
        self._drawn_at = time.monotonic()

    def _line(self, event: str, done: int, counts: Mapping[str, int], *, finished: bool = False) -> None:
        line = {"event": event, **self._fields, "done": done, "total": self._total, **counts,
                "finished": finished}
        self._stream.write(json.dumps(line) + "\n")
        self._stream.flush()
