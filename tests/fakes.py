"""In-tree fakes with the real interfaces, for pipeline tests with no server."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from daemon.engines.base import ScanHandle, ScanRequest
from daemon.errors import ChangedError, EngineResubmitError
from daemon.fsutil import Identity
from daemon.journal import Journal
from daemon.locations import Content, Listed, MoveRequest, Opened, ReadBy, Source
from daemon.locations.base import MAX_COLLISIONS
from daemon.model import Pending, RowChanges, Verdict, VerdictKind
from daemon.naming import collision_name

EICAR = (Path(__file__).resolve().parent.parent / "samples" / "eicar.com").read_bytes()

Script = Callable[[ScanRequest], Verdict | Pending]


@dataclass
class FakeEngine:
    """An Engine whose answers a test scripts; infected when the bytes hold EICAR."""

    name: str = "fake"
    remote: bool = False
    reads_s3: bool = False
    script: list[Script] = field(default_factory=list)  # consumed one per scan call
    polls: dict[str, list[Verdict | Pending]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)  # (method, ref_id)
    seen: list[bytes] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def scan(self, request: ScanRequest) -> Verdict | Pending:
        with self._lock:
            self.calls.append(("scan", request.ref_id))
            step = self.script.pop(0) if self.script else None
        data = _read(request)
        with self._lock:
            self.seen.append(data)
        if step is not None:
            return step(request)
        if EICAR in data:
            return Verdict(VerdictKind.INFECTED, threats=("Eicar-Test-Signature",))
        return Verdict(VerdictKind.CLEAN)

    def poll(self, scan: ScanHandle) -> Verdict | Pending:
        with self._lock:
            self.calls.append(("poll", scan.ref_id))
            answers = self.polls.get(scan.engine_scan_id or "")
            if not answers:
                raise EngineResubmitError("no such scan", may_duplicate=scan.engine_scan_id is None)
            return answers.pop(0)

    def probe(self) -> str:
        return "fake engine"

    def close(self) -> None:
        pass


def _read(request: ScanRequest) -> bytes:
    """The bytes, when the engine was given a local copy (not for S3 read by the engine)."""
    return b"" if request.fd is None else os.pread(request.fd, request.size + 1, 0)


def raises(exc: BaseException) -> Script:
    """A script step that raises `exc`."""

    def step(_: ScanRequest) -> Verdict | Pending:
        raise exc

    return step


def answers(answer: Verdict | Pending) -> Script:
    """A script step that returns `answer`."""
    return lambda _: answer


class FakeLocation:
    """A place held in memory (a Source, Destination and QuarantineStore): objects by name,
    each version named by the sha256 of its bytes.

    It reads like an S3 prefix (complete objects, pinned by version), so the pipeline's
    steps can be tested with no filesystem and no server.
    """

    settles = False

    def __init__(self, url: str) -> None:
        self.url = url
        self.objects: dict[str, bytes] = {}
        self.sidecars: dict[str, Mapping[str, object]] = {}
        self.tags: dict[str, Mapping[str, str]] = {}

    def put(self, rel_path: str, data: bytes) -> str:
        """Store `data` at `rel_path` (replacing what was there); its version's ETag."""
        self.objects[rel_path] = data
        return _etag(data)

    def name(self, rel_path: str) -> str:
        return self.url + rel_path

    def plan(self, rel_path: str, *, taken: bool = False, placing: MoveRequest | None = None) -> str:
        candidates = (collision_name(rel_path, n) for n in range(MAX_COLLISIONS))
        return next(c for c in candidates if c not in self.objects)

    @contextmanager
    def open_for_scan(self, listed: Listed) -> Iterator[Opened]:
        data = self.objects.get(listed.rel_path)
        if data is None:
            raise FileNotFoundError(listed.rel_path)
        if listed.etag is not None and _etag(data) != listed.etag:
            raise ChangedError(f"{listed.rel_path} was replaced since it was listed")
        fd = os.memfd_create("fake-object")
        try:
            os.write(fd, data)
            yield _FakeOpened(self.name(listed.rel_path), fd, data)
        finally:
            os.close(fd)

    def refuses(self, rel_path: str) -> str | None:
        return None

    def identity_now(self, rel_path: str) -> Identity | None:
        return None

    def receive(self, req: MoveRequest, source: Source) -> bool:
        if req.dest_rel in self.objects:
            raise FileExistsError(req.dest_rel)
        with source.open_bytes(req) as reader:
            self.objects[req.dest_rel] = reader.read()
        self.tags[req.dest_rel] = {**req.tags, "scanwatch-file": req.marker}
        return False

    def holds(self, req: MoveRequest) -> bool:
        return self.tags.get(req.dest_rel, {}).get("scanwatch-file") == req.marker

    def remove(self, req: MoveRequest) -> None:
        if _etag(self.objects.get(req.rel_path, b"")) == req.etag:
            del self.objects[req.rel_path]

    @contextmanager
    def open_bytes(self, req: MoveRequest) -> Iterator[BinaryIO]:
        data = self.objects.get(req.rel_path)
        if data is None:
            raise FileNotFoundError(req.rel_path)
        if _etag(data) != req.etag:
            raise ChangedError(f"{req.rel_path} was replaced since it was scanned")
        yield io.BytesIO(data)

    def write_sidecar(self, rel_path: str, facts: Mapping[str, object]) -> None:
        self.sidecars[rel_path] = facts

    def read_sidecar(self, rel_path: str) -> Any:
        return self.sidecars[rel_path]

    def delete(self, rel_path: str) -> None:
        self.objects.pop(rel_path, None)
        self.sidecars.pop(rel_path, None)


class _FakeOpened:
    def __init__(self, path: str, fd: int, data: bytes) -> None:
        self.path = path
        self._fd = fd
        self._data = data

    @property
    def facts(self) -> RowChanges:
        return {"etag": _etag(self._data), "version_id": None, "size": len(self._data)}

    def content(self, *, read_by: ReadBy = ReadBy.DESCRIPTOR) -> Content:
        return Content(self._fd, hashlib.sha256(self._data).hexdigest(), len(self._data))


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class FakeWatcher:
    """A Watcher whose arrivals a test announces: each one is journaled as a complete object."""

    def __init__(self, watch: str, journal: Journal, source: FakeLocation) -> None:
        self.watch = watch
        self.journal = journal
        self.source = source
        self.started = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.started = False

    def arrive(self, rel_path: str, data: bytes) -> None:
        """`data` appears at `rel_path` in the source, and the watcher records it."""
        etag = self.source.put(rel_path, data)
        self.journal.discover_objects(self.watch, [(rel_path, etag, None, len(data))], time.time())
