"""Several engines on one watch: each scans the same bytes; the file's outcome follows from all.

How the work is shared (docs/contract.md, "Several engines on one watch"): a file row of
such a watch is claimed like any row, by one worker of any of the watch's engines. That
worker holds the source once (`Location.open_for_scan`), hashes it once, and asks every
engine that owes an answer, in parallel: one short-lived thread per engine, each engine
call through that engine's one gate (its `concurrency`, shared with its single-engine
watches and, with several worker processes, across them), with the engine's own retries,
rate limit and `max_pending_age`. Each engine keeps a scan record per file in the journal
(`scans`: scan ID, verdict, reason, threats, attempts, submitting marker); the thread that
got an answer journals it at once, so a restart follows each engine where it was and never
submits again to one that answered. Between steps the row waits `scanning`, unclaimed,
until its earliest record is due (a poll, a retry).

The outcome: infected as soon as any engine says so (the others' pending scans are
abandoned: never followed again, logged `scan.abandoned`); failed when none is infected
and any failed after its retries; clean only when every engine said clean for these bytes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import structlog

from daemon.config import Config, WatchConfig
from daemon.engines.base import Engine, ScanHandle, ScanRequest
from daemon.errors import (
    EngineResubmitError,
)
from daemon.journal import FileRow, Journal, RowChanges
from daemon.locations import Locations, Opened
from daemon.model import (
    FileState,
    Pending,
    Reason,
    ScanChanges,
    ScanRecord,
    Verdict,
    VerdictKind,
)
from daemon.pipeline import answers
from daemon.pipeline.caching import CacheKey
from daemon.pipeline.health import EngineHealth
from daemon.pipeline.outcome import Outcome, Outcomes
from daemon.refid import build_ref_id

__all__ = ["MultiScanner", "decide"]

log = structlog.get_logger("scanwatch.pipeline")


class MultiScanner(answers.ScanStep):
    """One scanning step of a file on a watch with several engines (`engines`: by configured
    name, each behind its gate; replaced on a reload)."""

    def __init__(self, config: Config, journal: Journal, engines: Mapping[str, Engine],
                 outcomes: Outcomes, health: EngineHealth) -> None:
        super().__init__(config, journal, outcomes, health)
        self.engines = engines

    def scan(self, row: FileRow, watch: WatchConfig, opened: Opened, secret: str | None,
             locations: Locations) -> Outcome:
        """Follow the pending scans, submit the bytes to engines without one, decide when possible."""
        events: list[tuple[str, Outcome]] = []  # appended to from the engines' threads
        outcome = self._step(row, watch, opened, secret, locations, events)
        return outcome.but(engine_events=tuple(events))

    def _step(self, row: FileRow, watch: WatchConfig, opened: Opened, secret: str | None,
              locations: Locations, events: list[tuple[str, Outcome]]) -> Outcome:
        sha256 = row.sha256
        if (decided := self._decided(row, watch, sha256, opened.facts)) is not None:
            return decided
        now = self.clock()
        records = self._records(row, sha256)
        due = [e for e in watch.engines
               if e not in records or (not records[e].is_final and records[e].next_attempt_at <= now)]
        engines = self.engines
        follow = [e for e in due if e in records and _follows(records[e], engines[e])]
        polled = self._parallel(
            follow, lambda e: self._poll(row, engines[e], records[e], opened.path, events, locations))
        resubmit = {e: exc for e, exc in polled.items() if exc}
        if (decided := self._decided(row, watch, sha256, opened.facts)) is not None:
            return decided
        submit = [e for e in due if e not in follow or e in resubmit]
        if submit:
            content = opened.content(read_by=self.read_by(watch, all(
                engines[e].reads_s3 and e not in resubmit for e in submit)))
            if sha256 is not None and content.sha256 != sha256:
                return self.outcomes.changed(f"{opened.path}: its bytes are not those scanned",
                                             settles=True)
            sha256 = content.sha256
            ref_id = row.ref_id if row.sha256 == sha256 and row.ref_id else build_ref_id(
                watch.name, row.rel_path, sha256)
            request = ScanRequest(watch.name, row.rel_path, opened.path, content.fd, content.size,
                                  sha256, ref_id, s3=content.s3, archive_password=secret,
                                  original=locations.source(watch.source, watch).name(row.rel_path))
            keys, cached, cache_events = self.cache.several(
                row, watch, {e: engines[e] for e in submit}, sha256, locations)
            events += cache_events
            if cached:
                self.journal_at_once(row.id, {"sha256": sha256, "ref_id": ref_id,
                                              "engine": watch.engine_label, **opened.facts},
                                     {e: {"sha256": sha256, "ref_id": ref_id, **changes}
                                      for e, changes in cached.items()})
            submit = [e for e in submit if e not in cached]
            if submit:
                self._submit(row, watch, request, opened.facts, submit, resubmit, events,
                             _Cached(keys, watch, locations))
        if (decided := self._decided(row, watch, sha256, opened.facts)) is not None:
            return decided
        return self._waiting(row, watch, sha256, opened.facts)

    # -- asking the engines ---------------------------------------------------------------------

    def _parallel(self, names: list[str], step: Callable[[str], Any]) -> dict[str, Any]:
        """`step(name)` for each engine at once (each engine's calls pass its one gate, which
        holds it to its `concurrency` across every watch: daemon/pipeline/gate.py)."""
        if not names:
            return {}
        with ThreadPoolExecutor(len(names), thread_name_prefix="scan-multi") as pool:
            futures = {name: pool.submit(step, name) for name in names}
            return {name: future.result() for name, future in futures.items()}

    def _poll(self, row: FileRow, engine: Engine, record: ScanRecord, path: str,
              events: list[tuple[str, Outcome]], locations: Locations) -> EngineResubmitError | None:
        """Follow one engine's submitted (or in-doubt) scan; its answer is journaled here."""
        handle = ScanHandle(row.watch, row.rel_path, path, record.sha256, record.ref_id or "",
                            record.engine_scan_id)
        try:
            changes = self._call(row, record, partial(engine.poll, handle), events, spent=False)
        except EngineResubmitError as exc:
            if exc.may_duplicate:
                events.append((record.engine, Outcome({}, "scan.resubmitting", {"resubmitted": True})))
            log.info("scan.resubmitting", watch=row.watch, rel_path=row.rel_path, file_id=row.id,
                     engine=record.engine, error=str(exc), in_doubt=record.engine_scan_id is None)
            return exc
        self.journal_at_once(row.id, {}, {record.engine: changes})
        watch = self.config.watch(row.watch)
        key = self.cache.key(watch, record.engine, engine, record.sha256)
        self._store(_Cached({record.engine: key}, watch, locations), row, record.engine, changes,
                    record.ref_id)
        return None

    def _submit(self, row: FileRow, watch: WatchConfig, request: ScanRequest, facts: RowChanges,
                names: list[str], resubmit: Mapping[str, EngineResubmitError],
                events: list[tuple[str, Outcome]], cache: _Cached) -> None:
        """Journal the bytes' hash and the submissions in doubt, then ask each engine at once."""
        engines, records = self.engines, self._records(row, request.sha256)
        intents: dict[str, ScanChanges] = {}
        for name in names:
            attempts = records[name].attempts + 1 if name in records else 1
            intents[name] = {"sha256": request.sha256, "ref_id": request.ref_id, "attempts": attempts,
                             "engine_scan_id": None, "last_error": None,
                             "submitting_at": self.clock() if engines[name].remote else None}
        # Journaled as in doubt, in its own transaction, before any engine sees the bytes
        # (docs/integrity.md, "Remote engines").
        self.journal_at_once(row.id, {"sha256": request.sha256, "ref_id": request.ref_id,
                                      "engine": watch.engine_label, **facts}, intents)
        own_fds = len(names) > 1 and request.fd is not None

        def ask(name: str) -> None:
            by_upload = name in resubmit and resubmit[name].by_upload
            fd = _reopen(request.fd) if own_fds and request.fd is not None else request.fd
            try:
                one = dataclasses.replace(request, fd=fd, by_upload=by_upload)
                record = ScanRecord(row.id, name, request.sha256, request.ref_id,
                                    attempts=intents[name].get("attempts", 1))
                changes = self._call(row, record, partial(engines[name].scan, one), events, spent=True)
            finally:
                if own_fds and fd is not None:
                    os.close(fd)
            self.journal_at_once(row.id, {}, {name: changes})
            self._store(cache, row, name, changes, request.ref_id)
            if "verdict" not in changes and not changes.get("engine_scan_id"):
                return  # not answered: a wait or a retry, already logged
            if cache.keys.get(name) is not None:
                events.append((name, Outcome({}, "cache.miss", {"cache": "miss"})))
            log.info("scan.submitted", watch=row.watch, rel_path=row.rel_path, file_id=row.id,
                     engine=name, ref_id=request.ref_id, engine_scan_id=changes.get("engine_scan_id"),
                     verdict=changes.get("verdict"))

        self._parallel(names, ask)

    def _store(self, cache: _Cached, row: FileRow, name: str, changes: ScanChanges,
               ref_id: str | None) -> None:
        """An engine's answer into the verdict cache; no answer (a retry) ends its flight."""
        key = cache.keys.get(name)
        verdict = changes.get("verdict")
        if verdict is None:
            if not changes.get("engine_scan_id"):
                self.cache.release(key, row.id)
            return
        answer = Verdict(verdict, tuple(changes.get("threats", ())), changes.get("reason"),
                         changes.get("engine_scan_id"))
        self.cache.store(key, row.id, answer, changes.get("ref_id") or ref_id, cache.watch,
                         cache.locations)

    def _call(self, row: FileRow, record: ScanRecord, ask: Callable[[], Verdict | Pending],
              events: list[tuple[str, Outcome]], *, spent: bool) -> ScanChanges:
        """One engine's answer as its record's change (a verdict, a scan to poll, a retry)."""
        name = record.engine
        changes, waits_for = self._answer(row, record, ask, spent=spent)
        if changes.get("verdict") is VerdictKind.FAILED:
            reason = changes.get("reason") or Reason.ENGINE_ERROR
            events.append((name, Outcome({}, "scan.verdict", {"verdict": VerdictKind.FAILED,
                                                              "reason": reason})))
        elif waits_for is not None:
            events.append((name, Outcome({}, "retry.scheduled", {"reason": waits_for})))
        return changes

    def _answer(self, row: FileRow, record: ScanRecord, ask: Callable[[], Verdict | Pending], *,
                spent: bool) -> tuple[ScanChanges, Reason | None]:
        """The record's change, and the reason of a retry or wait (as the metrics count it)."""
        name = record.engine
        now = self.clock()
        result = self.asked(name, ask)
        limits = answers.Limits.of(self.config.engines[name], self.outcomes.policy)
        step = answers.step_of(result, attempts=record.attempts, spent=spent,
                               discovered_at=row.discovered_at, now=now, limits=limits)
        if isinstance(step, answers.Wait | answers.Retry):
            log.warning("retry.scheduled", watch=row.watch, rel_path=row.rel_path, file_id=row.id,
                        engine=name, reason=step.error.reason.value, error=str(step.error),
                        attempts=step.attempts, delay_s=round(step.delay_s, 3))
            changes: ScanChanges = {"attempts": step.attempts, "last_error": str(step.error),
                                    "next_attempt_at": now + step.delay_s}
            if isinstance(step, answers.Wait):  # no attempt spent; the in-doubt mark is cleared
                changes["submitting_at"] = None
            return changes, step.error.reason
        if isinstance(step, answers.Failed):
            return {**_verdict(step.verdict, record, now), "attempts": step.attempts}, None
        answer = step.answer
        if isinstance(answer, Pending):
            return {"engine_scan_id": answer.engine_scan_id, "submitting_at": None,
                    "next_attempt_at": now + answer.poll_after_s}, None
        return _verdict(answer, record, now), None

    # -- deciding ---------------------------------------------------------------------------------

    def _records(self, row: FileRow, sha256: str | None) -> dict[str, ScanRecord]:
        """The file's scan records of these bytes (records of other bytes do not count)."""
        return {e: r for e, r in self.journal.scans(row.id).items() if r.sha256 == sha256}

    def _decided(self, row: FileRow, watch: WatchConfig, sha256: str | None,
                 facts: RowChanges) -> Outcome | None:
        """The file's verdict (its move to plan), when its records allow one."""
        records = self._records(row, sha256)
        verdict = decide(watch.engines, records)
        if verdict is None or sha256 is None:
            return None
        abandoned = [e for e in watch.engines if e not in records or records[e].verdict is None]
        if abandoned:
            self.journal_at_once(row.id, {}, {e: {"sha256": sha256, "abandoned": True}
                                              for e in abandoned})
            log.info("scan.abandoned", watch=row.watch, rel_path=row.rel_path, file_id=row.id,
                     engines=abandoned, decided_by=verdict.raw["deciding_engine"])
        changes: RowChanges = {**self.outcomes.verdict(row, verdict), **facts, "sha256": sha256,
                               "ref_id": row.ref_id or records[str(verdict.raw["deciding_engine"])].ref_id,
                               "engine": watch.engine_label}
        return Outcome(changes, "scan.verdict", {
            "verdict": verdict.kind.value, "threats": list(verdict.threats), "reason": verdict.reason,
            "engines": {e: str(records[e].verdict) for e in watch.engines if e in records
                        and records[e].verdict is not None},
            "abandoned": abandoned, **_cached_fields(verdict)}, needs_plan=True)

    def _waiting(self, row: FileRow, watch: WatchConfig, sha256: str | None,
                 facts: RowChanges) -> Outcome:
        """No outcome yet: the row waits, unclaimed, for its earliest due engine."""
        records = self._records(row, sha256)
        waiting = [r for r in records.values() if not r.is_final]
        due_at = min((r.next_attempt_at for r in waiting), default=self.clock())
        errors = [r.last_error for r in waiting if r.last_error]
        return Outcome({"state": FileState.SCANNING, "owner": None, "next_attempt_at": due_at,
                        "last_error": errors[0] if errors else None, **facts})


@dataclasses.dataclass(frozen=True)
class _Cached:
    """The verdict cache keys of the engines asked (none: the cache is off for that engine)."""

    keys: Mapping[str, CacheKey | None]
    watch: WatchConfig
    locations: Locations


def decide(engines: tuple[str, ...], records: Mapping[str, ScanRecord]) -> Verdict | None:
    """The file's verdict from its engines' records, or None while one is still owed.

    Infected when any engine says so (the first such engine in the list decides); else failed
    when every engine answered and any failed; else clean when all said clean.
    """
    ordered = [records.get(e) for e in engines]
    answered = [r for r in ordered if r is not None and r.verdict is not None]
    infected = [r for r in answered if r.verdict is VerdictKind.INFECTED]
    if infected:
        decider = infected[0]
    elif len(answered) == len(engines):
        failed = [r for r in answered if r.verdict is VerdictKind.FAILED]
        decider = failed[0] if failed else answered[0]
    else:
        return None
    threats = list(dict.fromkeys(t for r in answered for t in r.threats or ()))
    assert decider.verdict is not None
    return Verdict(decider.verdict, tuple(threats), decider.reason, decider.engine_scan_id, raw={
        "deciding_engine": decider.engine,
        "scans": [{"engine": r.engine, "verdict": str(r.verdict), "reason": r.reason,
                   "threats": r.threats or [], "engine_scan_id": r.engine_scan_id,
                   "external_reference_id": r.ref_id,
                   **({"cached": True, "cached_from": r.cached_from} if r.cached_from else {})}
                  for r in answered],
        **({"cached_from": decider.cached_from} if decider.cached_from else {})})


def _cached_fields(verdict: Verdict) -> dict[str, Any]:
    """The deciding engine's verdict came from the verdict cache: the scan it reuses."""
    cached_from = verdict.raw.get("cached_from")
    return {"cached": True, "cached_from": cached_from} if cached_from else {}


def _follows(record: ScanRecord, engine: Engine) -> bool:
    """Whether the engine has (or may have) a scan of these bytes to follow without them."""
    return record.engine_scan_id is not None or (record.submitting_at is not None and engine.remote)


def _verdict(verdict: Verdict, record: ScanRecord, now: float) -> ScanChanges:
    changes: ScanChanges = {
        "verdict": verdict.kind, "reason": verdict.reason, "threats": list(verdict.threats),
        "engine_scan_id": verdict.engine_scan_id or record.engine_scan_id, "submitting_at": None,
        "scanned_at": now, "last_error": str(verdict.raw["error"]) if "error" in verdict.raw else None}
    if "external_reference_id" in verdict.raw:  # a re-submission (`<id>.2`) is the ID it answers to
        changes["ref_id"] = str(verdict.raw["external_reference_id"])
    return changes


def _reopen(fd: int) -> int:
    """A descriptor of the same open file with its own offset: engines that stream from a
    duplicate of the fd (sharing its offset) must not read each other's position."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
