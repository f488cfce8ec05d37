"""The SQS event source of S3 watches: parse_message on its own, SqsEventSource against moto_server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote_plus

import boto3
import pytest
from botocore.config import Config as BotoConfig
from conftest import wait_until
from hypothesis import given, settings
from hypothesis import strategies as st
from realservers import SqsServer, TcpProxy
from structlog.testing import capture_logs

from daemon.errors import MalformedMessageError, QueueUnavailableError
from daemon.retry import RetryPolicy
from daemon.watchers.s3messages import S3Event, parse_message
from daemon.watchers.sqs import SqsEventSource

BUCKET = "drop-bucket"
PREFIX = "incoming/"
FAST_RETRY = RetryPolicy(base_s=0.05, max_s=0.2)


# -- messages in the shape S3 sends (AWS docs, "Event message structure") ----------------------

def record(key: str, *, event: str = "ObjectCreated:Put", bucket: str = BUCKET, size: int | None = 1024,
           etag: str | None = "d41d8cd98f00b204e9800998ecf8427e", version_id: str | None = None,
           sequencer: str | None = "0055AED6DCD90281E5") -> dict[str, Any]:
    """One record; `key` is given already encoded, as S3 puts it in the event."""
    obj: dict[str, Any] = {"key": key, "sequencer": sequencer}
    if size is not None:
        obj["size"] = size
    if etag is not None:
        obj["eTag"] = etag
    if version_id is not None or event.startswith("ObjectCreated:"):
        obj["versionId"] = version_id  # null on unversioned buckets
    return {
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2026-11-22T10:00:00.000Z", "eventName": event,
        "userIdentity": {"principalId": "AWS:AIDAJDPLRKLG7UEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {
            "x-amz-request-id": "C3D13FE58DE4C810",
            "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "scanwatch-incoming",
               "bucket": {"name": bucket, "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                          "arn": f"arn:aws:s3:::{bucket}"},
               "object": obj},
    }


def body(*records: dict[str, Any]) -> str:
    return json.dumps({"Records": list(records)})


TEST_EVENT = json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-11-22T10:00:00.000Z",
                         "Bucket": BUCKET, "RequestId": "5582815E1AEA5ADF",
                         "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE"})


def sns_wrapped(message: str) -> str:
    """`message` as SNS delivers it to a subscribed queue without raw message delivery."""
    return json.dumps({
        "Type": "Notification", "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:s3-events", "Subject": "Amazon S3 Notification",
        "Message": message, "Timestamp": "2026-11-22T10:00:00.000Z", "SignatureVersion": "1",
        "Signature": "EXAMPLEpH+DcEwjAPg8O9mY8dReBSwksfg2S7WKQcikcNKWLQjwu6A4VbeS0QHVCkhRS7fUQvi2egU3N858f",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0000.pem",
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
    })


# -- parse_message ------------------------------------------------------------------------------

def test_every_record_is_parsed_and_keys_are_decoded() -> None:
    events = parse_message(body(
        record("incoming/2026/11/22/deep/er/my+report+%281%29.pdf", size=7, etag='"abc"',
               version_id="096fKKXTRTtl3on89fVO.nfljtsv6qko", event="ObjectCreated:CompleteMultipartUpload"),
        record("incoming/caf%C3%A9/%E6%97%A5%E6%9C%AC%F0%9F%93%84.txt", sequencer=None),
        record("incoming/a%2Bb+c.txt", size=None, etag=None),
        record("incoming/100%25+sure%3F.txt"),
    ))
    assert events == [
        S3Event(BUCKET, "incoming/2026/11/22/deep/er/my report (1).pdf", "abc",
                "096fKKXTRTtl3on89fVO.nfljtsv6qko", 7, "0055AED6DCD90281E5",
                "ObjectCreated:CompleteMultipartUpload"),
        S3Event(BUCKET, "incoming/café/日本📄.txt", "d41d8cd98f00b204e9800998ecf8427e", None, 1024, None,
                "ObjectCreated:Put"),
        S3Event(BUCKET, "incoming/a+b c.txt", None, None, None, "0055AED6DCD90281E5", "ObjectCreated:Put"),
        S3Event(BUCKET, "incoming/100% sure?.txt", "d41d8cd98f00b204e9800998ecf8427e", None, 1024,
                "0055AED6DCD90281E5", "ObjectCreated:Put"),
    ]


def test_removals_and_other_event_types_are_left_out() -> None:
    events = parse_message(body(
        record("incoming/gone.txt", event="ObjectRemoved:Delete", size=None, etag=None),
        record("incoming/kept.txt", event="ObjectCreated:Copy"),
        record("incoming/marker.txt", event="ObjectRemoved:DeleteMarkerCreated", size=None, etag=None),
        record("incoming/kept.txt", event="ObjectTagging:Put"),
        record("incoming/kept.txt", event="LifecycleExpiration:Delete"),
    ))
    assert [(e.key, e.event_name) for e in events] == [("incoming/kept.txt", "ObjectCreated:Copy")]


def test_event_names_with_the_s3_prefix_of_compatible_stores_are_understood() -> None:
    events = parse_message(body(record("incoming/a.txt", event="s3:ObjectCreated:Put"),
                                record("incoming/b.txt", event="s3:ObjectRemoved:Delete")))
    assert [(e.key, e.event_name) for e in events] == [("incoming/a.txt", "s3:ObjectCreated:Put")]


def test_test_event_and_empty_records_give_nothing() -> None:
    assert parse_message(TEST_EVENT) == []
    assert parse_message(sns_wrapped(TEST_EVENT)) == []
    assert parse_message('{"Records": []}') == []


def test_sns_wrapped_event_is_unwrapped() -> None:
    events = parse_message(sns_wrapped(body(record("incoming/a+b.txt"), record("incoming/c.txt"))))
    assert [e.key for e in events] == ["incoming/a b.txt", "incoming/c.txt"]


@pytest.mark.parametrize(("raw", "reason"), [
    ("not json at all", "body is not JSON"),
    ("", "body is not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"Message": "hello"}', "no Records list"),
    ('{"Records": {"key": "a"}}', "no Records list"),
    ('{"Records": ["a"]}', "Records[0] is not an object"),
    (body(record("incoming/a"), {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": BUCKET},
                                                                         "object": {}}}),
     "Records[1] has no s3.object.key"),
    (body({"eventName": "ObjectCreated:Put", "s3": {"object": {"key": "a"}}}),
     "Records[0] has no s3.bucket.name"),
    (body({"s3": {"bucket": {"name": BUCKET}, "object": {"key": "a"}}}), "Records[0] has no eventName"),
    (body(record("")), "Records[0].s3.object.key is empty"),
    (body(record("incoming/%C3%28")), "Records[0].s3.object.key is not percent-encoded UTF-8"),
    (body(record("incoming/a", size="12")), "Records[0].s3.object.size is str, not int"),  # type: ignore[arg-type]
    (body(record("incoming/a", size=True)), "Records[0].s3.object.size is bool, not int"),
    (body(record("incoming/a", etag=5)), "Records[0].s3.object.eTag is int, not str"),  # type: ignore[arg-type]
    (json.dumps({"Type": "Notification", "Message": {"Records": []}}), "SNS Message is not a string"),
    (json.dumps({"Type": "Notification", "Message": "garbage"}), "SNS Message is not JSON"),
    (json.dumps({"Type": "SubscriptionConfirmation", "Message": "You have chosen to subscribe"}),
     "no Records list"),
])
def test_anything_else_is_malformed_with_a_short_reason(raw: str, reason: str) -> None:
    with pytest.raises(MalformedMessageError) as caught:
        parse_message(raw)
    assert str(caught.value).startswith(reason)
    assert len(str(caught.value)) < 80


_URL_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~/*'()!$&,;:=@")


def _percent(char: str, upper: bool) -> str:
    return "".join(f"%{b:02X}" if upper else f"%{b:02x}" for b in char.encode())


@st.composite
def encoded_keys(draw: st.DrawFn) -> tuple[str, str]:
    """(key, encoded): any key S3 accepts, form-encoded with any legal choice per character.

    S3 writes '+' for a space and %XX for the UTF-8 bytes of what it escapes; which other
    characters it leaves as they are is not documented, so each is left raw or escaped at random.
    """
    key = draw(st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=60)
               .filter(lambda k: len(k.encode()) <= 1024))
    parts = []
    for char in key:
        choices = [_percent(char, True), _percent(char, False)]
        if char == " ":
            choices.append("+")
        elif char in _URL_SAFE or not char.isascii():
            choices.append(char)
        parts.append(draw(st.sampled_from(choices)))
    return key, "".join(parts)


@given(encoded_keys(), st.booleans())
def test_any_encoded_key_round_trips(pair: tuple[str, str], via_sns: bool) -> None:
    key, encoded = pair
    raw = body(record(encoded))
    (event,) = parse_message(sns_wrapped(raw) if via_sns else raw)
    assert event.key == key


@given(st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=60))
def test_keys_encoded_by_quote_plus_round_trip(key: str) -> None:
    for safe in ("", "/", "/*'()!~"):
        (event,) = parse_message(body(record(quote_plus(key, safe=safe))))
        assert event.key == key


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["Records", "s3", "object", "bucket", "key", "name", "eventName", "size", "eTag",
                         "versionId", "sequencer", "Type", "Message", "Event"]), inner, max_size=5),
    max_leaves=20)


@settings(max_examples=300)
@given(st.one_of(st.text(), _json.map(json.dumps), _json.map(lambda doc: json.dumps({"Records": [doc]})),
                 _json.map(lambda doc: sns_wrapped(json.dumps(doc)))))
def test_parse_message_raises_only_malformed(raw: str) -> None:
    try:
        events = parse_message(raw)
    except MalformedMessageError:
        return
    assert all(isinstance(e, S3Event) and "ObjectCreated:" in e.event_name for e in events)


def test_source_refuses_limits_sqs_would_reject() -> None:
    for kwargs in ({"wait_time_s": 0}, {"wait_time_s": 21}, {"visibility_timeout_s": 0},
                   {"visibility_timeout_s": 43_201}):
        with pytest.raises(ValueError, match="must be 1.."):
            SqsEventSource(None, "http://q", lambda events: None, bucket=BUCKET, prefix=PREFIX, **kwargs)


# -- SqsEventSource against moto_server ---------------------------------------------------------

class Received:
    """An on_events that records each call; `fail` or `block` make it misbehave."""

    def __init__(self) -> None:
        self.calls: list[list[S3Event]] = []
        self.fail: Exception | None = None
        self.hook: Callable[[list[S3Event]], None] | None = None
        self.lock = threading.Lock()

    def __call__(self, events: list[S3Event]) -> None:
        if self.hook is not None:
            self.hook(events)
        if self.fail is not None:
            raise self.fail
        with self.lock:
            self.calls.append(events)

    def keys(self) -> list[str]:
        with self.lock:
            return [e.key for call in self.calls for e in call]


def counts(sqs: Any, url: str) -> tuple[int, int]:
    """(visible, in flight) messages on the queue."""
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


def named(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [entry for entry in list(logs) if entry["event"] == event]


def poll_until(source: SqsEventSource, messages: int, max_rounds: int = 5) -> list[int]:
    """poll_once until `messages` were received in all; the count of each round."""
    rounds: list[int] = []
    while sum(rounds) < messages:
        assert len(rounds) < max_rounds, f"only {sum(rounds)} of {messages} messages in {rounds}"
        rounds.append(source.poll_once())
    return rounds


@pytest.fixture
def sqs(sqs_server: SqsServer) -> Any:
    return sqs_server.client()


@pytest.fixture
def make_source(sqs_server: SqsServer) -> Callable[..., SqsEventSource]:
    def make(url: str, on_events: Callable[[list[S3Event]], None], client: Any = None,
             **kwargs: Any) -> SqsEventSource:
        options = {"bucket": BUCKET, "prefix": PREFIX, "wait_time_s": 1, "visibility_timeout_s": 2,
                   "retry": FAST_RETRY, **kwargs}
        return SqsEventSource(client or sqs_server.client(), url, on_events, **options)
    return make


@pytest.fixture
def running() -> Iterator[Callable[[SqsEventSource], threading.Thread]]:
    """Starts `source.run()` in a thread; stops it afterwards and checks that it stopped."""
    started: list[tuple[SqsEventSource, threading.Thread]] = []

    def start(source: SqsEventSource) -> threading.Thread:
        thread = threading.Thread(target=source.run, daemon=True)
        thread.start()
        started.append((source, thread))
        return thread

    yield start
    for source, thread in started:
        source.stop.set()
        thread.join(5)
        assert not thread.is_alive(), "run() did not return after stop was set"


def test_events_are_handed_on_per_message_then_deleted(sqs: Any, sqs_queue: str, make_source: Any) -> None:
    received = Received()
    in_flight_during_call: list[tuple[int, int]] = []
    received.hook = lambda events: in_flight_during_call.append(counts(sqs, sqs_queue))
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=body(
        record("incoming/2026/11/22/deep/er/my+report+%281%29.pdf"),
        record("incoming/caf%C3%A9/%E6%97%A5%E6%9C%AC.txt"),
        record("incoming/a%2Bb.txt"),
    ))
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=sns_wrapped(body(record("incoming/100%25+sure.txt"))))

    poll_until(make_source(sqs_queue, received), messages=2)

    assert sorted(received.calls, key=len) == [
        [S3Event(BUCKET, "incoming/100% sure.txt", "d41d8cd98f00b204e9800998ecf8427e", None, 1024,
                 "0055AED6DCD90281E5", "ObjectCreated:Put")],
        [S3Event(BUCKET, key, "d41d8cd98f00b204e9800998ecf8427e", None, 1024, "0055AED6DCD90281E5",
                 "ObjectCreated:Put")
         for key in ("incoming/2026/11/22/deep/er/my report (1).pdf", "incoming/café/日本.txt",
                     "incoming/a+b.txt")],
    ]
    # Each message was still on the queue while on_events ran, and is gone after.
    assert all(in_flight >= 1 for _, in_flight in in_flight_during_call)
    assert counts(sqs, sqs_queue) == (0, 0)


def test_events_outside_the_watch_are_dropped(sqs: Any, sqs_queue: str, make_source: Any) -> None:
    received = Received()
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=body(
        record("incoming/wanted.txt"),
        record("incoming/wanted.txt", bucket="other-bucket"),
        record("incoming-old/a.txt"),
        record("outgoing/incoming/a.txt"),
        record("incoming/"),
        record("incoming/folder/"),
        record("incoming/gone.txt", event="ObjectRemoved:Delete", size=None, etag=None),
    ))
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=body(record("elsewhere/a.txt"), record("incoming/dir/")))
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=TEST_EVENT)
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=body(
        record("incoming/x.txt", event="ObjectRemoved:Delete", size=None, etag=None)))

    poll_until(make_source(sqs_queue, received), messages=4)

    # Folder markers are passed on: the watcher reports them as skipped (never scanned).
    assert received.keys() == ["incoming/wanted.txt", "incoming/", "incoming/folder/", "incoming/dir/"]
    assert received.calls[0][0] == S3Event(BUCKET, "incoming/wanted.txt", "d41d8cd98f00b204e9800998ecf8427e",
                                           None, 1024, "0055AED6DCD90281E5", "ObjectCreated:Put")
    assert counts(sqs, sqs_queue) == (0, 0)


def test_whole_bucket_watch_takes_every_key(sqs: Any, sqs_queue: str, make_source: Any) -> None:
    received = Received()
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=body(record("top.txt"), record("a/b/c.txt"),
                                                          record("a/")))
    make_source(sqs_queue, received, prefix="").poll_once()
    assert received.keys() == ["top.txt", "a/b/c.txt", "a/"]


def test_duplicate_deliveries_are_passed_on(sqs: Any, sqs_queue: str, make_source: Any) -> None:
    received = Received()
    for _ in range(2):
        sqs.send_message(QueueUrl=sqs_queue, MessageBody=body(record("incoming/same.txt")))
    poll_until(make_source(sqs_queue, received), messages=2)
    assert received.keys() == ["incoming/same.txt", "incoming/same.txt"]
    assert counts(sqs, sqs_queue) == (0, 0)


def test_one_round_takes_at_most_ten_messages(sqs: Any, sqs_queue: str, make_source: Any) -> None:
    received = Received()
    for start in (0, 10):
        sqs.send_message_batch(QueueUrl=sqs_queue, Entries=[
            {"Id": str(i), "MessageBody": body(record(f"incoming/{i}.txt"))}
            for i in range(start, min(start + 10, 12))])
    rounds = poll_until(make_source(sqs_queue, received), messages=12)
    assert len(rounds) >= 2 and max(rounds) <= 10
    assert sorted(received.keys()) == sorted(f"incoming/{i}.txt" for i in range(12))
    assert counts(sqs, sqs_queue) == (0, 0)


def test_malformed_messages_are_logged_left_for_redrive_and_not_retried_hot(
        sqs: Any, sqs_queue: str, make_source: Any) -> None:
    dead = sqs.create_queue(QueueName=sqs_queue.rsplit("/", 1)[1][:70] + "-dlq")["QueueUrl"]
    dead_arn = sqs.get_queue_attributes(QueueUrl=dead, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sqs.set_queue_attributes(QueueUrl=sqs_queue, Attributes={
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dead_arn, "maxReceiveCount": "1"})})
    garbage = {
        "huge non-JSON": "x" * 100_000,
        "no Records": json.dumps({"hello": "world"}),
        "no key": json.dumps({"Records": [{"eventName": "ObjectCreated:Put",
                                           "s3": {"bucket": {"name": BUCKET}, "object": {"size": 1}}}]}),
    }
    ids = {sqs.send_message(QueueUrl=sqs_queue, MessageBody=raw)["MessageId"]: name
           for name, raw in garbage.items()}
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=body(record("incoming/good.txt")))
    received = Received()
    source = make_source(sqs_queue, received)

    with capture_logs() as logs:
        poll_until(source, messages=4)
        assert source.poll_once() == 0  # the garbage stays invisible: no hot loop

    assert received.keys() == ["incoming/good.txt"]
    malformed = named(logs, "sqs.malformed")
    assert {ids[entry["message_id"]]: entry["reason"] for entry in malformed} == {
        "huge non-JSON": "body is not JSON (JSONDecodeError)",
        "no Records": "no Records list",
        "no key": "Records[0] has no s3.object.key",
    }
    assert len(malformed) == 3
    assert all(entry["log_level"] == "warning" and entry["receive_count"] == "1" for entry in malformed)
    assert max(len(json.dumps(entry)) for entry in logs) < 1000  # never the whole body
    assert counts(sqs, sqs_queue) == (0, 3)

    # After the visibility timeout SQS moves them to the dead-letter queue (maxReceiveCount 1).
    moved: list[dict[str, Any]] = []
    wait_until(lambda: moved.extend(sqs.receive_message(QueueUrl=sqs_queue, MaxNumberOfMessages=10,
                                                        WaitTimeSeconds=1).get("Messages", []))
               or counts(sqs, dead)[0] == 3, timeout_s=6, what="garbage in the dead-letter queue")
    assert moved == []
    dead_letters = sqs.receive_message(QueueUrl=dead, MaxNumberOfMessages=10)["Messages"]
    assert {m["MessageId"] for m in dead_letters} == set(ids)
    sqs.delete_queue(QueueUrl=dead)


def test_failed_on_events_leaves_the_message_to_come_back(sqs: Any, sqs_queue: str, make_source: Any) -> None:
    received = Received()
    received.fail = RuntimeError("journal is locked")
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=body(record("incoming/a.txt"), record("incoming/b.txt")))
    source = make_source(sqs_queue, received, visibility_timeout_s=1)

    with capture_logs() as logs:
        assert source.poll_once() == 1
    (failed,) = named(logs, "sqs.handler_failed")
    assert failed["log_level"] == "error" and failed["events"] == 2 and failed["exc_info"] is True
    assert counts(sqs, sqs_queue) == (0, 1)

    received.fail = None
    again = make_source(sqs_queue, received, wait_time_s=5)
    wait_until(lambda: again.poll_once(), timeout_s=8, what="the message back after its visibility timeout")
    assert received.keys() == ["incoming/a.txt", "incoming/b.txt"]
    assert counts(sqs, sqs_queue) == (0, 0)


def test_slow_on_events_keeps_its_batch_invisible_then_deletes(
        sqs: Any, sqs_queue: str, make_source: Any) -> None:
    sqs.send_message_batch(QueueUrl=sqs_queue, Entries=[
        {"Id": name, "MessageBody": body(record(f"incoming/{name}.txt"))}
        for name in ("bad", "slow", "next")])
    entered, release = threading.Event(), threading.Event()
    received = Received()

    def misbehave(events: list[S3Event]) -> None:
        if events[0].key == "incoming/bad.txt":
            raise RuntimeError("journal is locked")
        if events[0].key == "incoming/slow.txt":
            entered.set()
            assert release.wait(10)

    received.hook = misbehave
    source = make_source(sqs_queue, received, visibility_timeout_s=1)
    handled: list[int] = []
    worker = threading.Thread(target=lambda: handled.append(source.poll_once()))
    worker.start()
    came_back: list[str] = []
    try:
        assert entered.wait(5)
        # Three visibility timeouts pass while `slow` is handled: `slow` and `next` stay hidden;
        # only `bad`, whose handling failed, comes back.
        deadline = time.monotonic() + 3.2
        while time.monotonic() < deadline:
            for message in sqs.receive_message(QueueUrl=sqs_queue, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                               VisibilityTimeout=1).get("Messages", []):
                came_back += [e.key for e in parse_message(message["Body"])]
                sqs.delete_message(QueueUrl=sqs_queue, ReceiptHandle=message["ReceiptHandle"])
        assert received.calls == []
    finally:
        release.set()
        worker.join(10)
    assert came_back == ["incoming/bad.txt"]
    assert handled == [3]
    assert sorted(received.keys()) == ["incoming/next.txt", "incoming/slow.txt"]
    assert counts(sqs, sqs_queue) == (0, 0)


class RacingClient:
    """An SQS client whose heartbeat extension, once in flight, waits (up to 2 s) for a delete."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.extending, self.deleted = threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def change_message_visibility_batch(self, **kwargs: Any) -> Any:
        self.extending.set()
        self.deleted.wait(2)
        return self._client.change_message_visibility_batch(**kwargs)

    def delete_message_batch(self, **kwargs: Any) -> Any:
        try:
            return self._client.delete_message_batch(**kwargs)
        finally:
            self.deleted.set()


def test_a_message_is_never_extended_after_its_delete(sqs: Any, sqs_queue: str, make_source: Any) -> None:
    """The delete waits for an extension in flight, and the message is extended no more: no
    ChangeMessageVisibilityBatch with a deleted (invalid) receipt handle, so no `sqs.error`."""
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=body(record("incoming/a.txt")))
    client = RacingClient(sqs)
    received = Received()

    def while_a_beat_is_in_flight(events: list[S3Event]) -> None:
        assert client.extending.wait(5)

    received.hook = while_a_beat_is_in_flight
    source = make_source(sqs_queue, received, client=client)
    with capture_logs() as logs:
        assert source.poll_once() == 1
    assert named(logs, "sqs.error") == []
    assert counts(sqs, sqs_queue) == (0, 0)


def test_queue_deleted_during_on_events_raises_queue_unavailable(
        sqs: Any, sqs_queue: str, make_source: Any) -> None:
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=body(record("incoming/a.txt")))
    received = Received()
    source = make_source(sqs_queue, received, visibility_timeout_s=1)
    with capture_logs() as logs:
        def delete_queue_then_wait_for_heartbeat(events: list[S3Event]) -> None:
            sqs.delete_queue(QueueUrl=sqs_queue)
            wait_until(lambda: named(logs, "sqs.error"), timeout_s=3, what="the heartbeat's failure")

        received.hook = delete_queue_then_wait_for_heartbeat
        with pytest.raises(QueueUnavailableError) as caught:
            source.poll_once()
    assert caught.value.action == "DeleteMessageBatch"
    assert "check events.sqs_queue_url" in str(caught.value)
    heartbeat = named(logs, "sqs.error")[0]
    assert heartbeat["action"] == "ChangeMessageVisibilityBatch" and heartbeat["queue"] in sqs_queue
    assert received.keys() == ["incoming/a.txt"]  # journaled; the redelivery will be deduplicated


def test_run_survives_a_deleted_queue_and_recovers_when_it_exists_again(
        sqs: Any, sqs_queue: str, make_source: Any, running: Any) -> None:
    received = Received()
    name = sqs_queue.rsplit("/", 1)[1]
    with capture_logs() as logs:
        running(make_source(sqs_queue, received))
        sqs.send_message(QueueUrl=sqs_queue, MessageBody=body(record("incoming/before.txt")))
        wait_until(lambda: received.keys() == ["incoming/before.txt"], what="the first event")
        wait_until(lambda: counts(sqs, sqs_queue) == (0, 0), what="the first message deleted")

        sqs.delete_queue(QueueUrl=sqs_queue)
        wait_until(lambda: named(logs, "sqs.error"), what="the first retry while the queue is gone")
        time.sleep(1.0)  # an outage of known length, to count the retries in it
        retries_in_1s = len(named(logs, "sqs.error")) - 1
        assert sqs.create_queue(QueueName=name)["QueueUrl"] == sqs_queue
        sqs.send_message(QueueUrl=sqs_queue, MessageBody=body(record("incoming/after.txt")))
        wait_until(lambda: received.keys() == ["incoming/before.txt", "incoming/after.txt"],
                   what="the event sent after the queue came back")

    errors = named(logs, "sqs.error")
    assert {e["action"] for e in errors} == {"ReceiveMessage"}
    assert all("NonExistentQueue" in e["error_code"] or "QueueDoesNotExist" in e["error_code"]
               for e in errors)
    assert all(e["retry_in_s"] <= FAST_RETRY.max_s for e in errors)
    assert [e["attempt"] for e in errors[:4]] == [1, 2, 3, 4]
    # Backoff keeps the retries few: ~0.1 s apart on average here; a hot loop makes hundreds.
    assert 3 <= retries_in_1s <= 30


def test_run_survives_the_endpoint_going_down_and_coming_back(
        sqs_server: SqsServer, sqs: Any, sqs_queue: str, make_source: Any, running: Any) -> None:
    proxy = TcpProxy(int(sqs_server.endpoint_url.rsplit(":", 1)[1]))
    proxy.start()
    client = boto3.client(
        "sqs", endpoint_url=f"http://127.0.0.1:{proxy.port}", region_name=sqs_server.region,
        aws_access_key_id=sqs_server.access_key, aws_secret_access_key=sqs_server.secret_key,
        config=BotoConfig(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}))
    received = Received()
    try:
        with capture_logs() as logs:
            running(make_source(sqs_queue, received, client=client))
            sqs.send_message(QueueUrl=sqs_queue, MessageBody=body(record("incoming/before.txt")))
            wait_until(lambda: received.keys() == ["incoming/before.txt"], what="the first event")
            wait_until(lambda: counts(sqs, sqs_queue) == (0, 0), what="the first message deleted")

            proxy.stop()
            sqs.send_message(QueueUrl=sqs_queue, MessageBody=body(record("incoming/during.txt")))
            wait_until(lambda: len(named(logs, "sqs.error")) >= 3, what="retries while the endpoint is down")
            assert received.keys() == ["incoming/before.txt"]
            proxy.start()
            wait_until(lambda: received.keys() == ["incoming/before.txt", "incoming/during.txt"],
                       what="the event sent while the endpoint was down")
            wait_until(lambda: counts(sqs, sqs_queue) == (0, 0), what="the message deleted")
    finally:
        proxy.stop()
    errors = named(logs, "sqs.error")
    # Only SQS calls failing to reach the endpoint, never an SQS error code nor an exception that
    # is not an SQS failure (action None). A receive is the usual one; a delete caught by the
    # outage under load is one too: its message comes back and is deduplicated.
    calls = {"ReceiveMessage", "DeleteMessageBatch", "ChangeMessageVisibilityBatch"}
    assert all(e["action"] in calls and e["error_code"] is None for e in errors), errors
    assert all("Could not connect" in e["error"] or "Connection was closed" in e["error"]
               for e in errors), errors
