"""Fleets end to end: real `scanwatch run` daemons sharing one S3 watch (SeaweedFS) and queue (moto)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from clamd_server import free_port
from conftest import Daemon, wait_until
from emulators.blazelock import BlazelockEmulator
from fleetkit import EICAR, GARBAGE, Fleet
from realservers import HttpProxy, S3Server, SqsServer
from test_integrity import Pauses

from daemon.journal import open_journal

OBJECTS = 1000  # about 45 s with three daemons on two cores
KILLED_OBJECTS = 300
# One process per daemon, and worker processes (which a SIGKILL of the daemon takes along).
WORKERS = pytest.mark.parametrize("workers", [1, 2], ids=["workers-1", "workers-2"])


@pytest.fixture
def fleet(s3_server: S3Server, s3_bucket: str, sqs_server: SqsServer, sqs_queue: str,
          tmp_path: Path, s3_env: dict[str, str]) -> Iterator[Fleet]:
    yield Fleet(s3_server.client(), sqs_server.client(), s3_bucket, sqs_queue, tmp_path,
                s3_server.endpoint_url, sqs_server.endpoint_url, s3_server.region)


def _body(name: str) -> bytes:
    return EICAR if name.endswith(".com") else f"object {name}".encode()


def _names(count: int) -> list[str]:
    return [f"{i % 7}/f {i}{'.com' if i % 50 == 0 else '.txt'}" for i in range(count)]


def _assert_each_placed_once(fleet: Fleet, names: list[str]) -> None:
    infected = {n for n in names if n.endswith(".com")}
    assert fleet.keys("quarantine/") == sorted(infected)
    assert fleet.keys("clean/") == sorted(set(names) - infected)  # so no `.1` twin either
    assert fleet.keys("failed/") == []
    assert fleet.keys("in/") == []


def _drained(fleet: Fleet, names: list[str]) -> Callable[[], bool]:
    return lambda: len(fleet.placed()) >= len(names) and not fleet.keys("in/")


def _moved(daemon: Daemon) -> int:
    return len(daemon.named("file.moved")) + len(daemon.named("move.already_placed"))


def _start(fleet: Fleet, daemon_factory: Callable[..., Daemon], env: dict[str, str], node: int,
           workers: int) -> Daemon:
    daemon = daemon_factory(fleet.config(node, workers=workers), env=env)
    daemon.wait_started()
    return daemon


@WORKERS
def test_three_daemons_share_one_watch(fleet: Fleet, daemon_factory: Callable[..., Daemon],
                                       s3_env: dict[str, str], workers: int) -> None:
    names = _names(OBJECTS)
    fleet.put(names, _body)
    nodes = [_start(fleet, daemon_factory, s3_env, n, workers) for n in range(3)]
    fleet.send_events(names, duplicates=0.1, garbage=len(GARBAGE), per_message=2)
    nodes[0].wait_for(_drained(fleet, names), timeout=120, what="every object placed")
    nodes[0].wait_for(lambda: sum(fleet.queue_counts()) == len(GARBAGE), timeout=30,
                      what="the queue drained but for the garbage")
    assert [node.stop() for node in nodes] == [0, 0, 0]
    _assert_each_placed_once(fleet, names)
    wait_until(lambda: fleet.queue_counts() == (len(GARBAGE), 0), timeout_s=15, what="garbage visible")
    assert fleet.queue_bodies(len(GARBAGE)) == sorted(GARBAGE)  # left for the redrive policy
    assert all(node.named("file.moved") for node in nodes), [_moved(n) for n in nodes]


@WORKERS
@pytest.mark.parametrize("restarted", [False, True], ids=["never-restarted", "restarted"])
def test_a_node_killed_mid_way_loses_and_doubles_nothing(
        fleet: Fleet, daemon_factory: Callable[..., Daemon], s3_env: dict[str, str], restarted: bool,
        workers: int) -> None:
    names = _names(KILLED_OBJECTS)
    fleet.put(names, _body)
    nodes = [_start(fleet, daemon_factory, s3_env, n, workers) for n in range(3)]
    fleet.send_events(names, duplicates=0.1, per_message=2)
    victim = nodes[2]
    victim.wait_for(lambda: len(fleet.placed()) >= len(names) // 3 and victim.named("file.moved"),
                    timeout=60, what="a third placed, some by the victim")
    victim.signal(signal.SIGKILL)
    victim.proc.wait()
    if restarted:
        nodes[2] = _start(fleet, daemon_factory, s3_env, 2, workers)
    nodes[0].wait_for(_drained(fleet, names), timeout=120, what="every object placed")
    nodes[0].wait_for(lambda: fleet.queue_counts() == (0, 0), timeout=30, what="the queue drained")
    assert [node.stop() for node in (nodes[0], nodes[1])] == [0, 0]
    if restarted:
        assert nodes[2].stop() == 0
    _assert_each_placed_once(fleet, names)


@WORKERS
def test_two_nodes_given_the_same_message_place_once(
        fleet: Fleet, s3_proxy: HttpProxy, sqs_server: SqsServer, request: pytest.FixtureRequest,
        daemon_factory: Callable[..., Daemon], s3_env: dict[str, str], tmp_path: Path, workers: int) -> None:
    sqs = fleet.sqs
    second_queue = sqs.create_queue(QueueName=f"{fleet.queue_url.rsplit('/', 1)[1][:70]}-b")["QueueUrl"]
    request.addfinalizer(lambda: sqs.delete_queue(QueueUrl=second_queue))
    fleet.s3_endpoint = s3_proxy.endpoint_url
    names = [f"race {n}.txt" for n in range(20)]
    fleet.put(names)
    # The same message delivered to both nodes at once: SQS does that when a visibility timeout
    # runs out under a slow node; two queues with one copy each make it certain.
    ports = [free_port(), free_port()]
    configs = [fleet.config(0, metrics_port=ports[0], workers=workers), fleet.config(
        1, metrics_port=ports[1], workers=workers, events={
            "sqs_queue_url": second_queue, "endpoint_url": fleet.sqs_endpoint, "region": fleet.region})]
    # Each node holds the bytes of the first object until both do: their moves start together.
    pauses = [Pauses(tmp_path / f"pauses-{n}") for n in range(2)]
    nodes = [daemon_factory(config, env={**s3_env, **held.env("scan.hashed")})
             for config, held in zip(configs, pauses, strict=True)]
    for node in nodes:
        node.wait_started()

    def send(batch: list[str]) -> None:
        for queue in (fleet.queue_url, second_queue):
            Fleet(fleet.s3, sqs, fleet.bucket, queue, fleet.base, "", "", "", fleet.etags).send_events(batch)

    send(names[:1])  # alone, so both nodes hold this one: of many, either could come first
    for node, held in zip(nodes, pauses, strict=True):
        held.reached(node, "scan.hashed")
    send(names[1:])
    for held in pauses:
        held.go("scan.hashed")
    nodes[0].wait_for(_drained(fleet, names), timeout=60, what="every object placed")
    for queue in (fleet.queue_url, second_queue):
        nodes[0].wait_for(lambda queue=queue: sum(Fleet(fleet.s3, sqs, fleet.bucket, queue, fleet.base, "",
                                                        "", "", {}).queue_counts()) == 0,
                          timeout=30, what="both copies of each message deleted")
    found_placed = [_metric(port, "scanwatch_fleet_already_placed_total", 'watch="w"') for port in ports]
    assert [node.stop() for node in nodes] == [0, 0]
    assert fleet.keys("clean/") == sorted(names) and fleet.keys("in/") == []
    copies = [s3_proxy.count("PUT", f"/clean/{quote(n)}") for n in names]
    deleted = [s3_proxy.count("DELETE", f"/in/{quote(n)}", 204) for n in names]
    raced = sum(1 for c in copies if c == 2)
    print(f"copies attempted twice: {raced}/{len(names)}; source deletes answered 204: {deleted}")
    assert all(c >= 1 for c in copies) and raced, "the two nodes never raced"
    assert deleted == [1] * len(names)  # the loser's delete, pinned to the ETag, deleted nothing:
    for n in names:  # the others were answered 412 or 404, which count as success
        path = f"/in/{quote(n)}"
        refused = sum(s3_proxy.count("DELETE", path, status) for status in (404, 412))
        assert s3_proxy.count("DELETE", path) - 1 == refused
    assert sum(len(n.named("move.already_placed")) for n in nodes) >= raced
    assert sum(found_placed) == sum(len(n.named("move.already_placed")) for n in nodes)


def _metric(port: int, name: str, labels: str) -> float:
    """One sample of the daemon's /metrics (0 when absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    prefix = f"{name}{{{labels}}} "
    return next((float(line.removeprefix(prefix)) for line in text.splitlines()
                 if line.startswith(prefix)), 0.0)


def _run_status(config: Path, *extra: str) -> str:
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--config", str(config), *extra],
                          capture_output=True, text=True, check=True, timeout=60)
    return done.stdout


def _status(config: Path) -> dict[str, Any]:
    fleet: dict[str, Any] = json.loads(_run_status(config, "--json"))["watches"]["w"]["fleet"]
    return fleet


def _lease_takers(nodes: list[Daemon]) -> list[int]:
    return [n for n, node in enumerate(nodes) if node.named("fleet.lease_taken")]


def test_one_node_lists_under_the_lease_and_another_takes_over_when_it_dies(
        fleet: Fleet, daemon_factory: Callable[..., Daemon], s3_env: dict[str, str]) -> None:
    # Listing every 2 s (poll_interval x 10 with events): the lease lives 6 s, the grace is 2 s.
    ports = [free_port(), free_port()]
    configs = [fleet.config(n, poll_interval=0.2, metrics_port=ports[n]) for n in range(2)]
    nodes = [daemon_factory(config, env=s3_env) for config in configs]
    nodes[0].wait_for(lambda: _lease_takers(nodes), timeout=30, what="a lease holder")
    fleet.put(["no event.txt"])  # found by the holder's listing only
    nodes[0].wait_for(lambda: fleet.keys("clean/") == ["no event.txt"], timeout=30, what="placed")
    time.sleep(7)  # longer than the lease's 6 s: its holder renews it, the other never takes it
    (holder,) = _lease_takers(nodes)
    other = 1 - holder
    assert nodes[holder].named("fleet.safety_net_sent")
    lease_metric = [_metric(port, "scanwatch_fleet_lease_held", 'watch="w"') for port in ports]
    assert lease_metric[holder] == 1 and lease_metric[other] == 0
    assert [_status(config)["holds_lease"] for config in configs] == [n == holder for n in range(2)]
    nodes[holder].signal(signal.SIGKILL)
    nodes[holder].proc.wait()
    nodes[other].wait_for(lambda: nodes[other].named("fleet.lease_taken"), timeout=30,
                          what="the lease taken over after its expiry")
    fleet.put(["after the takeover.txt"])
    nodes[other].wait_for(lambda: fleet.keys("clean/") == ["after the takeover.txt", "no event.txt"],
                          timeout=30, what="placed by the new holder")
    assert nodes[other].stop() == 0
    assert fleet.keys("in/") == [] and fleet.keys("quarantine/") == []
    lease = fleet.s3.list_objects_v2(Bucket=fleet.bucket, Prefix="in/.scanwatch/").get("KeyCount")
    assert lease == 0  # released at shutdown, for the next member to list at once
    assert _status(configs[other]) | {"holder": "", "recorded_s_ago": 0} == {
        "member": True, "holder": "", "holds_lease": False, "lease_until": None, "messages_held": 0,
        "recorded_s_ago": 0}
    assert "fleet member: another member holds the listing lease" in _run_status(configs[other])


@WORKERS
def test_blazelock_across_nodes_accepts_one_submission_per_object(
        fleet: Fleet, daemon_factory: Callable[..., Daemon], s3_env: dict[str, str], workers: int) -> None:
    names = [f"b{n}.txt" for n in range(30)] + ["e.com"]
    fleet.put(names, _body)
    with BlazelockEmulator(scan_delay_s=1.0) as emulator:
        engine = {"type": "blazelock", "url": emulator.url, "api_key": "${BLZ_KEY}", "poll_interval": 0.2}
        nodes = [daemon_factory(fleet.config(n, engine=engine, workers=workers),
                                env={**s3_env, "BLZ_KEY": "test-key"}) for n in range(3)]
        for node in nodes:
            node.wait_started()
        fleet.send_events(names, duplicates=1.0)  # every event twice: nodes race on each object
        journals = [open_journal(fleet.base / f"node{n}" / "state") for n in range(3)]
        nodes[0].wait_for(lambda: any(m.messages_held for j in journals for m in j.fleet().values()),
                          timeout=30, what="messages held while their objects are scanned")
        nodes[0].wait_for(_drained(fleet, names), timeout=90, what="every object placed")
        assert [node.stop() for node in nodes] == [0, 0, 0]
        accepted = Counter(e.fields["external_reference_id"] for e in emulator.submissions())
    assert fleet.keys("quarantine/") == ["e.com"] and len(fleet.keys("clean/")) == len(names) - 1
    assert set(accepted.values()) == {1} and len(accepted) == len(names)
    scanned_by = Counter(row.rel_path for n in range(3)
                         for row in open_journal(fleet.base / f"node{n}" / "state").rows() if row.ref_id)
    assert any(count > 1 for count in scanned_by.values()), "no object was scanned by two nodes"
