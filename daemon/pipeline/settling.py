"""The settle step: a local file is complete once its mtime and ctime are `settle_seconds` old
(docs/contract.md, "Arrival and settle"); ctime moves on every write and cannot be set by the
writer.

The watcher records each arrival with the identity it saw, due when that identity will have
settled (`Identity.settles_at`); the worker that claims the row looks once more (one `lstat`)
and, settled, scans it in the same batch. So a file costs no settle step of its own in the
daemon's process, nor a row write between its arrival and its claim (bench/RESULTS.md,
"Issue 21"). A claimed row is `scanning`; one that is not settled yet goes back to
`discovered`, due when it will be, its attempt given back.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from daemon.config import Config
from daemon.errors import UnsafePathError
from daemon.fsutil import Identity, classify
from daemon.journal import FileRow, RowChanges
from daemon.locations import Locations
from daemon.model import FileState
from daemon.naming import split_rel
from daemon.pipeline.outcome import Outcome, Outcomes
from daemon.watchers.base import RepeatFilter, errno_reason

__all__ = ["Settler", "needs_settling"]

_RETRY_S = 5.0  # a file whose lstat failed for another reason than vanishing
_MIN_WAIT_S = 0.05


def needs_settling(row: FileRow) -> bool:
    """A claimed row that was not settled yet (discovered, and taken by `Journal.claim`)."""
    return row.state is FileState.SCANNING and row.stable_at is None


class Settler:
    """Looks at a claimed local file once more: settled (scanned next), not yet, held or gone."""

    def __init__(self, config: Config, outcomes: Outcomes, clock: Callable[[], float]) -> None:
        self.config = config
        self.outcomes = outcomes
        self.clock = clock
        self._errors = RepeatFilter(60.0, clock)

    def settle(self, row: FileRow, locations: Locations) -> Outcome:
        """The row's settle step: its state stays `scanning` (with `stable_at`) when it is settled."""
        watch = self.config.watch(row.watch)
        now = self.clock()
        if not locations.source(watch.source, watch).settles:  # an S3 object appears whole
            return Outcome({"stable_at": now})
        parents, name = split_rel(row.rel_path)
        try:
            st = os.stat(name, dir_fd=locations.dirs.open(watch.source, parents), follow_symlinks=False)
        except UnsafePathError as exc:
            return self.outcomes.held(exc.reason, str(exc), row)
        except FileNotFoundError:
            return self.outcomes.gone()
        except OSError as exc:  # a parent we may not enter, the root swapped meanwhile...
            return self._later(row, now + _RETRY_S, self._failed(exc))
        if reason := classify(st):
            held = self.outcomes.held(reason, f"{row.rel_path!r} is a {reason.value}", row)
            return held.but(changes={**held.changes, "inode": st.st_ino})
        identity = Identity.of(st)
        due = identity.settles_at(watch.settle_seconds, now)
        # Unchanged since it was last seen, which made it due now at the earliest: quiet for a
        # whole settle period, whatever its times say (a clock ahead of ours).
        if due <= now or identity == row.identity:
            return Outcome({**identity.columns(), "stable_at": now})
        return self._later(row, max(due, now + _MIN_WAIT_S), None, identity)

    def _later(self, row: FileRow, due: float, event: Outcome | None,
               identity: Identity | None = None) -> Outcome:
        """Back to `discovered`, due at `due`, the claim's attempt given back."""
        changes: RowChanges = {**(identity.columns() if identity else {}),
                               "state": FileState.DISCOVERED, "owner": None,
                               "attempts": row.attempts - 1, "next_attempt_at": due}
        return Outcome(changes) if event is None else event.but(changes=changes)

    def _failed(self, exc: OSError) -> Outcome | None:
        """`file.settle_failed`, once a minute for the same error with the count held back."""
        reason = errno_reason(exc)
        if (held := self._errors.admit(f"settle {reason}")) is None:
            return None
        return Outcome({}, "file.settle_failed", {"reason": reason, "error": exc.strerror, "repeated": held})
