"""EventBridge-shaped SQS bodies (`detail-type: Object Created`): parsed, and received from moto SQS."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote_plus

import pytest
from hypothesis import given
from hypothesis import strategies as st
from realservers import SqsServer
from test_s3events import BUCKET, FAST_RETRY, PREFIX, Received, body, encoded_keys, record, sns_wrapped

from daemon.errors import MalformedMessageError
from daemon.watchers.s3messages import S3Event, parse_message
from daemon.watchers.sqs import SqsEventSource

# Keys that S3's own encoding changes: spaces, '+', '%', non-ASCII, reserved characters.
AWKWARD_KEYS = ["incoming/my report (1).pdf", "incoming/a+b c.txt", "incoming/100% sure?.txt",
                "incoming/café/日本📄.txt", "incoming/x=1&y=2;z#.bin", "incoming/%41+%2B.txt"]


def eventbridge(key: str, *, detail_type: str = "Object Created", bucket: str = BUCKET,
                size: int | None = 5, etag: str | None = "b1946ac92492d2347c6235b4d2611184",
                version_id: str | None = "IYV3p45BT0ac8hjHg1houSdS1a.Mro8e",
                reason: str | None = "PutObject") -> str:
    """An event as S3 sends it to EventBridge and an SQS target delivers it (docs/fleet.md).

    `key` is given as it appears in the event, i.e. already encoded.
    """
    obj: dict[str, Any] = {"key": key, "sequencer": "617f08299329d189"}
    for name, value in (("size", size), ("etag", etag), ("version-id", version_id)):
        if value is not None:
            obj[name] = value
    detail: dict[str, Any] = {"version": "0", "bucket": {"name": bucket}, "object": obj,
                              "request-id": "N4N7GDK58NMKJ12R", "requester": "123456789012",
                              "source-ip-address": "1.2.3.4"}
    if reason is not None:
        detail["reason"] = reason
    return json.dumps({
        "version": "0", "id": "17793124-05d4-b198-2fde-7ededc63b103", "detail-type": detail_type,
        "source": "aws.s3", "account": "111122223333", "time": "2026-11-12T00:00:00Z",
        "region": "ca-central-1", "resources": [f"arn:aws:s3:::{bucket}"], "detail": detail})


def test_object_created_is_one_event_with_every_field() -> None:
    (event,) = parse_message(eventbridge("incoming/my+report+%281%29.pdf", reason="CompleteMultipartUpload"))
    assert event == S3Event(BUCKET, "incoming/my report (1).pdf", "b1946ac92492d2347c6235b4d2611184",
                            "IYV3p45BT0ac8hjHg1houSdS1a.Mro8e", 5, "617f08299329d189",
                            "ObjectCreated:CompleteMultipartUpload")


def test_optional_fields_may_be_missing() -> None:
    (event,) = parse_message(eventbridge("incoming/a", size=None, etag=None, version_id=None, reason=None))
    assert (event.etag, event.version_id, event.size, event.event_name) == (
        None, None, None, "ObjectCreated:PutObject")


@pytest.mark.parametrize("detail_type", ["Object Deleted", "Object Restore Completed", "Object Tags Added"])
def test_other_s3_event_types_give_nothing(detail_type: str) -> None:
    assert parse_message(eventbridge("incoming/a", detail_type=detail_type, etag=None, size=None)) == []


@pytest.mark.parametrize(("raw", "reason"), [
    (json.dumps({"detail-type": "Object Created"}), "EventBridge event has no detail object"),
    (json.dumps({"detail-type": "Object Created", "detail": "x"}), "EventBridge event has no detail object"),
    (json.dumps({"detail-type": 3, "detail": {}}), "detail-type is int, not str"),
    (json.dumps({"detail-type": "Object Created", "detail": {"bucket": {"name": BUCKET}, "object": {}}}),
     "event has no detail.object.key"),
    (json.dumps({"detail-type": "Object Created", "detail": {"object": {"key": "a"}}}),
     "event has no detail.bucket.name"),
    (eventbridge(""), "detail.object.key is empty"),
    (eventbridge("incoming/%C3%28"), "detail.object.key is not percent-encoded UTF-8"),
    (eventbridge("incoming/a", size="5"), "event.detail.object.size is str, not int"),  # type: ignore[arg-type]
    (eventbridge("incoming/a", etag=7), "event.detail.object.etag is int, not str"),  # type: ignore[arg-type]
])
def test_malformed_eventbridge_bodies_say_why(raw: str, reason: str) -> None:
    with pytest.raises(MalformedMessageError) as caught:
        parse_message(raw)
    assert str(caught.value).startswith(reason)


@given(encoded_keys(), st.booleans())
def test_any_encoded_key_round_trips_in_eventbridge_shape(pair: tuple[str, str], via_sns: bool) -> None:
    key, encoded = pair
    raw = eventbridge(encoded)
    (event,) = parse_message(sns_wrapped(raw) if via_sns else raw)
    assert event.key == key


@pytest.mark.parametrize("key", AWKWARD_KEYS)
def test_both_shapes_give_the_same_event_key(key: str) -> None:
    encoded = quote_plus(key, safe="/")
    (direct,) = parse_message(body(record(encoded)))
    (bridged,) = parse_message(eventbridge(encoded))
    assert direct.key == bridged.key == key


def test_eventbridge_and_notification_bodies_arrive_through_sqs(sqs_server: SqsServer,
                                                                 sqs_queue: str) -> None:
    sqs = sqs_server.client()
    for index, key in enumerate(AWKWARD_KEYS):
        encoded = quote_plus(key, safe="/")
        message = eventbridge(encoded) if index % 2 else body(record(encoded))
        sqs.send_message(QueueUrl=sqs_queue, MessageBody=sns_wrapped(message) if index % 3 == 0 else message)
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=eventbridge("elsewhere/x.txt"))
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=eventbridge("incoming/a", bucket="other-bucket"))
    received = Received()
    source = SqsEventSource(sqs, sqs_queue, received, bucket=BUCKET, prefix=PREFIX, wait_time_s=1,
                            visibility_timeout_s=5, retry=FAST_RETRY)
    total = 0
    for _ in range(10):
        total += source.poll_once()
        if total >= len(AWKWARD_KEYS) + 2:
            break
    assert sorted(received.keys()) == sorted(AWKWARD_KEYS)
    attrs = sqs.get_queue_attributes(QueueUrl=sqs_queue, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == attrs["ApproximateNumberOfMessagesNotVisible"] == "0"
