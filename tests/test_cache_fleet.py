"""The verdict cache across a fleet (docs/fleet.md, "A shared verdict cache"): real daemons on
SeaweedFS and moto, one after the other, with the Blazelock emulator counting submissions."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon
from emulators.blazelock import BlazelockEmulator
from fleetkit import Fleet

from daemon.journal import open_journal


@pytest.fixture
def fleet(s3_server, s3_bucket: str, sqs_server, sqs_queue: str, tmp_path: Path,
          s3_env: dict[str, str]) -> Iterator[Fleet]:
    yield Fleet(s3_server.client(), sqs_server.client(), s3_bucket, sqs_queue, tmp_path,
                s3_server.endpoint_url, sqs_server.endpoint_url, s3_server.region)


def _one_by_one(fleet: Fleet, daemon_factory: Callable[..., Daemon], env: dict[str, str],
                engine: dict[str, Any], names: list[str], data: bytes) -> list[Daemon]:
    """Each name put and handled by its own member (node 0, 1, ...), started and stopped in turn."""
    daemons = []
    for node, name in enumerate(names):
        daemon = daemon_factory(fleet.config(node, engine=engine), env=env)
        daemon.wait_started()
        fleet.put([name], lambda _: data)
        fleet.send_events([name])
        daemon.wait_for(lambda name=name: f"clean/{name}" in fleet.placed(), timeout=30,
                        what=f"{name} placed")
        assert daemon.stop() == 0
        daemons.append(daemon)
    return daemons


def test_a_fleet_of_two_shares_a_verdict_through_the_bucket(
        fleet: Fleet, s3_env: dict[str, str], daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    data = b"the same report, dropped by two teams"
    with BlazelockEmulator(scan_delay_s=0.3) as emulator:
        engine = {"type": "blazelock", "url": emulator.url, "api_key": "${BLZ_KEY}",
                  "poll_interval": 0.2, "cache": {"shared": True}}
        daemons = _one_by_one(fleet, daemon_factory, {**s3_env, "BLZ_KEY": "test-key"}, engine,
                              ["team-a/report.pdf", "team-b/report.pdf"], data)
        assert len(emulator.submissions()) == 1
        scan_id = next(iter(emulator.scans))
    first, second = (d.named("scan.verdict")[0] for d in daemons)
    assert not first.get("cached") and second["cached"] is True
    assert second["cached_from"]["engine_scan_id"] == scan_id
    assert second["cached_from"]["external_reference_id"] == first["ref_id"]
    shared = _keys(fleet, "in/.scanwatch/cache/")
    sha256 = hashlib.sha256(data).hexdigest()
    assert len(shared) == 1 and shared[0].startswith("default/") and shared[0].endswith(sha256)
    # The second member keeps what it read in its own journal.
    assert open_journal(tmp_path / "node1" / "state").verdicts.stats()["default"] == (1, 0)


def test_without_shared_a_fleet_member_asks_for_itself(
        fleet: Fleet, s3_env: dict[str, str], daemon_factory: Callable[..., Daemon]) -> None:
    with BlazelockEmulator(scan_delay_s=0.3) as emulator:
        engine = {"type": "blazelock", "url": emulator.url, "api_key": "${BLZ_KEY}", "poll_interval": 0.2}
        _one_by_one(fleet, daemon_factory, {**s3_env, "BLZ_KEY": "test-key"}, engine,
                    ["a.txt", "b.txt"], b"same bytes, members that share nothing")
        assert len(emulator.submissions()) == 2
    assert _keys(fleet, "in/.scanwatch/cache/") == []


def _keys(fleet: Fleet, prefix: str) -> list[str]:
    listed = fleet.s3.list_objects_v2(Bucket=fleet.bucket, Prefix=prefix)
    return sorted(o["Key"].removeprefix(prefix) for o in listed.get("Contents", ()))
