"""The pipeline: claims due journal rows, asks the engine, moves the file between its locations.

Each engine has `concurrency` worker threads. A worker claims a small batch of due
rows and carries it one step per journal transaction: scanned (verdict and planned
destination written before any move), then moved (done). Retries are schedules in
the journal, never sleeps. Nothing here is lost with the process: the backlog is
the journal, and `Journal.reclaim` hands a dead worker's rows to the next one.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import structlog
from botocore.exceptions import BotoCoreError
from pydantic import SecretStr

from daemon.config import Config, WatchConfig
from daemon.engines.base import Engine, S3Object, ScanHandle, ScanRequest
from daemon.errors import (
    EnginePermanentError,
    EngineResubmitError,
    EngineRetryableError,
    EngineUnavailableError,
    LocationError,
    UnsafePathError,
)
from daemon.faults import pause
from daemon.fsutil import DirCache, Identity, open_file, sha256_fd, split_rel
from daemon.journal import FileRow, Journal
from daemon.locations import ChangedError, Location, Locations, MoveRequest, S3Location, transfer
from daemon.model import FileState, Pending, Reason, Verdict, VerdictKind
from daemon.refid import build_ref_id
from daemon.retry import RetryPolicy
from daemon.s3 import S3Clients, S3Unavailable, flat_name, is_s3, local_rel

__all__ = ["Pipeline", "iso"]

log = structlog.get_logger("scanwatch.pipeline")

_BATCH = 16
_COPY_CHUNK = 1 << 20
_PRESIGN_S = 3600
_FREE_SPACE_RESERVE = 64 * 2**20
_TAG_VALUE = re.compile(r"[^\w .:/=+@-]")
_IDLE_WAIT_S = 1.0
_DEST_FOR = {VerdictKind.CLEAN: "clean", VerdictKind.INFECTED: "quarantine",
             VerdictKind.FAILED: "failed"}
Changes = dict[str, object]


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC with a Z, as sidecars and status print times."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class _Outcome:
    """What one step did to a row: the journal change and the event to log."""

    changes: Changes
    event: str | None = None
    fields: Mapping[str, Any] | None = None


class Pipeline:
    """Worker threads that carry claimed rows to their destination."""

    def __init__(self, config: Config, journal: Journal, engines: Mapping[str, Engine], *,
                 owner: str, wake: threading.Event | None = None,
                 clock: Callable[[], float] = time.time,
                 policy: RetryPolicy | None = None,
                 on_outcome: Callable[[FileRow, str, Changes, Mapping[str, Any]], None]
                 | None = None) -> None:
        self.config = config
        self.journal = journal
        self.engines = engines
        self.owner = owner
        self.wake = wake or threading.Event()
        self.clock = clock
        self.policy = policy or RetryPolicy()
        self._on_outcome = on_outcome
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._engine_down: dict[str, bool] = {}
        self.heartbeat_at = clock()
        # Made now, so that a watch's S3 settings that boto3 cannot use stop the start.
        self.s3 = S3Clients()
        for watch in config.watches:
            if uses_s3(watch):
                self.s3(config.s3_for(watch))
        self.work_dir = config.state_dir / "work"

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start `concurrency` workers per engine that has watches."""
        # Health changes are journaled against what the journal says (the start-up probe's view).
        health = self.journal.engine_health()
        self._engine_down = {name: not healthy for name, (healthy, _, _) in health.items()}
        for name, engine_cfg in self.config.engines.items():
            watches = [w.name for w in self.config.watches if w.engine == name]
            if not watches:
                continue
            for i in range(engine_cfg.concurrency):
                thread = threading.Thread(target=self._work, args=(watches,),
                                          name=f"scan-{name}-{i}", daemon=True)
                thread.start()
                self._threads.append(thread)

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
        return drained

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
        """Claim one batch of due rows and carry it as far as it goes; returns its size."""
        rows = self.journal.claim(watches, self.owner, self.clock(), _BATCH)
        if rows:
            self.process(rows)
        return len(rows)

    # -- one batch ------------------------------------------------------------------------

    def process(self, rows: list[FileRow]) -> None:
        """Carry claimed rows one step per transaction: scanned, then moved."""
        try:
            with DirCache() as dirs:
                self._process(rows, Locations(self.config, dirs, self.s3))
        except BaseException:
            # Whatever an unexpected error left claimed goes back to the queue.
            self.journal.release(self.owner, [row.id for row in rows])
            raise

    def _process(self, rows: list[FileRow], locations: Locations) -> None:
        scanned: list[tuple[FileRow, _Outcome]] = []
        for row in rows:
            if row.state is FileState.SCANNING:
                scanned.append((row, self._guard(row, partial(self._scan, locations=locations))))
            elif row.state is FileState.VERDICT:
                replan = partial(self._plan_move, changes={"state": FileState.MOVING})
                scanned.append((row, self._guard(row, replan)))
            else:
                scanned.append((row, _Outcome({})))
        self._commit(scanned)
        moved: list[tuple[FileRow, _Outcome]] = []
        for row, outcome in scanned:
            if outcome.changes.get("state", row.state) is FileState.MOVING:
                # A row claimed while moving was cut off by a crash: finish what it started.
                resumed = row.state is FileState.MOVING
                current = dataclasses.replace(row, **outcome.changes)  # type: ignore[arg-type]
                step = partial(self._move, locations=locations, resumed=resumed)
                moved.append((current, self._guard(current, step)))
        self._commit(moved)

    def _commit(self, outcomes: list[tuple[FileRow, _Outcome]]) -> None:
        self.journal.apply((row.id, o.changes) for row, o in outcomes if o.changes)
        for row, outcome in outcomes:
            if outcome.event:
                fields = outcome.fields or {}
                logger = log.info
                if outcome.event in ("retry.scheduled", "move.failed"):
                    logger = log.warning
                elif fields.get("outcome") == VerdictKind.FAILED:
                    logger = log.error
                logger(outcome.event, **{**self._context(row), **fields})
            if self._on_outcome and outcome.changes:
                engine = self.config.watch(row.watch).engine
                self._on_outcome(row, engine, outcome.changes, outcome.fields or {})

    def _context(self, row: FileRow) -> dict[str, Any]:
        return {"watch": row.watch, "rel_path": row.rel_path, "file_id": row.id,
                "engine": self.config.watch(row.watch).engine, "ref_id": row.ref_id}

    def is_alive(self) -> bool:
        """Workers run and turn over: each engine call is bounded by its timeout."""
        stall_s = max(e.timeout for e in self.config.engines.values()) + 30
        return (all(t.is_alive() for t in self._threads)
                and self.clock() - self.heartbeat_at < stall_s)

    def _guard(self, row: FileRow, step: Callable[[FileRow], _Outcome]) -> _Outcome:
        """Run a step; an unexpected error fails the file instead of killing the worker."""
        self.heartbeat_at = self.clock()
        try:
            return step(row)
        except Exception as exc:
            log.exception("file.internal_error", **self._context(row))
            if row.state is FileState.MOVING and row.verdict is not None:
                return self._move_failed(row, exc)
            changes = self._verdict_changes(row, Verdict.failed(Reason.INTERNAL_ERROR))
            try:
                return self._plan_move(row, changes)
            except Exception as again:  # never hand the batch back: this row waits its turn
                log.exception("file.internal_error", **self._context(row))
                return self._move_failed(row, again, {**changes, "state": FileState.VERDICT})

    # -- scanning -----------------------------------------------------------------------------

    def _scan(self, row: FileRow, locations: Locations) -> _Outcome:
        watch = self.config.watch(row.watch)
        engine = self.engines[watch.engine]
        if is_s3(watch.source):
            return self._scan_s3(row, watch, engine, locations)
        parents, name = split_rel(row.rel_path)
        try:
            dir_fd = locations.dirs.open(watch.source, parents)
        except FileNotFoundError:
            return self._gone(row)
        except UnsafePathError as exc:
            return self._held(row, Reason.SYMLINK, str(exc))
        try:
            with open_file(dir_fd, name) as (fd, st):
                return self._scan_open(row, watch, engine, fd, st)
        except FileNotFoundError:
            return self._gone(row)
        except UnsafePathError as exc:
            return self._held(row, exc.args[1] if len(exc.args) > 1 else Reason.SPECIAL_FILE, str(exc))
        except PermissionError as exc:
            return self._fail(row, Reason.UNREADABLE, exc)
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EISDIR, errno.ENXIO):
                return self._fail(row, Reason.UNREADABLE, exc)
            raise

    def _scan_open(self, row: FileRow, watch: WatchConfig, engine: Engine, fd: int,
                   st: os.stat_result) -> _Outcome:
        identity = Identity.of(st)
        if row.identity is not None and identity != row.identity:
            return self._changed(row, "changed after it settled")
        facts: Changes = {"dev": identity.dev, "inode": identity.inode, "size": identity.size,
                          "mtime_ns": identity.mtime_ns, "ctime_ns": identity.ctime_ns}
        path = os.path.join(watch.source, row.rel_path)
        # A submitted scan is followed on the identity of the open file alone: the bytes are
        # hashed again only to be submitted again, and the mover verifies a clean file's hash.
        followed = self._follow(row, watch, engine, path, facts)
        if isinstance(followed, _Outcome):
            return followed
        try:
            sha256 = sha256_fd(fd)
        except OSError as exc:
            return self._fail(row, Reason.UNREADABLE, exc)
        pause("scan.hashed")
        request = ScanRequest(watch.name, row.rel_path, path, fd, st.st_size, sha256, "",
                              archive_password=_secret(watch.archivepwd),
                              by_upload=followed is not None and followed.by_upload)
        return self._ask(row, watch, engine, request, facts, followed)

    def _scan_s3(self, row: FileRow, watch: WatchConfig, engine: Engine, locations: Locations) -> _Outcome:
        """Scan the listed version of an object: downloaded to a private temp file, or
        handed to an engine that reads S3 itself (then only hashed on the way past)."""
        source = locations(watch.source, watch)
        assert isinstance(source, S3Location)
        if any(not is_s3(root) for root in watch.destinations.values()):
            try:
                local_rel(row.rel_path)
            except UnsafePathError as exc:
                return self._fail(row, Reason.UNSAFE_KEY, exc)
        # A submitted scan is of the version journaled with it: polls neither look nor download.
        followed = self._follow(row, watch, engine, source.name(row.rel_path), {}) if row.etag else None
        if isinstance(followed, _Outcome):
            return followed
        by_upload = followed is not None and followed.by_upload
        try:
            etag, version_id, size = row.etag, row.version_id, row.size
            if etag is None:  # replaced since it was listed: take the version there now
                head = source.head(row.rel_path)
                if head is None:
                    return self._gone(row)
                etag, version_id = str(head["ETag"]), head.get("VersionId")
                size = int(head["ContentLength"])
            elif engine.reads_s3 and version_id is None and not by_upload:
                version_id = self._version_of(source, row.rel_path, etag)
            self._ensure_room(size or 0)
            # An engine reads S3 itself only where a VersionId pins what it reads
            # (docs/integrity.md, "Remote engines"); otherwise it gets the hashed copy.
            by_engine = engine.reads_s3 and version_id is not None and not by_upload
            obj = S3Object(source.where.bucket, source.key(row.rel_path), etag, version_id,
                           self._presign(source, row.rel_path, version_id) if by_engine else "")
            facts: Changes = {"etag": etag, "version_id": version_id}
            body = source.get(row.rel_path, etag, version_id)
            with body, tempfile.TemporaryFile(dir=self.work_dir) as temp:
                out = None if by_engine else temp.fileno()
                sha256, size = _copy_hashing(body, out)
                request = ScanRequest(watch.name, row.rel_path, source.name(row.rel_path), out, size,
                                      sha256, "", s3=obj, archive_password=_secret(watch.archivepwd),
                                      by_upload=by_upload)
                return self._ask(row, watch, engine, request, {**facts, "size": size}, followed)
        except ChangedError as exc:
            return self._changed(row, str(exc))
        except FileNotFoundError:
            return self._gone(row)
        except S3Unavailable as exc:
            return self._wait(row, "source.unavailable", exc)

    def _version_of(self, source: S3Location, rel_path: str, etag: str) -> str | None:
        """The VersionId of the listed version (a listing names none), if it is still current."""
        head = source.head(rel_path)
        return head.get("VersionId") if head is not None and str(head["ETag"]) == etag else None

    def _ensure_room(self, size: int) -> None:
        """Downloads for scanning never fill the disk of `state_dir`."""
        self.work_dir.mkdir(mode=0o700, exist_ok=True)
        if shutil.disk_usage(self.work_dir).free < size + _FREE_SPACE_RESERVE:
            raise S3Unavailable(f"not enough free space in {self.work_dir} for {size} bytes")

    def _presign(self, source: S3Location, rel_path: str, version_id: str | None) -> str:
        params = {"Bucket": source.where.bucket, "Key": source.key(rel_path)}
        if version_id:
            params["VersionId"] = version_id
        return str(source.client.generate_presigned_url("get_object", Params=params, ExpiresIn=_PRESIGN_S))

    def _follow(self, row: FileRow, watch: WatchConfig, engine: Engine, path: str,
                facts: Changes) -> _Outcome | EngineResubmitError | None:
        """Poll the row's submitted (or in-doubt) remote scan without its bytes.

        None: nothing was submitted; an `EngineResubmitError`: submit the bytes again.
        """
        if row.sha256 is None or row.ref_id is None:
            return None
        if row.engine_scan_id is None and (row.submitting_at is None or not engine.remote):
            return None
        handle = ScanHandle(watch.name, row.rel_path, path, row.sha256, row.ref_id, row.engine_scan_id)
        started = time.monotonic()
        try:
            answer = self._call(row, watch, engine, partial(engine.poll, handle))
        except EngineResubmitError as exc:
            log.info("scan.resubmitting", **self._context(row), error=str(exc),
                     in_doubt=row.engine_scan_id is None, may_duplicate=exc.may_duplicate)
            return exc
        if isinstance(answer, _Outcome):
            return answer
        event = "scan.found" if row.engine_scan_id is None else None
        return self._answered(row, answer, facts, row.sha256, row.ref_id, time.monotonic() - started,
                              event, {})

    def _ask(self, row: FileRow, watch: WatchConfig, engine: Engine, request: ScanRequest,
             facts: Changes, resubmit: EngineResubmitError | None = None) -> _Outcome:
        """Ask the engine about the bytes of `request`; `facts` say which version they were."""
        sha256 = request.sha256
        ref_id = row.ref_id if row.sha256 == sha256 and row.ref_id else build_ref_id(
            watch.name, row.rel_path, sha256)
        if engine.remote:
            # A remote scan outlives us: the submission is journaled as in doubt, in its own
            # transaction, before the engine sees it (docs/integrity.md, "Remote engines").
            self.journal.apply([(row.id, {"sha256": sha256, "ref_id": ref_id, "engine": engine.name,
                                          "submitting_at": self.clock(), **facts})])
        request = dataclasses.replace(request, ref_id=ref_id)
        started = time.monotonic()
        answer = self._call(row, watch, engine, partial(engine.scan, request))
        if isinstance(answer, _Outcome):
            return answer
        if engine.remote and isinstance(answer, Pending):
            # ...and the scan's ID right after the answer, before anything else of the batch.
            self.journal.apply([(row.id, {"engine_scan_id": answer.engine_scan_id,
                                          "submitting_at": None})])
        repeated = {"resubmitted": True} if resubmit is not None and resubmit.may_duplicate else {}
        return self._answered(row, answer, facts, sha256, ref_id, time.monotonic() - started,
                              "scan.submitted", repeated)

    def _call(self, row: FileRow, watch: WatchConfig, engine: Engine,
              ask: Callable[[], Verdict | Pending]) -> Verdict | Pending | _Outcome:
        """The engine's answer, or what its error means for the row (retry, wait, failed)."""
        engine_cfg = self.config.engines[watch.engine]
        try:
            answer = ask()
            self._set_engine_health(engine.name, None)
            return answer
        except EngineUnavailableError as exc:
            self._set_engine_health(engine.name, str(exc))
            if self.clock() - row.discovered_at <= engine_cfg.max_pending_age:
                # Not reached: nothing can have been submitted.
                outcome = self._wait_for_engine(row, exc)
                return dataclasses.replace(outcome, changes={**outcome.changes, "submitting_at": None})
            return Verdict.failed(Reason.ENGINE_UNAVAILABLE, raw={"error": str(exc)})
        except EngineRetryableError as exc:
            # A timeout or a 5xx may hide a submission: it stays in doubt.
            if row.attempts < engine_cfg.max_attempts:
                return self._retry(row, exc)
            return Verdict.failed(exc.reason, raw={"error": str(exc)})
        except EnginePermanentError as exc:
            if exc.reason == Reason.AUTH:  # every file will fail alike: raise the alarm
                self._set_engine_health(engine.name, str(exc))
            return Verdict.failed(exc.reason, raw={"error": str(exc)})

    def _answered(self, row: FileRow, answer: Verdict | Pending, facts: Changes, sha256: str,
                  ref_id: str, duration_s: float, event: str | None, fields: Mapping[str, Any]
                  ) -> _Outcome:
        """What the engine's answer changes: a scan to poll, or a verdict and its destination."""
        if isinstance(answer, Pending):
            return _Outcome(
                {"engine_scan_id": answer.engine_scan_id, "owner": None, "submitting_at": None,
                 "sha256": sha256, "ref_id": ref_id, **facts,
                 "next_attempt_at": self.clock() + answer.poll_after_s},
                event, {"engine_scan_id": answer.engine_scan_id, **fields})
        changes = {**self._verdict_changes(row, answer), **facts, "sha256": sha256}
        # A re-submission (`<id>.2`) is the ID the engine knows the verdict by.
        changes.update(ref_id=str(answer.raw.get("external_reference_id", ref_id)),
                       engine=self.config.watch(row.watch).engine)
        outcome = self._plan_move(row, changes)
        return _Outcome(outcome.changes, outcome.event or "scan.verdict", {
            "verdict": answer.kind.value, "threats": list(answer.threats), "reason": answer.reason,
            "duration_s": round(duration_s, 4), "ref_id": ref_id, **fields, **(outcome.fields or {})})

    def _set_engine_health(self, name: str, error: str | None) -> None:
        """Journal an engine going down or coming back (only the changes)."""
        is_down = error is not None
        if self._engine_down.get(name, False) == is_down:
            return
        self._engine_down[name] = is_down
        self.journal.set_engine_health(name, not is_down, error or "answering", self.clock())
        if is_down:
            log.warning("engine.unhealthy", engine=name, error=error)
        else:
            log.info("engine.recovered", engine=name)

    def _verdict_changes(self, row: FileRow, verdict: Verdict) -> Changes:
        return {
            "state": FileState.MOVING, "verdict": verdict.kind, "reason": verdict.reason,
            "threats": list(verdict.threats), "raw_result": verdict.raw or None,
            "engine_scan_id": verdict.engine_scan_id or row.engine_scan_id,
            "submitting_at": None, "scanned_at": self.clock()}

    def _plan_move(self, row: FileRow, changes: Changes, locations: Locations | None = None) -> _Outcome:
        """Choose the destination name now, so a crash mid-move can be finished."""
        verdict = VerdictKind(str(changes.get("verdict", row.verdict)))
        # A key or name that cannot be a path or key there goes to `failed` under one flat, safe name.
        is_flat = changes.get("reason", row.reason) in (Reason.UNSAFE_KEY, Reason.UNSAFE_NAME)
        rel_path = flat_name(row.rel_path) if is_flat else row.rel_path
        try:
            with DirCache() as dirs:
                dest = self._destination(locations or Locations(self.config, dirs, self.s3), row, verdict)
                return _Outcome({**changes, "destination": dest.name(dest.plan(rel_path))})
        except UnsafePathError as exc:
            if is_flat:
                return self._move_failed(row, exc, {**changes, "state": FileState.VERDICT})
            # Kept: the facts, and the threats of an infected file its quarantine cannot name.
            threats = changes.get("threats", row.threats)
            failed = Verdict.failed(Reason.UNSAFE_NAME, raw={"error": str(exc)},
                                    threats=tuple(map(str, threats)) if isinstance(threats, list) else ())
            return self._plan_move(row, {**changes, **self._verdict_changes(row, failed)}, locations)
        except (OSError, LocationError) as exc:
            return self._move_failed(row, exc, {**changes, "state": FileState.VERDICT})

    def _destination(self, locations: Locations, row: FileRow, verdict: VerdictKind) -> Location:
        watch = self.config.watch(row.watch)
        return locations(watch.destinations[_DEST_FOR[verdict]], watch)

    def _fail(self, row: FileRow, reason: Reason, exc: BaseException) -> _Outcome:
        return self._plan_move(row, self._verdict_changes(
            row, Verdict.failed(reason, raw={"error": str(exc)})))

    def _retry(self, row: FileRow, exc: EngineRetryableError) -> _Outcome:
        delay_s = self.policy.delay(row.attempts, exc.retry_after_s)
        return _Outcome(
            {"state": FileState.STABLE, "owner": None, "last_error": str(exc),
             "next_attempt_at": self.clock() + delay_s},
            "retry.scheduled", {"reason": exc.reason.value, "error": str(exc),
                                "attempts": row.attempts, "delay_s": round(delay_s, 3)})

    def _wait_for_engine(self, row: FileRow, exc: EngineUnavailableError) -> _Outcome:
        return self._wait(row, Reason.ENGINE_UNAVAILABLE, exc, exc.retry_after_s)

    def _wait(self, row: FileRow, reason: str, exc: Exception, retry_after_s: float | None = None
              ) -> _Outcome:
        """Try again later without spending an attempt: what is missing is not the file's fault."""
        delay_s = self.policy.delay(row.attempts, retry_after_s)
        return _Outcome(
            {"state": FileState.STABLE, "owner": None, "last_error": str(exc),
             "attempts": row.attempts - 1, "next_attempt_at": self.clock() + delay_s},
            "retry.scheduled", {"reason": reason, "error": str(exc), "delay_s": round(delay_s, 3)})

    def _held(self, row: FileRow, reason: Reason, detail: str) -> _Outcome:
        return _Outcome({"state": FileState.HELD, "reason": reason, "owner": None,
                         "done_at": self.clock()}, "file.skipped",
                        {"reason": reason.value, "detail": detail})

    def _gone(self, row: FileRow) -> _Outcome:
        return _Outcome({"state": FileState.GONE, "owner": None, "done_at": self.clock()},
                        "file.vanished")

    def _changed(self, row: FileRow, detail: str) -> _Outcome:
        # A local file settles again; an S3 object is complete: scan the version there now.
        s3 = is_s3(self.config.watch(row.watch).source)
        return _Outcome({"state": FileState.STABLE if s3 else FileState.DISCOVERED, "owner": None,
                         "verdict": None, "reason": None, "destination": None, "size": None,
                         "etag": None, "version_id": None, "next_attempt_at": self.clock(),
                         # A pending remote scan was of the old bytes: never follow it.
                         "engine_scan_id": None, "sha256": None, "ref_id": None,
                         "submitting_at": None},
                        "file.changed", {"detail": detail})

    # -- moving ---------------------------------------------------------------------------------

    def _move(self, row: FileRow, locations: Locations, resumed: bool = False) -> _Outcome:
        pause("move.start")
        watch = self.config.watch(row.watch)
        if not is_s3(watch.source) and row.identity is None:
            # Failed before it could be read: move whatever is there.
            return self._move_unread(row, watch.source, locations, resumed)
        verdict = VerdictKind(str(row.verdict))
        source, dest = locations(watch.source, watch), self._destination(locations, row, verdict)
        assert row.destination is not None
        request = MoveRequest(
            file_id=row.id, rel_path=row.rel_path, dest_rel=row.destination.removeprefix(dest.name("")),
            size=row.size or 0, sha256=row.sha256, verify=verdict is VerdictKind.CLEAN,
            private=verdict is VerdictKind.INFECTED, identity=row.identity, etag=row.etag,
            version_id=row.version_id, tags={"scanwatch-verdict": verdict.value,
                                             "scanwatch-reason": _TAG_VALUE.sub("_", row.reason or "")})
        try:
            request = self._transfer(row, request, source, dest, resumed)
        except ChangedError as exc:
            return self._changed(row, str(exc))
        except FileNotFoundError:
            return self._gone(row)
        except S3Unavailable as exc:
            return self._move_failed(row, exc, attempts=row.move_attempts)
        except (OSError, LocationError) as exc:
            return self._move_failed(row, exc)
        if verdict is not VerdictKind.CLEAN:
            try:
                dest.write_sidecar(request.dest_rel, self.sidecar(row, dest.name(request.dest_rel)))
            except (OSError, LocationError) as exc:
                # The file is in place: stay `moving`, so the retry finishes this move.
                return self._move_failed(row, exc, {"state": FileState.MOVING})
        return self._placed(row, dest.name(request.dest_rel), verdict)

    def _transfer(self, row: FileRow, request: MoveRequest, source: Location, dest: Location,
                  resumed: bool) -> MoveRequest:
        """Move to the planned name; if it was taken meanwhile, journal a new plan and retry."""
        for _ in range(100):
            try:
                transfer(request, source, dest, resumed=resumed)
                return request
            except FileExistsError:
                dest_rel = dest.plan(row.rel_path, taken=True)
                self.journal.apply([(row.id, {"destination": dest.name(dest_rel)})])
                request = dataclasses.replace(request, dest_rel=dest_rel)
                resumed = False
        raise LocationError(f"{dest.url}: no free name for {row.rel_path}")

    def _move_unread(self, row: FileRow, source: str, locations: Locations, resumed: bool) -> _Outcome:
        """A file that could not be read still leaves the source, for `failed`."""
        parents, name = split_rel(row.rel_path)
        try:
            st = os.stat(name, dir_fd=locations.dirs.open(source, parents), follow_symlinks=False)
            return self._move(dataclasses.replace(row, **_identity_fields(st)), locations, resumed)
        except FileNotFoundError:
            return self._gone(row)
        except (OSError, LocationError) as exc:
            return self._move_failed(row, exc)

    def _placed(self, row: FileRow, destination: str, verdict: VerdictKind) -> _Outcome:
        now = self.clock()
        return _Outcome(
            {"state": FileState.DONE, "destination": destination, "owner": None, "done_at": now,
             "last_error": None},
            "file.moved",
            {"outcome": verdict.value, "reason": row.reason, "threats": row.threats or [],
             "destination": destination, "attempts": row.attempts, "sha256": row.sha256,
             "size": row.size, "duration_s": round(now - row.discovered_at, 4)})

    def _move_failed(self, row: FileRow, exc: BaseException, changes: Changes | None = None,
                     attempts: int | None = None) -> _Outcome:
        """Leave the file where it is and try the move again later."""
        attempts = row.move_attempts + 1 if attempts is None else attempts
        delay_s = self.policy.delay(attempts)
        return _Outcome(
            {"state": FileState.VERDICT, **(changes or {}), "owner": None,
             "move_attempts": attempts, "last_error": str(exc),
             "next_attempt_at": self.clock() + delay_s},
            "move.failed", {"error": str(exc), "move_attempts": attempts,
                            "delay_s": round(delay_s, 3)})

    def sidecar(self, row: FileRow, destination: str) -> dict[str, object]:
        """The facts of contract.md for `<name>.scanwatch.json`."""
        watch = self.config.watch(row.watch)
        return {
            "source": watch.source.rstrip("/") + "/" + row.rel_path,
            "destination": destination,
            "verdict": row.verdict,
            "reason": row.reason,
            "threats": row.threats or [],
            "engine": watch.engine,
            "engine_scan_id": row.engine_scan_id,
            "external_reference_id": row.ref_id,
            "sha256": row.sha256,
            "size": row.size,
            "detected_at": iso(row.discovered_at),
            "scanned_at": iso(row.scanned_at),
        }


def uses_s3(watch: WatchConfig) -> bool:
    """True when the watch reads from or writes to S3."""
    return any(is_s3(loc) for loc in (watch.source, *watch.destinations.values()))


def _copy_hashing(body: Any, out_fd: int | None) -> tuple[str, int]:
    """Read a download to its end, into `out_fd` if given; its sha256 and size."""
    digest = hashlib.sha256()
    size = 0
    try:
        while chunk := body.read(_COPY_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            view = memoryview(chunk)
            while out_fd is not None and view:
                view = view[os.write(out_fd, view):]
    except (BotoCoreError, OSError) as exc:
        raise S3Unavailable(f"download failed: {exc}") from exc
    return digest.hexdigest(), size


def _secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


def _identity_fields(st: os.stat_result) -> dict[str, Any]:
    return {"dev": st.st_dev, "inode": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
