"""Which SQS endpoint an `events:` watch talks to: boto3's usual configuration (docs/contract.md)."""

from __future__ import annotations

import pytest
from realservers import SqsServer
from test_s3events import BUCKET, FAST_RETRY, PREFIX, Received, body, record

from daemon.config import EventsConfig, S3Config
from daemon.s3client import make_sqs_client
from daemon.watchers.sqs import SqsEventSource


def _aws_shaped(queue_url: str) -> str:
    """The same queue named by an AWS URL: only the endpoint decides where requests go."""
    return f"https://sqs.us-east-1.amazonaws.com/123456789012/{queue_url.rsplit('/', 1)[1]}"


@pytest.mark.parametrize("by", ["AWS_ENDPOINT_URL_SQS", "events.endpoint_url"])
def test_the_sqs_endpoint_comes_from_the_environment_or_events_endpoint_url(
        sqs_server: SqsServer, sqs_queue: str, monkeypatch: pytest.MonkeyPatch, by: str) -> None:
    for name, value in (("AWS_ACCESS_KEY_ID", sqs_server.access_key),
                        ("AWS_SECRET_ACCESS_KEY", sqs_server.secret_key)):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    if by == "AWS_ENDPOINT_URL_SQS":
        monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", sqs_server.endpoint_url)
        events = EventsConfig(sqs_queue_url=_aws_shaped(sqs_queue))
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", "http://127.0.0.1:9")  # the config's key wins
        events = EventsConfig(sqs_queue_url=_aws_shaped(sqs_queue), endpoint_url=sqs_server.endpoint_url)
    client = make_sqs_client(events, S3Config())
    assert client.meta.endpoint_url == sqs_server.endpoint_url
    assert client.meta.region_name == "us-east-1"  # the queue URL's
    sqs_server.client().send_message(QueueUrl=sqs_queue, MessageBody=body(record("incoming/a.txt")))
    received = Received()
    source = SqsEventSource(client, events.sqs_queue_url, received, bucket=BUCKET, prefix=PREFIX,
                            wait_time_s=1, visibility_timeout_s=5, retry=FAST_RETRY)
    for _ in range(5):
        if source.poll_once():
            break
    assert received.keys() == ["incoming/a.txt"]
    left = sqs_server.client().receive_message(QueueUrl=sqs_queue, WaitTimeSeconds=0)
    assert left.get("Messages", []) == []  # deleted once journaled
