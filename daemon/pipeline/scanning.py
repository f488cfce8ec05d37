"""The scanning step: hold the file or object version, follow or ask its engine.

A submitted remote scan is followed without its bytes (docs/integrity.md, "Remote
engines"); otherwise the source's bytes are hashed and exactly those are scanned, read
the way the engine reads them (`ReadBy`). A remote submission is journaled as in doubt,
in its own transaction, before the engine sees it, and its scan ID right after the answer.
A verdict is returned for the pipeline's loop to plan its move (daemon/pipeline/planning.py).

A step asks its engine at most once, and stops there (`Scanner.begin` returns an `Asking`):
whoever drives it makes the call and finishes the step with the answer. `scan` asks at
once; the pipeline's loop sends the calls of an engine that takes several scans at once
and reads their answers later (daemon/pipeline/inflight.py). The held bytes stay open
meanwhile: the step is suspended inside them.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast

import structlog
from pydantic import SecretStr

from daemon.config import IN_PLACE, Config, WatchConfig
from daemon.engines.base import Engine, ScanHandle, ScanRequest
from daemon.errors import (
    ChangedError,
    EngineResubmitError,
    S3UnavailableError,
    StagingError,
    UnsafePathError,
)
from daemon.faults import pause
from daemon.journal import FileRow, Journal, RowChanges
from daemon.locations import Listed, Locations, Opened
from daemon.model import Pending, Reason, Verdict
from daemon.pipeline import answers
from daemon.pipeline.caching import CacheKey, cached_fields
from daemon.pipeline.health import EngineHealth
from daemon.pipeline.multi import MultiScanner
from daemon.pipeline.outcome import Outcome, Outcomes
from daemon.refid import build_ref_id

__all__ = ["Asking", "EngineCall", "Scanner", "too_large"]

log = structlog.get_logger("scanwatch.pipeline")

_UNREADABLE_ERRNOS = (errno.EIO, errno.EISDIR, errno.ENXIO)
_T = TypeVar("_T")


@dataclass(frozen=True)
class EngineCall:
    """The one engine call of a scanning step: `engine.scan(request)`."""

    engine: Engine
    request: ScanRequest


# A scanning step: runs up to its engine call (yielded), takes its answer, returns its outcome.
_Steps = Generator[EngineCall, answers.EngineResult, Outcome]


def too_large(config: Config, watch: WatchConfig, size: int | None, found: str) -> str | None:
    """Size before bytes: why a file or object of `size` (as `found`: by its `lstat`, or
    listed) larger than every engine's `max_size` is refused without being copied, hashed or
    downloaded (docs/engines.md, "File size limits"): a sparse terabyte costs its
    uploader nothing, and must not cost the daemon an hour of hashing. Else None."""
    limits = [(name, config.engines[name].max_size) for name in watch.engines]
    if size is None or not limits or any(limit is None or size <= limit for _, limit in limits):
        return None
    return "; ".join(f"{size} bytes (as {found}) is over engines.{name}.max_size ({limit})"
                     for name, limit in limits)


class Scanner(answers.ScanStep):
    """Turns a claimed `scanning` row into a scan to poll, a retry, or a verdict to plan."""

    def __init__(self, config: Config, journal: Journal, engines: Mapping[str, Engine],
                 outcomes: Outcomes, health: EngineHealth) -> None:
        super().__init__(config, journal, outcomes, health)
        self.multi = MultiScanner(config, journal, engines, outcomes, health)
        self._engines = engines

    @property
    def engines(self) -> Mapping[str, Engine]:
        """The engines by configured name (each behind its gate)."""
        return self._engines

    @engines.setter
    def engines(self, engines: Mapping[str, Engine]) -> None:
        """New engines (a reload): for single- and multi-engine watches alike."""
        self._engines = self.multi.engines = engines

    def start(self) -> None:
        """Take the engines' health as the journal has it (the start-up probe's view)."""
        self.health.load()

    def scan(self, row: FileRow, locations: Locations) -> Outcome:
        """One scanning step of `row`, its engine asked at once: what happened, as a journal
        change and an event."""
        started = self.begin(row, locations)
        return started if isinstance(started, Outcome) else started.now()

    def begin(self, row: FileRow, locations: Locations) -> Outcome | Asking:
        """`row`'s scanning step run up to its engine call (an `Asking`), or to its end."""
        steps = self._steps(row, locations)
        try:
            call = next(steps)
        except StopIteration as done:
            return cast(Outcome, done.value)
        return Asking(self, steps, call)

    def _steps(self, row: FileRow, locations: Locations) -> _Steps:
        watch = self.config.watch(row.watch)
        source = locations.source(watch.source, watch)
        for root in watch.destinations.values():
            if root != IN_PLACE and (why := locations.refuses(root, watch, row.rel_path)) is not None:
                return self.outcomes.failed(row, Reason.UNSAFE_KEY, why)
        try:
            if row.engine_scan_id is None and (why := too_large(
                    self.config, watch, row.size, "listed" if row.etag is not None else "found")) is not None:
                # A file is refused from the size its watcher saw only if it still is that file.
                if row.etag is None and source.identity_now(row.rel_path) != row.identity:
                    raise ChangedError(f"{source.name(row.rel_path)} changed after it was found")
                return self.outcomes.failed(row, Reason.TOO_LARGE, why)
            listed = Listed(row.rel_path, row.etag, row.version_id, row.size, file_id=row.id,
                            snapshot=row.snapshot, sha256=row.sha256, identity=row.identity)
            with source.open_for_scan(listed) as opened:
                return (yield from self._scan_opened(row, watch, opened, locations))
        except FileNotFoundError:
            return self.outcomes.gone()
        except UnsafePathError as exc:
            return self.outcomes.held(exc.reason, str(exc), row)
        except StagingError as exc:
            return self.outcomes.wait(row, "staging_unavailable", exc)
        except ChangedError as exc:
            return self.outcomes.changed(str(exc), settles=source.settles)
        except S3UnavailableError as exc:
            return self.outcomes.wait(row, "source.unavailable", exc)
        except OSError as exc:
            if isinstance(exc, PermissionError) or exc.errno in _UNREADABLE_ERRNOS:
                return self.outcomes.failed(row, Reason.UNREADABLE, str(exc))
            raise

    def _scan_opened(self, row: FileRow, watch: WatchConfig, opened: Opened,
                     locations: Locations) -> _Steps:
        if len(watch.engines) > 1:
            try:
                return self.multi.scan(row, watch, opened, _secret(watch.archivepwd), locations)
            except OSError as exc:
                return self.outcomes.failed(row, Reason.UNREADABLE, str(exc))
        engine = self.engines[watch.engines[0]]
        # A submitted scan is followed on what identifies the version alone: the bytes are
        # read again only to be submitted again, and the mover verifies a clean file's hash.
        followed = self._follow(row, engine, opened, locations)
        if isinstance(followed, Outcome):
            return followed
        by_upload = followed is not None and followed.by_upload
        try:
            content = opened.content(read_by=self.read_by(watch, engine.reads_s3 and not by_upload))
        except OSError as exc:
            return self.outcomes.failed(row, Reason.UNREADABLE, str(exc))
        pause("scan.hashed")
        ref_id = _ref_id(row, watch, content.sha256)
        request = ScanRequest(watch.name, row.rel_path, opened.path, content.fd, content.size,
                              content.sha256, ref_id, s3=content.s3,
                              archive_password=_secret(watch.archivepwd), by_upload=by_upload,
                              original=locations.source(watch.source, watch).name(row.rel_path))
        # The verdict cache (docs/engines.md, "Verdict cache"): a verdict kept for these bytes,
        # or another row's scan of them in flight, spares the engine a request.
        key = self.cache.key(watch, watch.engines[0], engine, content.sha256)
        if key is not None:
            if (entry := self.cache.lookup(key, watch, locations)) is not None:
                verdict = Verdict(entry.verdict, entry.threats, entry.reason,
                                  raw={"cached_from": entry.source()})
                return self._answered(row, verdict, opened.facts, content.sha256, ref_id, 0.0,
                                      None, cached_fields(entry))
            if (waiting := self.cache.wait(key, row)) is not None:
                return waiting
        return (yield from self._ask(row, watch, engine, request, opened.facts, followed, locations, key))

    def _follow(self, row: FileRow, engine: Engine, opened: Opened, locations: Locations
                ) -> Outcome | EngineResubmitError | None:
        """Poll the row's submitted (or in-doubt) remote scan without its bytes.

        None: nothing was submitted; an `EngineResubmitError`: submit the bytes again.
        """
        if row.sha256 is None or row.ref_id is None:
            return None
        if row.engine_scan_id is None and (row.submitting_at is None or not engine.remote):
            return None
        handle = ScanHandle(row.watch, row.rel_path, opened.path, row.sha256, row.ref_id, row.engine_scan_id)
        facts = opened.facts
        started = time.monotonic()
        try:
            answer = self._answer_of(row, self.asked(engine.name, partial(engine.poll, handle)))
        except EngineResubmitError as exc:
            log.info("scan.resubmitting", watch=row.watch, rel_path=row.rel_path, file_id=row.id,
                     error=str(exc), in_doubt=row.engine_scan_id is None, may_duplicate=exc.may_duplicate)
            return exc
        if isinstance(answer, Outcome):
            return answer
        if isinstance(answer, Verdict):
            watch = self.config.watch(row.watch)
            self.cache.store(self.cache.key(watch, watch.engines[0], engine, row.sha256), row.id, answer,
                             str(answer.raw.get("external_reference_id", row.ref_id)), watch, locations)
        event = "scan.found" if row.engine_scan_id is None else None
        return self._answered(row, answer, facts, row.sha256, row.ref_id, time.monotonic() - started,
                              event, {})

    def _ask(self, row: FileRow, watch: WatchConfig, engine: Engine, request: ScanRequest,
             facts: RowChanges, resubmit: EngineResubmitError | None, locations: Locations,
             key: CacheKey | None) -> _Steps:
        """Ask the engine about the bytes of `request` (with the row's reference ID for them);
        `facts` say which version they were.

        `key`: the bytes' flight in the verdict cache, held by `row`, ended by the answer.
        """
        sha256, ref_id = request.sha256, request.ref_id
        if engine.remote:
            # A remote scan outlives us: the submission is journaled as in doubt, in its own
            # transaction, before the engine sees it (docs/integrity.md, "Remote engines").
            self.journal_at_once(row.id, {"sha256": sha256, "ref_id": ref_id, "engine": engine.name,
                                          "submitting_at": self.clock(), **facts})
        started = time.monotonic()  # with scans in flight, until this one's answer is read
        answer = self._answer_of(row, (yield EngineCall(engine, request)))
        if isinstance(answer, Outcome):
            self.cache.release(key, row.id)
            return answer
        kept = None
        if isinstance(answer, Verdict):  # kept with the batch's commit of the verdicts (daemon/pipeline)
            kept = self.cache.store(key, row.id, answer, str(answer.raw.get("external_reference_id", ref_id)),
                                    watch, locations, later=True)
        if engine.remote and isinstance(answer, Pending):
            # ...and the scan's ID right after the answer, before anything else of the batch.
            self.journal_at_once(row.id, {"engine_scan_id": answer.engine_scan_id,
                                          "submitting_at": None})
        repeated: dict[str, Any] = {"cache": "miss"} if key is not None else {}
        if resubmit is not None and resubmit.may_duplicate:
            repeated["resubmitted"] = True
        answered = self._answered(row, answer, facts, sha256, ref_id, time.monotonic() - started,
                                  "scan.submitted", repeated)
        return answered.but(kept=kept) if kept else answered

    def _answer_of(self, row: FileRow, result: answers.EngineResult) -> Verdict | Pending | Outcome:
        """The engine's answer, or what its error means for the row (retry, wait, failed)."""
        engine_cfg = self.config.engines[self.config.watch(row.watch).engines[0]]
        step = answers.step_of(result, attempts=row.attempts, spent=True, discovered_at=row.discovered_at,
                               now=self.clock(), limits=answers.Limits.of(engine_cfg, self.outcomes.policy))
        if isinstance(step, answers.Wait):  # nothing can have been submitted
            return self.outcomes.wait(row, step.error.reason, step.error, delay_s=step.delay_s, unsent=True)
        if isinstance(step, answers.Retry):
            return self.outcomes.retry(row, step.error, delay_s=step.delay_s)
        return step.answer if isinstance(step, answers.Answered) else step.verdict

    def _answered(self, row: FileRow, answer: Verdict | Pending, facts: RowChanges, sha256: str,
                  ref_id: str, duration_s: float, event: str | None, fields: Mapping[str, Any]) -> Outcome:
        """What the engine's answer changes: a scan to poll, or a verdict to plan."""
        if isinstance(answer, Pending):
            return Outcome(
                {"engine_scan_id": answer.engine_scan_id, "owner": None, "submitting_at": None,
                 "sha256": sha256, "ref_id": ref_id, **facts,
                 "next_attempt_at": self.clock() + answer.poll_after_s},
                event, {"engine_scan_id": answer.engine_scan_id, **fields})
        changes: RowChanges = {**self.outcomes.verdict(row, answer), **facts, "sha256": sha256,
                               # A re-submission (`<id>.2`) is the ID the engine knows the verdict by.
                               "ref_id": str(answer.raw.get("external_reference_id", ref_id)),
                               "engine": self.config.watch(row.watch).engine_label}
        return Outcome(changes, "scan.verdict", {
            "verdict": answer.kind.value, "threats": list(answer.threats), "reason": answer.reason,
            "duration_s": round(duration_s, 4), "ref_id": ref_id, **fields}, needs_plan=True)


def _ref_id(row: FileRow, watch: WatchConfig, sha256: str) -> str:
    """The row's external reference ID for these bytes (a journaled one stands)."""
    if row.sha256 == sha256 and row.ref_id:
        return row.ref_id
    return build_ref_id(watch.name, row.rel_path, sha256)


def _secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


class Asking:
    """A scanning step stopped at its engine call (`call`): `answer` finishes it."""

    def __init__(self, scanner: Scanner, steps: _Steps, call: EngineCall) -> None:
        self._scanner = scanner
        self._steps = steps
        self.call = call

    def answer(self, reply: Callable[[], Verdict | Pending]) -> Outcome:
        """The step finished with the engine's answer: what `reply` returns, or raises (as if
        raised by the engine's `scan` in the step); the engine's health journaled if it changed."""
        try:
            result = self._scanner.asked(self.call.engine.name, reply)
        except Exception as exc:
            return _finish(self._steps.throw, exc)
        return _finish(self._steps.send, result)

    def now(self) -> Outcome:
        """The step finished with its engine asked at once."""
        return self.answer(partial(self.call.engine.scan, self.call.request))

    def close(self) -> None:
        """The step will not be finished: let go of what it holds (the file's bytes)."""
        self._steps.close()


def _finish(resume: Callable[[_T], EngineCall], value: _T) -> Outcome:
    """The step resumed with `value` (its engine's answer, or an error to raise in it), to its end."""
    try:
        resume(value)
    except StopIteration as done:
        return cast(Outcome, done.value)
    raise AssertionError("a scanning step asks its engine once")
