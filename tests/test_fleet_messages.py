"""Fleet mode of the SQS event source: a message is the lease on its objects (moto SQS)."""

from __future__ import annotations

import threading
import time
from typing import Any

from conftest import wait_until
from realservers import SqsServer
from test_s3events import BUCKET, FAST_RETRY, PREFIX, Received, body, record

from daemon.watchers.s3messages import S3Event
from daemon.watchers.sqs import SqsEventSource


def counts(sqs: Any, url: str) -> tuple[int, int]:
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


class Settled:
    """An is_settled whose answer the test sets per key."""

    def __init__(self) -> None:
        self.placed: set[str] = set()

    def __call__(self, events: list[S3Event]) -> bool:
        return all(e.key in self.placed for e in events)


def _source(sqs: Any, queue: str, received: Received, settled: Settled, **kwargs: Any) -> SqsEventSource:
    options = {"bucket": BUCKET, "prefix": PREFIX, "wait_time_s": 1, "visibility_timeout_s": 2,
               "retry": FAST_RETRY, "is_settled": settled, **kwargs}
    return SqsEventSource(sqs, queue, received, **options)


def test_a_message_stays_invisible_until_all_its_objects_are_placed(sqs_server: SqsServer,
                                                                     sqs_queue: str) -> None:
    sqs, received, settled = sqs_server.client(), Received(), Settled()
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=body(record("incoming/a"), record("incoming/b")))
    source = _source(sqs, sqs_queue, received, settled, visibility_timeout_s=3)
    thread = threading.Thread(target=source.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: source.held_count == 1, what="the message held")
        time.sleep(7)  # over 2 visibility timeouts: the heartbeat keeps it invisible
        assert counts(sqs, sqs_queue) == (0, 1)
        settled.placed.add("incoming/a")
        time.sleep(3.5)
        assert counts(sqs, sqs_queue) == (0, 1) and source.held_count == 1  # b is still in flight
        settled.placed.add("incoming/b")
        wait_until(lambda: counts(sqs, sqs_queue) == (0, 0), what="the message deleted")
    finally:
        source.stop.set()
        thread.join(5)
    assert sorted(received.keys()) == ["incoming/a", "incoming/b"]  # handed on once


def test_a_daemon_that_stops_leaves_its_messages_to_another(sqs_server: SqsServer, sqs_queue: str) -> None:
    sqs, settled = sqs_server.client(), Settled()
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=body(record("incoming/a")))
    first, second = Received(), Received()
    dying = _source(sqs, sqs_queue, first, settled)
    dying.poll_once()
    assert dying.held_count == 1
    dying.stop.set()
    dying.run()  # returns at once and stops extending: as if the daemon died
    other = _source(sqs, sqs_queue, second, settled)
    wait_until(lambda: other.poll_once() >= 0 and second.keys() == ["incoming/a"], timeout_s=15,
               what="the message redelivered to the other daemon")
    settled.placed.add("incoming/a")
    other.poll_once()
    assert counts(sqs, sqs_queue) == (0, 0)


def test_a_busy_daemon_leaves_messages_to_the_others_and_skips_its_lease_key(sqs_server: SqsServer,
                                                                              sqs_queue: str) -> None:
    sqs, received, settled = sqs_server.client(), Received(), Settled()
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=body(record("incoming/.scanwatch/lease")))
    for n in range(5):
        sqs.send_message(QueueUrl=sqs_queue, MessageBody=body(record(f"incoming/{n}")))
    source = _source(sqs, sqs_queue, received, settled, max_held=2)
    for _ in range(6):
        source.poll_once()
    assert source.held_count == 2
    assert "incoming/.scanwatch/lease" not in list(received.keys())
    assert sum(counts(sqs, sqs_queue)) == 5  # the lease key's message deleted, 3 left to others
    source.stop.set()
    source.run()
