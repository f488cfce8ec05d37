"""The pipeline: claims due journal rows, has them scanned, then moved.

Each engine has `concurrency` worker threads (at least `_S3_WORKERS` when its watches
read or write S3, with its calls still held to `concurrency` at once: those threads
mostly wait on S3 requests, not on the engine). A worker claims a small batch of due rows,
or records as its own the arrivals a watcher handed over (`intake.Intake`), and carries
it one step per journal transaction: scanned (`scanning.Scanner`, a local file
settled first if it was not: `settling.Settler`; the verdict, with the destination
`planning.Planner` chose for it, written before any move), then moved (`moving.Mover`: done).
Each step returns an `Outcome`, which this loop writes (the scanners' order-critical
writes aside: `answers.ScanStep.journal_at_once`).
Retries are schedules in the journal, never sleeps. Nothing here is lost with the
process: the backlog is the journal, and `Journal.reclaim` hands a dead worker's rows to
the next one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import structlog

from daemon.config import Config, WatchConfig
from daemon.engines.base import Engine
from daemon.fsutil import DirCache
from daemon.handoff import Handoff
from daemon.journal import FileRow, Journal, RowChanges
from daemon.locations import Locations, Place
from daemon.log import enabled, file_context
from daemon.model import FileState, Reason, Verdict, VerdictKind
from daemon.pipeline.gate import SendingGate, gate
from daemon.pipeline.health import EngineHealth
from daemon.pipeline.inflight import IN_FLIGHT, Flight, Window
from daemon.pipeline.intake import Intake
from daemon.pipeline.moving import Mover
from daemon.pipeline.outcome import Outcome, Outcomes
from daemon.pipeline.planning import Planner
from daemon.pipeline.reconcile import reconcile
from daemon.pipeline.scanning import Asking, Scanner
from daemon.pipeline.settling import Settler, needs_settling
from daemon.retry import RetryPolicy
from daemon.s3client import S3Clients
from daemon.s3url import is_s3
from daemon.slots import EngineSlots
from daemon.staging import StagingDirs

__all__ = ["Outcome", "Pipeline", "Reported", "uses_s3"]

log = structlog.get_logger("scanwatch.pipeline")

_BATCH = 16  # rows claimed at once; handed arrivals: daemon/pipeline/intake.py
# Workers per engine whose watches touch S3: an object costs 3-4 requests of a network
# round trip each (docs/operations.md, "Throughput"), so I/O, not CPU, sets the pace.
# daemon/s3.py pools 64 connections per client: two such engines on one endpoint fit.
_S3_WORKERS = 32
_IDLE_WAIT_S = 1.0
# docs/contract.md, "Log events"
_WARNINGS = ("retry.scheduled", "move.failed", "file.skipped", "file.settle_failed")
# A step's result: its outcome or, for a scan, possibly its step stopped at the engine call.
_Step = TypeVar("_Step", Outcome, Outcome | Asking)
# One step's outcome as the metrics and alerts hear it: the row before, the engine's label.
Reported = tuple[FileRow, str, Outcome]


class Pipeline:
    """Worker threads that carry claimed rows to their destination."""

    def __init__(self, config: Config, journal: Journal, engines: Mapping[str, Engine], *,
                 owner: str, wake: threading.Event | None = None,
                 clock: Callable[[], float] = time.time,
                 policy: RetryPolicy | None = None,
                 on_outcomes: Callable[[list[Reported]], None] | None = None,
                 s3: S3Clients | None = None, places: Mapping[str, Place] | None = None,
                 handoff: Handoff | None = None) -> None:
        """`on_outcomes` hears a batch's outcomes at once (a worker process sends them to the
        daemon in one frame: daemon/workers/process.py); `handoff`: where the watchers hand
        arrivals to be taken before the journal's due rows (daemon/handoff.py)."""
        self.config = config
        self.journal = journal
        self.owner = owner
        self.wake = wake or threading.Event()
        self.clock = clock
        self._on_outcomes = on_outcomes
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.heartbeat_at = clock()
        self.s3 = s3 or S3Clients()
        self._places = places  # Locations given from outside by URL (tests' fakes)
        self.handoff = handoff
        self._intake = Intake(config, journal, owner, self.wake)
        self.staging = StagingDirs(config.state_dir)  # held open for the process's life
        outcomes = Outcomes(clock, policy or RetryPolicy())
        self.planner = Planner(config, outcomes)
        self.mover = Mover(config, outcomes)
        self.settler = Settler(config, outcomes, clock)
        self._engines = engines
        self.scanner = Scanner(config, journal, self._bounded(engines), outcomes,
                               EngineHealth(journal, clock))
        self._senders = self._sending()

    @property
    def engines(self) -> Mapping[str, Engine]:
        """The engines by configured name."""
        return self._engines

    @engines.setter
    def engines(self, engines: Mapping[str, Engine]) -> None:
        self._engines = engines
        self.scanner.engines = self._bounded(engines)
        self._senders = self._sending()

    def _workers(self, engine: str) -> int:
        """Worker threads of an engine: its `concurrency`, more for S3 I/O.

        With several worker processes, which share `concurrency` (daemon/slots.py), each has
        its share of the threads: a thread that waits for its process's GIL (held by a sibling
        thread for up to the switch interval) while it holds the journal's writers' lock
        stalls every process (bench/RESULTS.md, "Issue 21").
        """
        concurrency = self.config.engines[engine].concurrency
        if any(uses_s3(w) for w in self.config.watches if engine in w.engines):
            return max(concurrency, _S3_WORKERS)
        # A thread of an engine that takes several scans at once has up to IN_FLIGHT of them
        # in flight (daemon/pipeline/inflight.py): fewer threads fill its `concurrency`.
        per_thread = IN_FLIGHT if isinstance(self.scanner.engines.get(engine), SendingGate) else 1
        return -(-concurrency // (self.config.worker_count() * per_thread))

    def _bounded(self, engines: Mapping[str, Engine]) -> Mapping[str, Engine]:
        """The engines, each behind its one gate (daemon/pipeline/gate.py): at most
        `concurrency` calls at once, with several worker processes (`workers` > 1) by slot
        files under state_dir that every process shares (daemon/slots.py)."""
        shared = self.config.worker_count() > 1
        return {name: gate(engine, self.config.engines[name].concurrency,
                           self._slots_of(name) if shared else None)
                if name in self.config.engines else engine for name, engine in engines.items()}

    def _slots_of(self, name: str) -> EngineSlots:
        return EngineSlots(self.config.state_dir / "slots", name, self.config.engines[name].concurrency)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Reconcile the staging directories, start `concurrency` workers per engine with watches."""
        reconcile(self.config, self.journal, self.staging, self.clock())
        self.scanner.start()
        for name in self.config.engines:
            watches = [w.name for w in self.config.watches if name in w.engines]
            if not watches:
                continue
            for i in range(self._workers(name)):
                thread = threading.Thread(target=self._work, args=(watches,),
                                          name=f"scan-{name}-{i}", daemon=True)
                thread.start()
                self._threads.append(thread)

    def tick(self) -> bool:
        """Looked after between signals by the service: worker threads need nothing (a
        `WorkerPool` starts again its dead processes here); whether one died."""
        return False

    def stop(self, timeout_s: float) -> bool:
        """Stop claiming, wait for in-flight batches; hand back what is unfinished."""
        self._stopping.set()
        self.wake.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        drained = not any(t.is_alive() for t in self._threads)
        if drained:
            self.journal.release(self.owner)
            self.staging.close()
        return drained

    def is_alive(self) -> bool:
        """Workers run and turn over: each engine call is bounded by its timeout."""
        stall_s = max(e.timeout for e in self.config.engines.values()) + 30
        return (all(t.is_alive() for t in self._threads)
                and self.clock() - self.heartbeat_at < stall_s)

    def _work(self, watches: list[str]) -> None:
        while not self._stopping.is_set():
            self.heartbeat_at = self.clock()
            try:
                if self.run_once(watches):
                    continue
                next_due = self.journal.next_due_at(watches)
            except Exception:
                log.exception("worker.error", watches=watches)
                next_due = None
            wait_s = _IDLE_WAIT_S if next_due is None else next_due - self.clock()
            if self.wake.wait(min(max(wait_s, 0.0), _IDLE_WAIT_S)):
                self.wake.clear()

    def run_once(self, watches: list[str]) -> int:
        """Take a batch of handed arrivals, or claim one of due rows (both, when rows are due
        while arrivals keep coming), and carry it as far as it goes; returns its size."""
        now = self.clock()
        rows = self._intake.take(self.handoff, watches, now) if self.handoff else []
        if not rows or ((due := self.journal.next_due_at(watches)) is not None and due <= now):
            rows += self.journal.claim(watches, self.owner, now, _BATCH)
        if rows:
            self.process(rows)
        return len(rows)

    # -- one batch ------------------------------------------------------------------------------

    def process(self, rows: list[FileRow]) -> None:
        """Carry claimed rows one step per transaction: scanned, then moved."""
        try:
            # Destination folders are fsynced once per batch, before the commit that says
            # their files are there (`_commit`), not once per file.
            with DirCache(sync_later=True) as dirs:
                self._process(rows, Locations(self.config, dirs, self.s3, self._places, self.staging),
                              dirs)
        except BaseException:
            # Whatever an unexpected error left claimed goes back to the queue.
            self.journal.release(self.owner, [row.id for row in rows])
            raise

    def _process(self, rows: list[FileRow], locations: Locations, dirs: DirCache) -> None:
        """The batch's steps, committed in two transactions; what they came to is reported
        once, at the end (a worker process's one frame to the daemon per batch: each frame
        wakes a thread of the daemon's, and a wake-up costs what counting a file does)."""
        reported: list[Reported] = []
        try:
            scanned = self._first_steps(rows, locations)
            reported += self._commit(scanned, dirs)
            moved: list[tuple[FileRow, Outcome]] = []
            for row, outcome in scanned:
                if (outcome.state or row.state) is FileState.MOVING:
                    step = self._resume if row.state is FileState.MOVING else self.mover.move
                    current = row.updated(outcome.changes)
                    moved.append((current, self._guard(current, locations, step)))
            reported += self._commit(moved, dirs)
        finally:
            if self._on_outcomes and reported:
                self._on_outcomes(reported)

    def _first_steps(self, rows: list[FileRow], locations: Locations) -> list[tuple[FileRow, Outcome]]:
        """Each row's step before its move: scanned (several scans in flight where the engine
        takes them: daemon/pipeline/inflight.py), planned again, or none (a cut-off move)."""
        done: dict[int, Outcome] = {}
        settled: dict[int, RowChanges] = {}

        def land(flight: Flight) -> None:
            done[flight.row.id] = self._guard(flight.row, locations, flight.land)

        with Window(land) as window:
            for row in rows:
                if row.state is FileState.VERDICT:  # a failed move: plan it again
                    done[row.id] = self._guard(row, locations, self._replan)
                    continue
                if row.state is not FileState.SCANNING:
                    continue  # moving: a move cut off by a crash, finished below
                if needs_settling(row):  # daemon/pipeline/settling.py: scanned at once if settled
                    look = self._guard(row, locations, self.settler.settle)
                    if look.state is not None:  # not settled yet, held or gone
                        done[row.id] = look
                        continue
                    settled[row.id] = look.changes
                    row = row.updated(look.changes)
                if sender := self._senders.get(row.watch):
                    begun = self._guard(row, locations, self.scanner.begin)
                    if isinstance(begun, Asking):
                        window.send(Flight(row, begun, sender))
                    else:
                        done[row.id] = begun
                else:
                    window.land_all()  # this scan's slots are taken waiting
                    done[row.id] = self._guard(row, locations, self.scanner.scan)
        return [(row, _after(settled.get(row.id), done.get(row.id) or Outcome({}))) for row in rows]

    def _sending(self) -> dict[str, SendingGate]:
        """The gate of each single-engine watch whose engine takes several scans at once. Not
        for S3 watches: their many threads wait on S3 anyway, and each scan in flight would
        hold its object's download."""
        gates = {w.name: self.scanner.engines.get(w.engines[0]) for w in self.config.watches
                 if len(w.engines) == 1 and not uses_s3(w)}
        return {name: g for name, g in gates.items() if isinstance(g, SendingGate)}

    def _replan(self, row: FileRow, locations: Locations) -> Outcome:
        return self.planner.plan(row, {"state": FileState.MOVING}, locations)

    def _resume(self, row: FileRow, locations: Locations) -> Outcome:
        return self.mover.move(row, locations, resumed=True)

    def _guard(self, row: FileRow, locations: Locations,
               step: Callable[[FileRow, Locations], _Step]) -> _Step:
        """Run a step, and plan the move of the verdict it came to (journaled with it, before
        any move); an unexpected error fails the file instead of killing the worker. A scan
        stopped at its engine call (`Asking`) is returned as it is."""
        self.heartbeat_at = self.clock()
        kept = None
        try:
            with file_context(self._context(row)):
                outcome = step(row, locations)
                if isinstance(outcome, Asking):
                    return outcome
                kept = outcome.kept
                return self.planner.planned(row, outcome, locations) if outcome.needs_plan else outcome
        except Exception as exc:
            log.exception("file.internal_error", **self._context(row))
            failed = self._failed(row, exc, locations)
            # The step is lost, not the engine's verdict of these bytes (the verdict cache).
            return failed.but(kept=kept) if kept else failed

    def _failed(self, row: FileRow, exc: Exception, locations: Locations) -> Outcome:
        """A step that raised: its move failed, or the file fails as an internal error."""
        outcomes = self.mover.outcomes
        if row.state is FileState.MOVING and row.verdict is not None:
            return outcomes.move_failed(row, exc)
        changes = outcomes.verdict(row, Verdict.failed(Reason.INTERNAL_ERROR))
        try:
            return self.planner.plan(row, changes, locations)
        except Exception as again:  # never hand the batch back: this row waits its turn
            log.exception("file.internal_error", **self._context(row))
            return outcomes.move_failed(row, again, {**changes, "state": FileState.VERDICT})

    def _commit(self, outcomes: list[tuple[FileRow, Outcome]], dirs: DirCache) -> list[Reported]:
        """Write the steps' changes in one transaction, log their events; what to report."""
        dirs.sync()  # what the batch renamed into place is durable before it is journaled
        self.journal.apply(((row.id, o.changes) for row, o in outcomes if o.changes),
                           [o.kept for _, o in outcomes if o.kept])
        for row, outcome in outcomes:
            if outcome.arrivals:  # after the row is done: they are rows of their own
                self.journal.discover(row.watch, outcome.arrivals, self.clock())
                self.wake.set()
        reported: list[Reported] = []
        info = enabled(logging.INFO)  # asked once: a filtered record builds no fields
        for row, outcome in outcomes:
            if outcome.event:
                self._log(row, outcome, info)
            if outcome.changes:
                reported.append((row, self.config.watch(row.watch).engine_label, outcome))
            # Several engines: each one's metrics.
            reported.extend((row, engine, step) for engine, step in outcome.engine_events)
        return reported

    def _log(self, row: FileRow, outcome: Outcome, info: bool) -> None:
        """The step's event, at its level (`info`: whether info records are written)."""
        if outcome.event in _WARNINGS:
            level = "warning"
        elif outcome.fields.get("outcome") == VerdictKind.FAILED:
            level = "error"
        elif info:
            level = "info"
        else:
            return
        getattr(log, level)(outcome.event, **{**self._context(row), **outcome.fields})

    def _context(self, row: FileRow) -> dict[str, Any]:
        """The per-file fields every event of the row carries."""
        return {"watch": row.watch, "rel_path": row.rel_path, "file_id": row.id,
                "engine": self.config.watch(row.watch).engine_label, "ref_id": row.ref_id}


def _after(settled: RowChanges | None, outcome: Outcome) -> Outcome:
    """A step's outcome with the changes of the settle step before it, if there was one."""
    return outcome if settled is None else outcome.but(changes={**settled, **outcome.changes})


def uses_s3(watch: WatchConfig) -> bool:
    """True when the watch reads from or writes to S3."""
    return any(is_s3(loc) for loc in (watch.source, *watch.destinations.values()))
