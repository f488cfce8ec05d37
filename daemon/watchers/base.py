"""What every watcher is and shares: it turns arrivals into journal rows, and wakes the pipeline.

A watcher never scans or moves anything (the pipeline does). Besides recording arrivals it
keeps its own rows up to date before a scan: the local watcher settles them (stable, held
or gone), the S3 watcher records the keys it skips; in a fleet (docs/fleet.md) it holds the
SQS messages of its objects until the journal says they are done, and the lease holder
lists the prefix into the queue (watchers/fleet.py).
"""

from __future__ import annotations

import fnmatch
import os
from typing import Protocol

__all__ = ["Watcher", "is_ignored", "relative_path"]


class Watcher(Protocol):
    """Records one watch's arrivals in the journal from its own thread(s)."""

    def start(self) -> None:
        """Arm the watch (events, listing, queue) and begin recording."""
        ...

    def stop(self) -> None:
        """Stop recording; what was not recorded yet is found again by the next start."""
        ...


def relative_path(root: str, path: str) -> str | None:
    """`path` relative to `root` with `/` separators, or None if it is not strictly below it."""
    rel = os.path.relpath(path, root)
    if rel == "." or rel == ".." or rel.startswith("../") or os.path.isabs(rel):
        return None
    return rel


def is_ignored(rel_path: str, patterns: tuple[str, ...]) -> bool:
    """Whether the basename matches one of the `ignore` globs."""
    name = rel_path.rpartition("/")[2]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
