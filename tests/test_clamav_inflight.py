"""Several clamd scans in flight per worker thread, against a real clamd behind a relay that
counts what clamd has at once (docs/engines.md, "Concurrency"): each file its own verdict,
an error ending only its own scan, `concurrency` still the bound, with `workers: 2` too."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from clamd_server import FAILING, SILENT, Clamd, Traffic, counting_relay
from conftest import EICAR, Harness, Layout
from structlog.testing import capture_logs
from test_clamav import _held

from daemon.config import ClamavEngineConfig
from daemon.engines.clamav import ClamavEngine
from daemon.model import FileState, Reason, VerdictKind


@pytest.fixture
def relay(clamd: Clamd) -> Iterator[tuple[Path, Traffic]]:
    """clamd behind a counting relay (a short path: unix socket names are limited)."""
    with tempfile.TemporaryDirectory(prefix="relay-") as folder:
        path = Path(folder) / "clamd.sock"
        with counting_relay(path, clamd.socket) as traffic:
            yield path, traffic


def _harness(layout: Layout, socket: Path, **cfg: object) -> Harness:
    engine_cfg = {"type": "clamav", "socket": str(socket), **cfg}
    engine = ClamavEngine("default", ClamavEngineConfig.model_validate(engine_cfg))
    return Harness(layout, engine, engine_cfg=engine_cfg)


def test_a_batch_in_flight_gets_each_file_its_own_verdict(layout: Layout,
                                                          relay: tuple[Path, Traffic]) -> None:
    socket, traffic = relay
    harness = _harness(layout, socket, concurrency=4, max_size="64KiB")
    infected = {f"e{i}.com" for i in range(3)}
    for name in infected:
        harness.drop(name, EICAR)
    for i in range(11):
        harness.drop(f"c{i}.txt", b"clean %d" % i)
    harness.drop("big.bin", os.urandom(100_000))  # over max_size: never sent, fails alone
    with capture_logs() as logs:
        harness.step()  # one thread, one batch of 15
    assert set(layout.placed("quarantine")) == infected
    assert layout.placed("clean") == sorted(f"c{i}.txt" for i in range(11))
    assert layout.placed("failed") == ["big.bin"] and harness.row("big.bin").reason == Reason.TOO_LARGE
    assert {harness.row(name).threats[0] for name in infected} == {"Scanwatch-Test-EICAR.UNOFFICIAL"}
    assert all(harness.row(f"c{i}.txt").raw_result["mode"] == "fd" for i in range(11))
    verdicts = [e for e in logs if e["event"] == "scan.verdict"]
    asked = [r for r in harness.journal.rows() if r.rel_path != "big.bin"]  # refused from its size
    assert Counter(e["file_id"] for e in verdicts) == Counter({r.id: 1 for r in asked})
    assert all(e["duration_s"] >= 0 for e in verdicts)
    assert traffic.scans == 14 and 2 <= traffic.peak <= 4  # one thread, several scans at once


def test_an_error_in_flight_ends_only_its_own_files_scan(layout: Layout, relay: tuple[Path, Traffic]) -> None:
    """One scan clamd never answers (a retry for its file after `timeout`), one it answers
    with an error (failed `engine_failed`): the scans in flight beside them are answered."""
    socket, traffic = relay
    harness = _harness(layout, socket, concurrency=4, timeout=1)
    harness.drop("silent.txt", SILENT + b" never answered")
    harness.drop("failing.txt", FAILING + b" answered ERROR")
    for i in range(4):
        harness.drop(f"c{i}.txt", b"clean %d" % i)
        harness.drop(f"e{i}.com", EICAR)
    harness.step()
    assert harness.layout.placed("clean") == [f"c{i}.txt" for i in range(4)]
    assert harness.layout.placed("quarantine") == [f"e{i}.com" for i in range(4)]
    assert harness.layout.placed("failed") == ["failing.txt"]
    failing = harness.row("failing.txt")
    assert failing.reason == Reason.ENGINE_FAILED and "Can't allocate memory" in failing.raw_result["error"]
    silent = harness.row("silent.txt")
    assert silent.state is FileState.STABLE and silent.attempts == 1  # due again later
    assert "did not answer" in (silent.last_error or "")
    assert harness.journal.engine_health().get("default", (True,))[0] is True  # not marked down
    assert traffic.peak >= 2 and traffic.now == 0


def test_workers_keep_the_scans_in_flight_to_concurrency(layout: Layout, relay: tuple[Path, Traffic],
                                                         daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """`workers: 2`, `concurrency: 4`: each process's thread has several scans in flight,
    clamd never more than 4 of them at once."""
    socket, traffic = relay
    for i in range(120):
        (layout.inbox / f"f{i:03d}.bin").write_bytes(EICAR if i % 10 == 0 else b"clean %d" % i)
    config = layout.write_config(engine={"type": "clamav", "socket": str(socket), "concurrency": 4},
                                 workers=2)
    daemon = daemon_factory(config)
    daemon.wait_for(lambda: len(daemon.named("file.moved")) >= 120, timeout=60, what="every file moved")
    assert daemon.stop() == 0
    assert len(layout.placed("quarantine")) == 12 and len(layout.placed("clean")) == 108
    assert traffic.scans >= 108 and traffic.peak <= 4  # the EICAR copies after the first: cache hits
    # The worker processes took turns: one had more in flight than it had threads (2 before).
    assert max(traffic.peak_by_pid.values()) >= 3, traffic.peak_by_pid


def test_a_scan_sent_and_cancelled_never_answers_another(layout: Layout, clamd: Clamd) -> None:
    """A batch cut off with scans in flight cancels them: their sessions, whose replies were
    never read, are closed, not pooled, so the next scan reads its own reply."""
    engine = ClamavEngine("default", ClamavEngineConfig(type="clamav", socket=clamd.socket))
    infected, clean = layout.inbox / "e.com", layout.inbox / "c.txt"
    infected.write_bytes(EICAR)
    clean.write_bytes(b"clean")
    with _held(infected) as request:
        sent = engine.send(request)
        sent.cancel()
    assert engine._idle == []
    with _held(clean) as request:
        assert engine.scan(request).kind is VerdictKind.CLEAN
        flying = [engine.send(request) for _ in range(3)]  # each on a session of its own
        assert engine._idle == []
        assert [scan.reply().kind for scan in flying] == [VerdictKind.CLEAN] * 3
    assert len(engine._idle) == 3
    engine.close()
