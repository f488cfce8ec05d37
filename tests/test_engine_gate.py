"""One owner of an engine's calls: an engine shared by a single-engine watch and a
multi-engine watch takes at most its `concurrency` at once (docs/engines.md, "Concurrency")."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fakes import FakeLocation, FakeWatcher

from daemon.config import Config
from daemon.engines.base import ScanHandle, ScanRequest
from daemon.journal import Journal, owner_token
from daemon.model import FileState, Pending, Verdict, VerdictKind
from daemon.pipeline import Pipeline
from daemon.retry import RetryPolicy

_FILES = 12


class PeakEngine:
    """An engine that counts its calls in flight and remembers the most at once."""

    remote = False
    reads_s3 = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.peak = 0
        self._now = 0
        self._lock = threading.Lock()

    def scan(self, request: ScanRequest) -> Verdict | Pending:
        with self._lock:
            self._now += 1
            self.peak = max(self.peak, self._now)
        time.sleep(0.03)
        with self._lock:
            self._now -= 1
        return Verdict(VerdictKind.CLEAN)

    def poll(self, scan: ScanHandle) -> Verdict | Pending:
        raise AssertionError("nothing is remote")

    def probe(self) -> str:
        return "peak engine"

    def close(self) -> None:
        pass


def _watch(tmp_path: Path, name: str, engine: str | list[str]) -> dict[str, object]:
    roots = {role: str(tmp_path / name / role) for role in ("source", "clean", "quarantine", "failed")}
    for root in roots.values():
        Path(root).mkdir(parents=True)
    return {"name": name, "engine": engine, "settle_seconds": 0, **roots}


@pytest.mark.parametrize("concurrency", [1, 2])
def test_an_engine_of_a_single_and_a_multi_engine_watch_keeps_to_its_concurrency(
        tmp_path: Path, concurrency: int) -> None:
    config = Config.model_validate({
        "state_dir": str(tmp_path / "state"), "workers": 1,
        "engines": {"x": {"type": "yara", "concurrency": concurrency},
                    "y": {"type": "yara", "concurrency": concurrency}},
        "watches": [_watch(tmp_path, "solo", "x"), _watch(tmp_path, "both", ["x", "y"])]})
    places = {url: FakeLocation(url) for watch in config.watches for url in
              (watch.source, watch.clean, watch.quarantine, watch.failed)}
    journal = Journal(tmp_path / "journal.sqlite3")
    engines = {"x": PeakEngine("x"), "y": PeakEngine("y")}
    pipeline = Pipeline(config, journal, engines, owner=owner_token(),
                        policy=RetryPolicy(base_s=0, max_s=0), places=places)
    for watch in config.watches:
        watcher = FakeWatcher(watch.name, journal, places[watch.source])  # type: ignore[arg-type]
        for i in range(_FILES):
            watcher.arrive(f"f{i}.txt", f"{watch.name} {i}".encode())
    pipeline.start()
    try:
        deadline = time.monotonic() + 60
        while not all(r.state is FileState.DONE for r in journal.rows()):
            assert time.monotonic() < deadline, [r.state for r in journal.rows()]
            pipeline.wake.set()
            time.sleep(0.05)
    finally:
        pipeline.stop(10)
    assert len(places[config.watch("both").clean].objects) == _FILES  # type: ignore[attr-defined]
    assert engines["x"].peak <= concurrency
    assert engines["y"].peak <= concurrency
