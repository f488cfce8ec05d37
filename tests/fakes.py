"""In-tree fakes with the real interfaces, for pipeline tests with no server."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from daemon.engines.base import ScanHandle, ScanRequest
from daemon.errors import EngineResubmitError
from daemon.model import Pending, Verdict, VerdictKind

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
