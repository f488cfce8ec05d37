"""What every watcher is and shares: it turns arrivals into journal rows, and wakes the pipeline.

A watcher never scans or moves anything (the pipeline does). Besides recording arrivals it
keeps its own rows up to date before a scan: the local watcher settles them (stable, held
or gone), the S3 watcher records the keys it skips; in a fleet (docs/fleet.md) it holds the
SQS messages of its objects until the journal says they are done, and the lease holder
lists the prefix into the queue (watchers/fleet.py).
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from daemon.log import info_each

__all__ = ["RepeatFilter", "Watcher", "errno_reason", "is_ignored", "log_discovered", "relative_path"]

log = structlog.get_logger("scanwatch.watcher")


class Watcher(Protocol):
    """Records one watch's arrivals in the journal from its own thread(s)."""

    def start(self) -> None:
        """Arm the watch (events, listing, queue) and begin recording."""
        ...

    def stop(self) -> None:
        """Stop recording; what was not recorded yet is found again by the next start."""
        ...


def log_discovered(watch: str, rel_paths: Sequence[str], how: str) -> None:
    """One `file.discovered` per path the journal recorded (docs/contract.md, "Log events"),
    with how it was found (`event`, `sweep`, `listing`)."""
    info_each(log, "file.discovered", "rel_path", rel_paths, watch=watch, by=how)


def relative_path(root: str, path: str) -> str | None:
    """`path` relative to `root` with `/` separators, or None if it is not strictly below it."""
    prefix = _prefix(root)
    if prefix is not None and path.startswith(prefix) and not _NOT_PLAIN.search(path[len(prefix):]):
        return path[len(prefix):]  # an event's path: the root as given, then names (most arrivals)
    rel = os.path.relpath(path, root)
    if rel == "." or rel == ".." or rel.startswith("../") or os.path.isabs(rel):
        return None
    return rel


# A component that is empty, `.` or `..`: the path needs normalizing (`os.path.relpath`).
_NOT_PLAIN = re.compile(r"(?:^|/)\.{0,2}(?:/|$)")


@functools.lru_cache(maxsize=64)
def _prefix(root: str) -> str | None:
    """`root/`, where a path that starts with it and then has only names is below it as written
    (an absolute root, already normal); None for another root."""
    if not os.path.isabs(root) or os.path.normpath(root) != (root.rstrip("/") or "/"):
        return None
    return root.rstrip("/") + "/"


def is_ignored(rel_path: str, patterns: tuple[str, ...]) -> bool:
    """Whether the basename matches one of the `ignore` globs (case-sensitive, as `fnmatchcase`)."""
    pattern = _globs(patterns)
    return pattern is not None and pattern.match(rel_path.rpartition("/")[2]) is not None


@functools.lru_cache(maxsize=64)
def _globs(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One expression for a watch's `ignore` globs: asked for every arrival (one match, not one per glob)."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def errno_reason(exc: OSError) -> str:
    """An OSError's reason code as logged: its errno's name in lower case (`enoent`)."""
    return errno.errorcode.get(exc.errno or 0, "unknown").lower()


class RepeatFilter:
    """Lets the first of a run of identical events through at once, then one per interval.

    `admit(key)` returns None to hold an event back, or how many were held back
    since the last one let through. Not thread-safe.
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._seen: dict[str, tuple[float, int]] = {}

    def admit(self, key: str) -> int | None:
        """None to hold this occurrence back, else the count held back before it."""
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self._interval_s:
            self._seen[key] = (last[0], last[1] + 1)
            return None
        self._seen[key] = (now, 0)
        return 0 if last is None else last[1]
