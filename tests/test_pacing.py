"""The pacer (docs/engines.md#rate-limits): AIMD on "slow down", one rate across worker processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import Clock

from daemon.engines._pacing import Pacer, pacing_path, read_rates
from daemon.errors import EngineThrottledError


def test_the_rate_halves_at_once_on_a_throttle_and_climbs_back_slowly() -> None:
    clock = Clock()
    pacer = Pacer("blz", 160, clock=clock)
    wait_s = pacer.throttled(retry_after_s=5)
    assert pacer.rate_per_minute == 80 and wait_s == pytest.approx(5)  # Retry-After honoured
    pacer.throttled(None)  # the same moment: one cut per request interval
    assert pacer.rate_per_minute == 80
    for _ in range(4):
        pacer.succeeded()
    assert pacer.rate_per_minute == 100
    with pytest.raises(EngineThrottledError) as held:
        pacer.acquire()  # 5 s away: a wait in the journal, not a sleep
    assert held.value.retry_after_s == pytest.approx(5) and held.value.reason == "rate_limited"
    for _ in range(100):
        clock.now += 60
        pacer.throttled(None)
    assert pacer.rate_per_minute == 10  # the floor: 1/16 of rate_limit


def test_worker_processes_share_one_rate_and_one_schedule(tmp_path: Path) -> None:
    clock = Clock()
    path = pacing_path(tmp_path, "blz")
    first, second = (Pacer("blz", 60, path, clock=clock, max_wait_s=0.5) for _ in range(2))
    first.throttled(None)  # seen by one worker process...
    assert second.rate_per_minute == 30  # ...paces the other
    clock.now += 2  # past the hold of one interval at 30/min
    first.acquire()
    with pytest.raises(EngineThrottledError):
        second.acquire()  # the next slot is 2 s after the first's: not now
    assert read_rates(tmp_path) == {"blz": 30}  # what status and the metrics show
    first.close()
    second.close()
