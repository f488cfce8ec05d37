"""The listing lease (`.scanwatch/lease`, S3 conditional writes) and its safety net: SeaweedFS, moto."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from realservers import S3Server, SqsServer

from daemon.s3url import S3Url
from daemon.watchers.fleet import ListingLease, SafetyNet, is_fleet_key
from daemon.watchers.s3messages import parse_message


class Clock:
    """A shared wall clock that tests move forward."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _lease(s3_server: S3Server, bucket: str, holder: str, clock: Clock, ttl_s: float = 30.0) -> ListingLease:
    return ListingLease(s3_server.client(), S3Url(bucket, "in/"), holder, ttl_s=ttl_s, clock=clock)


def test_of_two_nodes_starting_at_once_one_holds_the_lease(s3_server: S3Server, s3_bucket: str) -> None:
    clock = Clock()
    leases = [_lease(s3_server, s3_bucket, f"node-{n}", clock) for n in range(3)]
    results: list[bool] = []
    start = threading.Barrier(len(leases))

    def take(lease: ListingLease) -> None:
        start.wait()
        results.append(lease.acquire())

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == [False, False, True]
    holder = next(lease for lease in leases if lease.is_held)
    lease_object = s3_server.client().get_object(Bucket=s3_bucket, Key="in/.scanwatch/lease")
    doc = json.loads(lease_object["Body"].read())
    assert doc["holder"] == holder.holder and doc["expires_at"] == clock.now + 30.0


def test_the_holder_renews_and_another_takes_over_only_after_expiry(s3_server: S3Server,
                                                                    s3_bucket: str) -> None:
    clock = Clock()
    a, b = _lease(s3_server, s3_bucket, "a", clock), _lease(s3_server, s3_bucket, "b", clock)
    assert a.acquire() and not b.acquire()
    clock.now += 20
    assert a.acquire()  # renewed: expires 30 s from now
    clock.now += 20
    assert not b.acquire()  # 40 s after a took it, but a renewed at 20
    clock.now += 11  # a is "killed": it renews no more, and its expiry passes
    assert not a.is_held
    assert b.acquire() and b.is_held
    assert not a.acquire()  # the old holder finds it taken over, and does not take it back
    clock.now += 5
    assert b.acquire()


def test_a_takeover_race_after_expiry_has_one_winner(s3_server: S3Server, s3_bucket: str) -> None:
    clock = Clock()
    assert _lease(s3_server, s3_bucket, "dead", clock).acquire()
    clock.now += 31
    contenders = [_lease(s3_server, s3_bucket, f"n{n}", clock) for n in range(4)]
    start = threading.Barrier(len(contenders))
    results: list[bool] = []

    def take(lease: ListingLease) -> None:
        start.wait()
        results.append(lease.acquire())

    threads = [threading.Thread(target=take, args=(c,)) for c in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results.count(True) == 1


def test_an_unreadable_lease_is_taken_over(s3_server: S3Server, s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="in/.scanwatch/lease", Body=b"garbage")
    assert _lease(s3_server, s3_bucket, "a", Clock()).acquire()


def _received(sqs: Any, queue: str) -> list[str]:
    keys: list[str] = []
    while True:
        messages = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                       VisibilityTimeout=60).get("Messages", [])
        if not messages:
            return sorted(keys)
        keys += [event.key for m in messages for event in parse_message(m["Body"])]


def test_the_holder_sends_old_objects_without_events_to_the_queue(
        s3_server: S3Server, s3_bucket: str, sqs_server: SqsServer, sqs_queue: str) -> None:
    s3, sqs, clock = s3_server.client(), sqs_server.client(), Clock()
    for key in ("in/lost event.txt", "in/a+b%c/日本.bin", "in/ignored.tmp", "in/dir/"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    where = S3Url(s3_bucket, "in/")
    skipped: list[tuple[str, str]] = []

    def skip_reason(rel: str) -> str | None:
        return "ignored" if rel.endswith(".tmp") else "directory_marker" if rel.endswith("/") else None

    nets = [SafetyNet(s3, sqs, sqs_queue, where, _lease(s3_server, s3_bucket, name, clock), grace_s=60,
                      skip_reason=skip_reason, clock=clock,
                      on_skipped=lambda seen, how: skipped.extend((s.rel_path, how) for s in seen))
            for name in ("a", "b")]
    assert nets[0].run_once() == 0  # everything is younger than the grace period
    clock.now += 61
    assert [net.run_once() for net in nets] == [2, 0]  # only the holder lists
    assert _received(sqs, sqs_queue) == ["in/a+b%c/日本.bin", "in/lost event.txt"]
    # Keys never scanned are handed to the holder's journal, to be reported (not sent).
    assert sorted(set(skipped)) == [("dir/", "listing"), ("ignored.tmp", "listing")]
    assert nets[0].run_once() == 0  # not sent again while it may be in flight
    assert is_fleet_key(".scanwatch/lease") and not is_fleet_key("x/.scanwatch/lease")
