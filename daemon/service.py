"""`scanwatch run`: wire config, journal, engines, pipeline and watchers; handle signals."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

import structlog

from daemon.alerts import WebhookAlerts
from daemon.config import Config, load_config
from daemon.engines import Engine, build_engines
from daemon.engines.clamav import follow_clamd_threads
from daemon.errors import ConfigError, EngineThrottledError, JournalDamagedError, JournalError, ScanwatchError
from daemon.handoff import Handoff, add_on_way
from daemon.journal import Journal, is_damage, open_journal, owner_token
from daemon.journal.repair import hold_daemon_lock
from daemon.locations.s3staging import reconcile as reconcile_staging
from daemon.metrics import Metrics
from daemon.pipeline import Pipeline, Reported, uses_s3
from daemon.pipeline.outcome import Outcome, Tally
from daemon.s3client import S3Clients
from daemon.s3url import is_s3
from daemon.sdnotify import Notifier
from daemon.timefmt import iso
from daemon.watchers.base import Watcher
from daemon.watchers.local import LocalWatcher
from daemon.watchers.s3 import S3Watcher
from daemon.webhooks import WebhookReceivers
from daemon.workers.pool import Forked, WorkerPool
from daemon.workers.process import share_webhook_health

__all__ = ["Service", "s3_clients"]

log = structlog.get_logger("scanwatch.service")

_TICK_S = 1.0
_RECLAIM_EVERY_S = 30.0
_PRUNE_EVERY_S = 3600.0  # retention passes, at most (sooner for a shorter `journal.keep`)
_PRUNE_PAUSE_S = 0.005  # between a pass's transactions: the workers' turn at the writers' lock


@dataclass
class _Running:
    """What one config runs: rebuilt as a whole on reload."""

    config: Config
    engines: dict[str, Engine]
    pipeline: Pipeline | WorkerPool  # `workers: N` > 1: processes (daemon/workers/pool.py)
    watchers: list[Watcher]
    alerts: WebhookAlerts | None
    webhooks: WebhookReceivers  # bound in `_start`, so a reload can rebind the same address


def s3_clients(config: Config) -> S3Clients:
    """The S3 clients of `config`'s watches, made now: S3 settings that boto3 cannot use stop
    the start."""
    s3 = S3Clients()
    for watch in config.watches:
        if uses_s3(watch):
            s3(config.s3_for(watch))
    return s3


class _Retention:
    """The journal's retention passes (daemon/journal/retention.py), each in a thread of its
    own so that the main loop keeps its tick whatever the journal's size."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._due_at = 0.0  # the first pass at the first tick

    def tick(self, keep: float | None) -> None:
        """Start a pass removing what finished more than `keep` seconds ago, if one is due."""
        if keep is None or time.monotonic() < self._due_at or (self._thread and self._thread.is_alive()):
            return
        self._due_at = time.monotonic() + min(_PRUNE_EVERY_S, keep)
        self._thread = threading.Thread(target=self._pass, args=(time.time() - keep,),
                                        name="journal-retention", daemon=True)
        self._thread.start()

    def _pass(self, before: float) -> None:
        try:
            removed = self._journal.prune(before, go_on=lambda: not self._stopping.wait(_PRUNE_PAUSE_S))
        except (JournalError, sqlite3.Error) as exc:  # a damaged journal stops the daemon (`_fault`)
            log.warning("journal.prune_failed", error=str(exc))
            return
        if removed:
            log.info("journal.pruned", rows=removed, finished_before=iso(before))

    def stop(self) -> None:
        """End a pass at its next transaction's end."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()


class Service:
    """The daemon: runs until SIGTERM/SIGINT, reloads on SIGHUP."""

    def __init__(self, config_path: str, config: Config, *, forked: Sequence[Forked] = (),
                 s3: S3Clients | None = None, handoff: Handoff | None = None) -> None:
        """`forked`: the worker processes `forked_workers` made for `config`
        (daemon/workers/pool.py); `s3`: `config`'s S3 clients, and `handoff` the way from the
        watchers to the workers (daemon/handoff.py), both made before them."""
        self.config_path = config_path
        self.handoff = handoff or Handoff()
        self._lock_fd = hold_daemon_lock(config.state_dir)
        self.journal = open_journal(config.state_dir)
        if problem := self.journal.quick_check():
            raise JournalDamagedError(f"the journal {self.journal.path} is damaged: {problem}")
        self.owner = owner_token()
        self.wake = threading.Event()
        self.notifier = Notifier()
        self.metrics = Metrics(self.journal, engines=lambda: self._running.engines)
        self._signals: list[signal.Signals] = []
        self._signalled = threading.Event()
        self._died: list[str] = []  # threads ended by an exception: the daemon must not go on
        self._noted_on_way = False  # whether the journal has arrivals on their way, as noted
        self._retention = _Retention(self.journal)
        self._running = self._build(config, forked, s3)

    def _build(self, config: Config, forked: Sequence[Forked] = (),
               s3: S3Clients | None = None) -> _Running:
        config = follow_clamd_threads(config)  # before the gates and workers are sized
        engines = build_engines(config)
        s3 = s3_clients(config) if s3 is None else s3
        pipeline: Pipeline | WorkerPool
        if config.worker_count() > 1:
            share_webhook_health(engines, config.state_dir)  # received here, polled in workers
            pipeline = WorkerPool(config, self.journal, self.wake, self._on_heard, self.handoff,
                                  forked)
        else:
            pipeline = Pipeline(config, self.journal, engines, owner=self.owner, wake=self.wake,
                                on_outcomes=self._on_outcomes, s3=s3, handoff=self.handoff)
        watchers: list[Watcher] = [
            S3Watcher(w, self.journal, self.wake, s3(config.s3_for(w)), config.s3_for(w),
                      on_malformed=self.metrics.sqs_malformed.labels(w.name).inc)
            if is_s3(w.source)
            else LocalWatcher(w, self.journal, self.wake, handoff=self.handoff)
            for w in config.watches]
        alerts = WebhookAlerts(config.notify) if config.notify else None
        webhooks = WebhookReceivers(engines, self.journal, self.wake)
        return _Running(config, engines, pipeline, watchers, alerts, webhooks)

    def _on_outcomes(self, batch: list[Reported]) -> None:
        """A batch's outcomes of the pipeline in this process, heard as a worker's are."""
        self._on_heard(Tally.of(batch))

    def _on_heard(self, tally: Tally) -> None:
        """A batch's outcomes into the metrics and alerts: counts that fail to be added skip
        no alert, and an alert that fails skips no other (each logged)."""
        try:
            self.metrics.count(tally)
        except Exception:
            log.exception("outcome.unobserved", counts=len(tally.counts))
        if (alerts := self._running.alerts) is None:
            return
        for row, event, fields in tally.notable:
            try:
                alerts.observe(self._running.config.watch(row.watch), row, Outcome({}, event, fields))
            except Exception:
                log.exception("outcome.unobserved", step=event, file_id=row.id)

    def _start(self, running: _Running, *, is_first: bool = False) -> None:
        # Bound first, so an address in use stops the first start before anything runs;
        # on a reload it is logged and the engines poll (daemon/webhooks.py).
        running.webhooks.start(must_bind=is_first)
        for name, engine in running.engines.items():
            self._probe(name, engine)
        running.pipeline.start()
        for watcher in running.watchers:
            watcher.start()

    def _stop(self, running: _Running, timeout_s: float | None = None) -> bool:
        running.webhooks.stop()
        for watcher in running.watchers:
            watcher.stop()
        drained = running.pipeline.stop(
            running.config.shutdown_timeout if timeout_s is None else timeout_s)
        for engine in running.engines.values():
            engine.close()
        if running.alerts is not None:
            running.alerts.close()
        return drained

    def _probe(self, name: str, engine: Engine) -> None:
        try:
            detail = engine.probe()
        except EngineThrottledError as exc:  # it answers: "slow down" is pacing, not down
            detail = str(exc)
        except ScanwatchError as exc:
            log.warning("engine.unhealthy", engine=name, error=str(exc))
            self.journal.set_engine_health(name, False, str(exc), time.time())
            return
        log.info("engine.ready", engine=name, detail=detail)
        self.journal.set_engine_health(name, True, detail, time.time())

    def _on_signal(self, signum: int, _: FrameType | None) -> None:
        self._signals.append(signal.Signals(signum))
        self._signalled.set()

    def _on_thread_death(self, args: threading.ExceptHookArgs) -> None:
        """A thread ended by an exception: log its traceback (not to stderr), stop the daemon."""
        name = args.thread.name if args.thread else "?"
        if args.exc_type is SystemExit:
            return
        log.error("thread.died", thread=name, error=str(args.exc_value),
                  exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
        if args.exc_value is not None and is_damage(args.exc_value):
            self.journal.damage = self.journal.damage or str(args.exc_value)
        self._died.append(f"thread {name} died: {args.exc_type.__name__}: {args.exc_value}")
        self._signalled.set()

    def _fault(self) -> ScanwatchError | None:
        """Why the daemon cannot go on: a damaged journal, a dead thread."""
        if self.journal.damage:
            return JournalDamagedError(f"the journal {self.journal.path} is damaged: "
                                       f"{self.journal.damage}")
        if self._died:
            return ScanwatchError(f"{self._died[0]}; its traceback is in the log")
        return None

    def run(self) -> int:
        """Run until told to stop; returns the exit code.

        Raises `ScanwatchError` when the journal turns out damaged or a thread died: then
        the watchdog is no longer fed and the process exits non-zero, so systemd acts.
        """
        threading.excepthook = self._on_thread_death
        try:
            return self._run()
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                raise
            self.journal.damage = self.journal.damage or str(exc)
        fault = self._fault()
        assert fault is not None
        self._fail(fault)
        raise fault

    def _run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        reclaimed = self.journal.reclaim()
        if reclaimed:
            log.info("journal.resumed", rows=reclaimed)
        # Before any worker runs: scanned bytes no live row waits for (docs/integrity.md).
        reconcile_staging(self._running.config, self.journal)
        if metrics := self._running.config.metrics:
            self.metrics.serve(metrics.listen, self._unready_reasons)
        self._start(self._running, is_first=True)
        log.info("daemon.started", config=self.config_path,
                 watches=[w.name for w in self._running.config.watches])
        self.notifier.ready(self._status())
        next_reclaim_at = time.monotonic() + _RECLAIM_EVERY_S
        while True:
            self._signalled.wait(_TICK_S)
            self._signalled.clear()
            while self._signals:
                signum = self._signals.pop(0)
                if signum == signal.SIGHUP:
                    self._reload()
                else:
                    return self._shutdown(signum)
            if fault := self._fault():
                self._fail(fault)
                raise fault
            if self._running.pipeline.tick():  # a worker died: what was handed to it, swept
                for watcher in self._running.watchers:
                    if isinstance(watcher, LocalWatcher):
                        watcher.sweep_soon()
            self._note_arriving()
            if time.monotonic() >= next_reclaim_at:
                # Rows of a crashed `scan --move` next to us.
                self.journal.reclaim()
                next_reclaim_at = time.monotonic() + _RECLAIM_EVERY_S
            self._retention.tick(self._running.config.journal.keep)
            self._heartbeat()

    def _note_arriving(self) -> None:
        """Note in the journal what is on its way to a worker, in the socket or waiting in a
        watcher, for `status` and the metrics (daemon/handoff.py)."""
        on_way = self.handoff.on_way()
        for watcher in self._running.watchers:
            if isinstance(watcher, LocalWatcher) and watcher.waiting[0]:
                add_on_way(on_way, watcher.watch.name, *watcher.waiting)
        if on_way or self._noted_on_way:
            self.journal.note_arriving(on_way, time.time())
        self._noted_on_way = bool(on_way)

    def _heartbeat(self) -> None:
        # Only a pipeline whose workers still turn over proves the daemon is alive.
        if self._running.pipeline.is_alive():
            self.notifier.watchdog()
        else:
            log.error("pipeline.stalled", since=self._running.pipeline.heartbeat_at)
        self.notifier.status(self._status())

    def _unready_reasons(self) -> list[str]:
        """Why the daemon is not ready: a stalled pipeline, engines down."""
        reasons = [] if self._running.pipeline.is_alive() else ["pipeline stalled"]
        for name, (healthy, detail, _) in sorted(self.journal.engine_health().items()):
            if not healthy and name in self._running.engines:
                reasons.append(f"engine {name} down: {detail}")
        return reasons

    def _status(self) -> str:
        pending = self.journal.pending_count()
        return f"{len(self._running.config.watches)} watches, {pending} files pending"

    def _reload(self) -> None:
        self.notifier.reloading()
        log.info("config.reloading", config=self.config_path)
        try:
            config = load_config(self.config_path)
            if config.state_dir != self._running.config.state_dir:
                log.warning("config.state_dir_unchanged", reason="state_dir needs a restart")
            fresh = self._build(config)
        except ConfigError as exc:
            log.error("config.reload_failed", config=self.config_path, problems=exc.problems)
            self.notifier.ready(self._status())
            return
        self._stop(self._running)
        self._running = fresh
        self._start(fresh)
        log.info("config.reloaded", config=self.config_path)
        self.notifier.ready(self._status())

    def _fail(self, fault: ScanwatchError) -> None:
        """Stop what still runs, without waiting on a journal that cannot be written."""
        log.error("daemon.failed", error=str(fault))
        self.notifier.failing(str(fault))
        try:
            self._stop(self._running, timeout_s=min(self._running.config.shutdown_timeout, 5.0))
        except (ScanwatchError, sqlite3.Error) as exc:
            log.warning("daemon.stop_incomplete", error=str(exc))
        self._retention.stop()
        self.journal.close()

    def _shutdown(self, signum: signal.Signals) -> int:
        log.info("daemon.stopping", signal=signum.name)
        self.notifier.stopping()
        self.notifier.extend_timeout(self._running.config.shutdown_timeout + 5)
        drained = self._stop(self._running)
        self.journal.note_arriving({}, time.time())  # their sources keep them, for the next start
        self._retention.stop()
        log.info("daemon.stopped", drained=drained)
        self.journal.close()
        return 0
