"""`scanwatch scan`: scan named files now, and with `--move` carry them through the pipeline."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.config import Config, WatchConfig
from daemon.engines import Engine
from daemon.engines.base import ScanRequest
from daemon.errors import (
    EnginePermanentError,
    EngineResubmitError,
    EngineRetryableError,
    LocationError,
    UnsafePathError,
)
from daemon.fsutil import DirCache
from daemon.journal import FileRow, Journal, owner_token
from daemon.locations import Listed, LocalLocation, S3Location, Source
from daemon.model import FileState, Pending, Reason, ScanRecord, Verdict, VerdictKind
from daemon.pipeline import Pipeline
from daemon.pipeline.multi import decide
from daemon.pipeline.scanning import too_large
from daemon.refid import build_ref_id
from daemon.s3client import make_client
from daemon.s3url import is_s3
from daemon.watchers.base import relative_path

__all__ = ["ScanResult", "scan_paths", "watch_verdict"]

_WAIT_FOR_DAEMON_S = 300.0
_OWN_TRIES = 3
_FINAL = (FileState.DONE, FileState.GONE, FileState.HELD)


@dataclass(frozen=True)
class ScanResult:
    """One line of `scan` output."""

    path: str
    verdict: VerdictKind
    threats: tuple[str, ...] = ()
    reason: str | None = None
    sha256: str | None = None
    external_reference_id: str | None = None
    destination: str | None = None


def _relative(source: str, path: str) -> str | None:
    """`path` relative to a watch's source (a directory or an S3 prefix), or None."""
    if is_s3(source) or is_s3(path):
        rel = path.removeprefix(source)
        return rel if is_s3(source) and rel != path and rel else None
    return relative_path(source, path)


def pick_watch(config: Config, path: str, name: str | None) -> WatchConfig:
    """The watch named, else the one whose source holds `path`, else the only one."""
    if name is not None:
        return config.watch(name)
    for watch in config.watches:
        if _relative(watch.source, path) is not None:
            return watch
    if len(config.watches) == 1:
        return config.watches[0]
    raise KeyError(f"{path} is under no watch's source; name one with --watch")


def scan_paths(config: Config, engines: dict[str, Engine], paths: list[str], *,
               watch_name: str | None, move: bool, journal: Journal | None) -> list[ScanResult]:
    """Scan each path (and move it as the daemon would, when `move` and under a source)."""
    results = []
    started_at = _process_started_at()
    for given in paths:
        path = given if is_s3(given) else os.path.abspath(given)
        watch = pick_watch(config, path, watch_name)
        rel = _relative(watch.source, path)
        if move and rel is not None and journal is not None:
            results.append(_through_pipeline(config, engines, journal, watch, rel, path, started_at))
        else:
            results.append(_scan_only(config, engines, watch, path, rel))
    return results


def _process_started_at() -> float:
    """When this command was started (its process's start, from /proc), as a UTC timestamp:
    a file the daemon placed since was there when the command was given."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        age_s = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - age_s


def _scan_only(config: Config, engines: dict[str, Engine], watch: WatchConfig, path: str,
               rel: str | None) -> ScanResult:
    """Scan a file or an S3 object (a private temp copy of it) with the watch's engines, without
    moving it; several engines are asked one after the other until one finds it infected."""
    folder, _, name = path.rpartition("/")
    try:
        with DirCache() as dirs, _location(config, watch, folder, dirs).open_for_scan(Listed(name)) as opened:
            if too_large(config, watch, opened.facts.get("size"), "found") is not None:  # not hashed
                return ScanResult(path, VerdictKind.FAILED, reason=Reason.TOO_LARGE.value)
            content = opened.content()
            ref_id = build_ref_id(watch.name, rel or name, content.sha256)
            request = ScanRequest(watch.name, rel or name, path, content.fd, content.size,
                                  content.sha256, ref_id, original=path)
            verdict = watch_verdict(engines, watch, request)
            return ScanResult(path, verdict.kind, verdict.threats, verdict.reason, content.sha256, ref_id)
    except (OSError, LocationError) as exc:
        return ScanResult(path, VerdictKind.FAILED, reason=_read_reason(exc))


def _location(config: Config, watch: WatchConfig, folder: str, dirs: DirCache) -> Source:
    """The folder or S3 prefix holding a file named on the command line."""
    if not is_s3(folder):
        return LocalLocation(folder, dirs)
    s3 = config.s3_for(watch)
    return S3Location(folder + "/", make_client(s3), s3)


def _read_reason(exc: BaseException) -> str:
    if isinstance(exc, UnsafePathError):
        return exc.reason.value
    return Reason.UNREADABLE.value


def watch_verdict(engines: dict[str, Engine], watch: WatchConfig, request: ScanRequest) -> Verdict:
    """The watch's verdict on the bytes: its one engine's, or as several engines decide."""
    if len(watch.engines) == 1:
        return _verdict(engines[watch.engines[0]], request)
    records: dict[str, ScanRecord] = {}
    for name in watch.engines:
        answer = _verdict(engines[name], request)
        records[name] = ScanRecord(0, name, request.sha256, request.ref_id, answer.engine_scan_id,
                                   answer.kind, answer.reason, list(answer.threats))
        if answer.kind is VerdictKind.INFECTED:
            break
    decided = decide(watch.engines, records)
    assert decided is not None
    return decided


def _verdict(engine: Engine, request: ScanRequest) -> Verdict:
    """Ask the engine and wait for its answer, retrying passing failures a few times."""
    pending: Pending | None = None
    failures = 0
    while True:
        try:
            answer = (engine.poll(request.handle(pending.engine_scan_id)) if pending is not None
                      else engine.scan(request))
        except EngineResubmitError as exc:  # the scan is lost: this process still holds the bytes
            failures += 1
            if failures == _OWN_TRIES:
                return Verdict.failed(Reason.ENGINE_FAILED)
            pending, request = None, dataclasses.replace(request, by_upload=exc.by_upload)
            continue
        except EngineRetryableError as exc:
            failures += 1
            if failures == _OWN_TRIES:
                return Verdict.failed(exc.reason)
            time.sleep(min(exc.retry_after_s or 1.0, 10.0))
            continue
        except EnginePermanentError as exc:
            return Verdict.failed(exc.reason)
        if isinstance(answer, Verdict):
            return answer
        pending = answer
        time.sleep(answer.poll_after_s)


def _through_pipeline(config: Config, engines: dict[str, Engine], journal: Journal,
                      watch: WatchConfig, rel: str, path: str, started_at: float) -> ScanResult:
    """Journal the file and carry it to its destination, or wait for the daemon that holds it.

    A file the daemon took out of the source while this command ran is reported as the
    daemon placed it: `scan --move` is safe beside a running daemon (docs/contract.md)."""
    now = time.time()
    try:
        if is_s3(path):
            s3 = config.s3_for(watch)
            head = S3Location(watch.source, make_client(s3), s3).head(rel)
            if head is None:
                raise FileNotFoundError(path)
            journal.discover_objects(watch.name, [(rel, str(head["ETag"]), head.get("VersionId"),
                                                   int(head["ContentLength"]))], now)
        else:
            journal.discover(watch.name, [(rel, os.lstat(path).st_ino)], now)
    except (OSError, LocationError) as exc:
        # Gone from the source: taken by the daemon since this command started, or failed.
        row = journal.latest(watch.name, rel) if isinstance(exc, FileNotFoundError) else None
        if row is None or (row.state in _FINAL and (row.done_at or 0) < started_at):
            return ScanResult(path, VerdictKind.FAILED, reason=_read_reason(exc))
    else:
        row = journal.active(watch.name, rel)
        if row is not None and row.state is FileState.DISCOVERED:
            journal.apply([(row.id, {"state": FileState.STABLE, "stable_at": now, "next_attempt_at": now})])
    owner = owner_token()
    deadline = time.monotonic() + _WAIT_FOR_DAEMON_S
    tries = 0
    while row is not None and row.state not in _FINAL and time.monotonic() < deadline:
        # Claimable: ours to carry (a few retries); otherwise the daemon holds it: wait.
        claimed = journal.claim_id(row.id, owner, time.time())
        if claimed is not None:
            if tries == _OWN_TRIES:
                journal.release(owner, [row.id])  # the daemon takes it from here
                break
            tries += 1
            Pipeline(config, journal, engines, owner=owner).process([claimed])
        row = journal.get(row.id)
        if row is not None and row.state not in _FINAL:
            time.sleep(min(max(row.next_attempt_at - time.time(), 0.2), 10.0))
    return _result(path, row)


def _result(path: str, row: FileRow | None) -> ScanResult:
    """What `scan` prints for a file carried to its destination (or failed on the way)."""
    if row is None or row.state is not FileState.DONE or row.verdict is None:
        reason = row.reason if row is not None and row.reason else "not_moved"
        if row is not None and row.last_error:
            reason = f"{reason}: {row.last_error}"
        return ScanResult(path, VerdictKind.FAILED, reason=reason)
    return ScanResult(path, VerdictKind(row.verdict), tuple(row.threats or ()), row.reason,
                      row.sha256, row.ref_id, row.destination)
