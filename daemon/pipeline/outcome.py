"""What one step did to a row: the typed journal change, and the event that says so.

Every way a step can end (retry, wait, held, gone, changed, a verdict, placed, a failed
move, a name taken meanwhile) is built here once, so the journal, the log and the metrics
read the same facts. The pipeline's loop writes them (docs/architecture.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from daemon.errors import EngineRetryableError
from daemon.journal import FileRow, KeptVerdict, RowChanges
from daemon.model import FileState, Reason, Verdict, VerdictKind, replaced
from daemon.retry import RetryPolicy

log = structlog.get_logger("scanwatch.pipeline")

__all__ = ["Outcome", "Outcomes", "Tally"]


@dataclass(frozen=True)
class Outcome:
    """The journal change of one step, and the event to log (with its fields), if any."""

    changes: RowChanges
    event: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    # Several engines on one watch: what each engine's call came to (for its metrics).
    engine_events: tuple[tuple[str, Outcome], ...] = ()
    # `(rel_path, inode)` of files put back into the source as new arrivals (docs/integrity.md).
    arrivals: tuple[tuple[str, int], ...] = ()
    # The engine's verdict for the cache, kept in the transaction that commits this change.
    kept: KeptVerdict | None = None
    # A verdict whose destination the pipeline's loop plans before it writes the change
    # (daemon/pipeline/planning.py): the plan is journaled with the verdict, before any move.
    needs_plan: bool = False

    def but(self, **changes: Any) -> Outcome:
        """This outcome with `changes` (a step does this per file)."""
        return replaced(self, changes)

    @property
    def state(self) -> FileState | None:
        """The state the step moves the row to (None: unchanged)."""
        return self.changes.get("state")


# A failed verdict for one of these reasons is an engine that could not scan; other reasons
# are about the file (unreadable, unsafe path) or a verdict (suspicious), not engine errors.
_ENGINE_ERROR_REASONS = frozenset({Reason.TOO_LARGE, Reason.TIMEOUT, Reason.ENCRYPTED, Reason.ENGINE_ERROR,
                                   Reason.ENGINE_FAILED, Reason.ENGINE_UNAVAILABLE, Reason.AUTH,
                                   Reason.BAD_REQUEST, Reason.RATE_LIMITED})


@dataclass
class Tally:
    """What the daemon's metrics and alerts hear of a batch's steps: the counts they add
    (`Metrics` counters by attribute name, and labels), summed where the steps ran; each
    file's seconds from discovery to destination, by engine; and the steps that may be
    notified, with their whole row (`daemon/alerts.py`).

    A worker process sends a batch's tally to the daemon in one frame (daemon/workers/
    process.py): the daemon adds a few sums, where counting each step cost its process
    ~3 µs, serial work for every worker's files (bench/RESULTS.md, "Issue 21").
    """

    counts: dict[tuple[str, tuple[str, ...]], float] = field(default_factory=dict)
    durations: list[tuple[str, float]] = field(default_factory=list)
    notable: list[tuple[FileRow, str, Mapping[str, Any]]] = field(default_factory=list)

    @classmethod
    def of(cls, steps: Iterable[tuple[FileRow, str, Outcome]]) -> Tally:
        """The tally of steps `(row before the step, engine label, outcome)`; a step that
        cannot be counted is logged, and skips no other."""
        tally = cls()
        for row, engine, outcome in steps:
            try:
                tally.add(row, engine, outcome)
            except Exception:
                log.exception("outcome.unobserved", step=outcome.event, file_id=row.id)
        return tally

    def add(self, row: FileRow, engine: str, outcome: Outcome) -> None:
        event, fields, watch = outcome.event, outcome.fields, row.watch
        self._scan(watch, engine, fields)
        reason = str(fields.get("reason") or "")
        if event == "file.moved":
            if fields.get("already_placed"):
                self._count("already_placed", watch)
            self._count("files", watch, str(fields["outcome"]), reason)
            self._count("bytes_scanned", engine, amount=row.size or 0)
            self.durations.append((engine, max(0.0, time.time() - row.discovered_at)))
            if row.verdict != VerdictKind.CLEAN:
                self.notable.append((row, event, fields))
        elif event == "file.skipped":
            self._count("files", watch, "skipped", reason)
            self.notable.append((row, event, fields))
        elif event == "move.failed":
            self._count("moves_failed", watch)
        elif event == "retry.scheduled":
            self._count("retries", engine, reason or Reason.ENGINE_ERROR)
            self._count("engine_errors", engine, reason or Reason.ENGINE_ERROR)

    def _scan(self, watch: str, engine: str, fields: Mapping[str, Any]) -> None:
        """What any step's fields say about the engine: cache lookups, resubmissions, errors."""
        if (cache := fields.get("cache")) in ("hit", "miss"):
            self._count("cache", engine, str(cache))
        if fields.get("resubmitted"):
            self._count("resubmissions", watch, engine)
        reason = str(fields.get("reason") or "")
        if fields.get("verdict") == VerdictKind.FAILED and reason in _ENGINE_ERROR_REASONS:
            self._count("engine_errors", engine, reason)

    def _count(self, counter: str, *labels: str, amount: float = 1) -> None:
        key = (counter, labels)
        self.counts[key] = self.counts.get(key, 0) + amount


class Outcomes:
    """Builds the outcomes of steps on the pipeline's clock and retry policy."""

    def __init__(self, clock: Callable[[], float], policy: RetryPolicy) -> None:
        self.clock = clock
        self.policy = policy

    def retry(self, row: FileRow, exc: EngineRetryableError, *, delay_s: float | None = None) -> Outcome:
        """Scan again later, spending an attempt (after `delay_s`, else the policy's delay)."""
        if delay_s is None:
            delay_s = self.policy.delay(row.attempts, exc.retry_after_s)
        return Outcome(
            {"state": FileState.STABLE, "owner": None, "last_error": str(exc),
             "next_attempt_at": self.clock() + delay_s},
            "retry.scheduled", {"reason": exc.reason.value, "error": str(exc),
                                "attempts": row.attempts, "delay_s": round(delay_s, 3)})

    def wait(self, row: FileRow, reason: str, exc: Exception, retry_after_s: float | None = None,
             *, unsent: bool = False, delay_s: float | None = None) -> Outcome:
        """Try again later without spending an attempt: what is missing is not the file's fault.

        `unsent`: the engine was not reached, so a submission marked in doubt did not happen.
        """
        if delay_s is None:
            delay_s = self.policy.delay(row.attempts, retry_after_s)
        changes: RowChanges = {"state": FileState.STABLE, "owner": None, "last_error": str(exc),
                               "attempts": row.attempts - 1, "next_attempt_at": self.clock() + delay_s}
        if unsent:
            changes["submitting_at"] = None
        return Outcome(changes, "retry.scheduled",
                       {"reason": reason, "error": str(exc), "delay_s": round(delay_s, 3)})

    def held(self, reason: str, detail: str, row: FileRow | None = None) -> Outcome:
        """Left where it is on purpose (a symlink, a hardlink, a special file, a folder the
        daemon may not write); reported once: not again when `row` was held for it before."""
        again = row is not None and row.reason == reason
        return Outcome({"state": FileState.HELD, "reason": reason, "owner": None,
                        "done_at": self.clock()}, None if again else "file.skipped",
                       {"reason": reason, "detail": detail})

    def gone(self) -> Outcome:
        """Vanished from the source before it could be moved."""
        return Outcome({"state": FileState.GONE, "owner": None, "done_at": self.clock()},
                       "file.vanished")

    def changed(self, detail: str, *, settles: bool) -> Outcome:
        """Not the bytes that were scanned: scan it anew (`settles`: wait for it to settle first)."""
        waits: RowChanges = ({"state": FileState.DISCOVERED, "stable_at": None} if settles
                             else {"state": FileState.STABLE})
        return Outcome({**waits, "owner": None,
                        "verdict": None, "reason": None, "destination": None, "size": None,
                        "etag": None, "version_id": None, "next_attempt_at": self.clock(),
                        # A pending remote scan was of the old bytes: never follow it.
                        "engine_scan_id": None, "sha256": None, "ref_id": None,
                        "submitting_at": None, "dest_root": None, "dest_rel": None},
                       "file.changed", {"detail": detail})

    def verdict(self, row: FileRow, verdict: Verdict) -> RowChanges:
        """The change a verdict makes (the destination is planned on top of it)."""
        return {
            "state": FileState.MOVING, "verdict": verdict.kind, "reason": verdict.reason,
            "threats": list(verdict.threats), "raw_result": verdict.raw or None,
            "engine_scan_id": verdict.engine_scan_id or row.engine_scan_id,
            "submitting_at": None, "scanned_at": self.clock()}

    def failed(self, row: FileRow, reason: Reason, error: str) -> Outcome:
        """A failed verdict without asking the engine (unreadable, an unsafe name...), to plan."""
        return Outcome(self.verdict(row, Verdict.failed(reason, raw={"error": error})), needs_plan=True)

    def replanned(self, destination: str, dest_rel: str) -> Outcome:
        """The planned name was taken meanwhile: the next free one, journaled before the move
        to it is tried (by the next claim of the row, `moving` and due at once)."""
        return Outcome({"state": FileState.MOVING, "destination": destination, "dest_rel": dest_rel,
                        "owner": None, "next_attempt_at": self.clock()})

    def placed(self, row: FileRow, destination: str, verdict: VerdictKind, *,
               already_placed: bool = False) -> Outcome:
        """In its destination: done (`already_placed`: by another daemon of a fleet)."""
        now = self.clock()
        fields = {"outcome": verdict.value, "reason": row.reason, "threats": row.threats or [],
                  "destination": destination, "attempts": row.attempts, "sha256": row.sha256,
                  "size": row.size, "duration_s": round(now - row.discovered_at, 4)}
        return Outcome(
            {"state": FileState.DONE, "destination": destination, "owner": None, "done_at": now,
             "last_error": None},
            "file.moved", {**fields, "already_placed": True} if already_placed else fields)

    def move_failed(self, row: FileRow, exc: BaseException, changes: RowChanges | None = None,
                    attempts: int | None = None) -> Outcome:
        """Leave the file where it is and try the move again later."""
        attempts = row.move_attempts + 1 if attempts is None else attempts
        delay_s = self.policy.delay(attempts)
        return Outcome(
            {"state": FileState.VERDICT, **(changes or {}), "owner": None,
             "move_attempts": attempts, "last_error": str(exc),
             "next_attempt_at": self.clock() + delay_s},
            "move.failed", {"error": str(exc), "move_attempts": attempts,
                            "delay_s": round(delay_s, 3)})
