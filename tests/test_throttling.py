"""Rate limits are pacing, not failure (docs/engines.md#rate-limits): 429 and 503 spend no
attempt, the engine's rate adapts and is shown; the real daemon against the emulators."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from clamd_server import free_port
from conftest import EICAR, ROOT, Daemon, Layout
from emulators._server import Emulator, Fault
from emulators.blazelock import BlazelockEmulator
from emulators.perception_point import PerceptionPointEmulator

from daemon.cli import main

_THROTTLE = Fault(429, {"code": "throttle_requests", "message": "slow down"})
_BUSY = Fault(503, {"code": "uncaught_error", "message": "busy"})


def _config(layout: Layout, emulator: Emulator, kind: str, metrics_port: int, **cfg: object) -> Path:
    credentials = {"api_key": "test-key"} if kind == "blazelock" else {"token": "test-token"}
    config = layout.config(engine={"type": kind, "url": emulator.url, "poll_interval": 0.2,
                                   **credentials, **cfg},
                           metrics={"listen": f"127.0.0.1:{metrics_port}"})
    layout.config_path.write_text(yaml.safe_dump(config))
    return layout.config_path


def _drop_and_wait(layout: Layout, daemon: Daemon, count: int, timeout_s: float) -> None:
    daemon.wait_started()
    for i in range(count):
        (layout.inbox / f"f{i}.txt").write_bytes(b"clean file %d" % i)
    (layout.inbox / "e.com").write_bytes(EICAR)
    daemon.wait_for(lambda: len(daemon.named("file.moved")) >= count + 1, timeout=timeout_s,
                    what="every file moved")


def _status(config: Path) -> dict[str, Any]:
    """`scanwatch status --json`, as an operator runs it."""
    result = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--json", "--config", str(config)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60, check=True)
    return dict(json.loads(result.stdout))


def _every_fifth(fault: Fault) -> Callable[[int], Fault | None]:
    return lambda n: fault if n % 5 == 0 else None


def test_429s_then_a_503_every_fifth_request_fail_no_file(layout: Layout, daemon_factory) -> None:
    with BlazelockEmulator(scan_delay_s=0.2) as emulator:
        emulator.inject(_THROTTLE, count=3)  # the first three requests
        emulator.add_rule(_every_fifth(_BUSY))
        port = free_port()
        config = _config(layout, emulator, "blazelock", port, rate_limit=600)
        daemon = daemon_factory(config)
        _drop_and_wait(layout, daemon, 3, timeout_s=60)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert daemon.stop() == 0
    status = _status(config)
    assert layout.placed("failed") == []
    assert len(layout.placed("clean")) == 3 and layout.placed("quarantine") == ["e.com"]
    waits = [e for e in daemon.named("retry.scheduled") if e.get("reason") == "rate_limited"]
    assert waits and all("attempts" not in e for e in waits)  # waits, not attempts
    assert not daemon.named("engine.unhealthy")  # throttling is no outage
    assert 'scanwatch_engine_request_rate_per_minute{engine="default"}' in metrics
    assert len(emulator.submissions()) == 4  # one upload per file
    engine = status["engines"]["default"]
    assert engine["healthy"] is True and engine["rate_limit"] == 600
    assert 600 / 16 <= engine["request_rate_per_minute"] <= 600


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["blazelock", "perception_point"])
def test_a_20s_storm_of_429_and_a_503_every_fifth_request_fail_no_file(
        layout: Layout, daemon_factory, kind: str) -> None:
    emulator: Emulator = (BlazelockEmulator(scan_delay_s=0.2) if kind == "blazelock"
                          else PerceptionPointEmulator(polls_to_done=1))
    storm_ends_at = time.monotonic() + 20
    storm = Fault(429, {"detail": "throttled"}, {"Retry-After": "1"})
    with emulator:
        emulator.add_rule(lambda n: storm if time.monotonic() < storm_ends_at else None)
        emulator.add_rule(_every_fifth(_BUSY))
        port = free_port()
        config = _config(layout, emulator, kind, port, rate_limit=600)
        daemon = daemon_factory(config, {})
        _drop_and_wait(layout, daemon, 5, timeout_s=90)
        assert daemon.stop() == 0
    status = _status(config)
    assert layout.placed("failed") == []
    assert len(layout.placed("clean")) == 5 and layout.placed("quarantine") == ["e.com"]
    throttled = [e for e in emulator.log if e.status == 429]
    assert throttled and len(throttled) < 60  # paced down during the storm, not hammering
    engine = status["engines"]["default"]
    assert engine["rate_limit"] == 600 and 0 < engine["request_rate_per_minute"] <= 600


def test_check_config_probe_of_a_throttled_engine_is_ok(layout: Layout, capsys) -> None:
    """A 429 answers the probe: the engine is up and takes our credentials, it only paces us."""
    with BlazelockEmulator() as emulator:
        emulator.inject(_THROTTLE, count=10)
        config = _config(layout, emulator, "blazelock", free_port())
        assert main(["check-config", "--config", str(config), "--probe"]) == 0
    out = capsys.readouterr().out
    assert "probe default: ok (throttled:" in out and "test-key" not in out
