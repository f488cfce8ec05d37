"""The lean path of the per-object S3 calls (daemon/s3requests.py) against SeaweedFS: the same
conditions, versions, errors and retries as boto3, on requests boto3 did not send."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from realservers import HttpProxy, ProxiedRequest, ProxyAnswer, S3Server

from daemon.config import S3Config
from daemon.errors import S3ConditionError, S3UnavailableError
from daemon.locations.s3scan import copy_hashing
from daemon.s3client import make_client, s3_boundary
from daemon.s3requests import MAX_ATTEMPTS, USER_AGENT


class Seen:
    """What a proxy in front of SeaweedFS saw: each request's method, path and User-Agent."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []
        # What lean requests get instead of S3's answer: each of `answers` once, then `always`.
        self.answers: list[ProxyAnswer] = []
        self.always: ProxyAnswer | None = None

    def __call__(self, request: ProxiedRequest) -> ProxyAnswer | None:
        agent = str(request.headers.get("User-Agent", ""))
        self.requests.append((request.method, request.path, agent))
        if agent != USER_AGENT:
            return None
        return self.answers.pop(0) if self.answers else self.always

    def lean(self, method: str) -> int:
        """How many `method` requests the lean path sent (boto3's name Botocore in their agent)."""
        return sum(1 for m, _, agent in self.requests if m == method and agent == USER_AGENT)


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def proxy(s3_server: S3Server, seen: Seen) -> Iterator[HttpProxy]:
    proxy = HttpProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]), intercept=seen)
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture
def client(proxy: HttpProxy, s3_server: S3Server, s3_env: dict[str, str], s3_bucket: str) -> Any:
    """The daemon's client through the recording proxy, with the bucket's place already learnt
    (a bucket's first call is boto3's)."""
    made = make_client(S3Config(endpoint_url=proxy.endpoint_url, region=s3_server.region))
    made.put_object(Bucket=s3_bucket, Key="learn", Body=b"x", IfNoneMatch="*")
    return made


def _get(client: Any, bucket: str, key: str, **conditions: str) -> bytes:
    answer = client.get_object(Bucket=bucket, Key=key, **conditions)
    with answer["Body"] as body:
        return bytes(body.read())


def test_a_conditional_put_is_refused_when_the_key_exists(client: Any, s3_bucket: str, seen: Seen) -> None:
    client.put_object(Bucket=s3_bucket, Key="k", Body=b"first", IfNoneMatch="*")
    with pytest.raises(S3ConditionError), s3_boundary("PUT"):
        client.put_object(Bucket=s3_bucket, Key="k", Body=b"second", IfNoneMatch="*", Tagging="a=b")
    assert _get(client, s3_bucket, "k") == b"first"
    assert seen.lean("PUT") >= 2 and seen.lean("GET") == 1


def test_keys_of_any_characters_round_trip(client: Any, s3_bucket: str, seen: Seen) -> None:
    for key in ("a b/ü+é%20&=?.txt", "dir//x~y", "ünï/çødé (1).bin"):
        put = client.put_object(Bucket=s3_bucket, Key=key, Body=key.encode(), IfNoneMatch="*",
                                Tagging="t=v w")
        assert _get(client, s3_bucket, key) == key.encode()
        assert client.head_object(Bucket=s3_bucket, Key=key)["ETag"] == put["ETag"]  # the proxy's HEAD has
        tags = client.get_object_tagging(Bucket=s3_bucket, Key=key)["TagSet"]       # no Content-Length
        assert tags == [{"Key": "t", "Value": "v w"}]
        client.delete_object(Bucket=s3_bucket, Key=key)
        with pytest.raises(FileNotFoundError), s3_boundary("GET"):
            client.get_object(Bucket=s3_bucket, Key=key)
    assert seen.lean("DELETE") == 3 and seen.lean("HEAD") == 3


def test_a_get_of_a_version_id_reads_that_version(client: Any, s3_bucket: str, seen: Seen) -> None:
    client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    first = client.put_object(Bucket=s3_bucket, Key="v", Body=b"one")["VersionId"]
    second = client.put_object(Bucket=s3_bucket, Key="v", Body=b"two")["VersionId"]
    assert first != second
    answer = client.get_object(Bucket=s3_bucket, Key="v", VersionId=first)
    assert answer["VersionId"] == first and answer["Body"].read() == b"one"
    assert _get(client, s3_bucket, "v") == b"two"
    client.copy_object(Bucket=s3_bucket, Key="copy", CopySource={"Bucket": s3_bucket, "Key": "v",
                                                                  "VersionId": first}, IfNoneMatch="*")
    assert _get(client, s3_bucket, "copy") == b"one"
    client.delete_object(Bucket=s3_bucket, Key="v", VersionId=first)
    with pytest.raises(FileNotFoundError), s3_boundary("GET"):
        client.get_object(Bucket=s3_bucket, Key="v", VersionId=first)
    assert seen.lean("GET") == 4 and seen.lean("DELETE") == 1


def test_a_delete_with_a_stale_if_match_is_refused(client: Any, s3_bucket: str, seen: Seen) -> None:
    old = client.put_object(Bucket=s3_bucket, Key="d", Body=b"scanned")["ETag"]
    client.put_object(Bucket=s3_bucket, Key="d", Body=b"replaced since")
    with pytest.raises(S3ConditionError), s3_boundary("DELETE"):
        client.delete_object(Bucket=s3_bucket, Key="d", IfMatch=old)
    with pytest.raises(S3ConditionError), s3_boundary("GET"):
        client.get_object(Bucket=s3_bucket, Key="d", IfMatch=old)
    assert _get(client, s3_bucket, "d") == b"replaced since"
    assert seen.lean("DELETE") == 1


def test_bad_credentials_give_a_clear_error_without_the_secret(
        proxy: HttpProxy, s3_server: S3Server, s3_env: dict[str, str], s3_bucket: str, seen: Seen,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    secret = "Not-The-Secret-" + "x" * 24
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    client = make_client(S3Config(endpoint_url=proxy.endpoint_url, region=s3_server.region))
    caplog.set_level(logging.DEBUG)  # botocore logs its signing at debug: never the secret
    for _ in range(2):  # boto3's (the bucket's first call), then the lean path's
        with pytest.raises(S3UnavailableError) as caught, s3_boundary(f"PUT s3://{s3_bucket}/k"):
            client.put_object(Bucket=s3_bucket, Key="k", Body=b"x", IfNoneMatch="*")
        assert "SignatureDoesNotMatch" in str(caught.value)
        chain: BaseException | None = caught.value
        while chain is not None:
            assert secret not in f"{chain} {chain!r} {chain.args}"
            chain = chain.__cause__ or chain.__context__
    assert seen.lean("PUT") == 1
    assert secret not in caplog.text


def test_503_is_retried_then_fails_as_unavailable(client: Any, s3_bucket: str, seen: Seen) -> None:
    seen.always = (503, {}, b"<Error><Code>ServiceUnavailable</Code><Message>busy</Message></Error>")
    with pytest.raises(S3UnavailableError, match="ServiceUnavailable"), s3_boundary("GET"):
        client.get_object(Bucket=s3_bucket, Key="learn")
    assert seen.lean("GET") == MAX_ATTEMPTS
    seen.always = (412, {}, b"<Error><Code>PreconditionFailed</Code><Message>no</Message></Error>")
    with pytest.raises(S3ConditionError), s3_boundary("DELETE"):
        client.delete_object(Bucket=s3_bucket, Key="learn", IfMatch='"0"')
    assert seen.lean("DELETE") == 1  # a refused condition is an answer, not retried


def test_throttling_then_an_answer_succeeds(client: Any, s3_bucket: str, seen: Seen) -> None:
    seen.answers = [(503, {}, b"<Error><Code>SlowDown</Code><Message>later</Message></Error>"),
                    (500, {}, b"")]
    assert _get(client, s3_bucket, "learn") == b"x"
    assert seen.lean("GET") == 3


def test_connection_refused_is_retried_then_fails_as_unavailable(
        proxy: HttpProxy, client: Any, s3_bucket: str) -> None:
    proxy.stop()
    started = time.monotonic()
    with pytest.raises(S3UnavailableError, match="Could not connect to the endpoint URL"), s3_boundary("GET"):
        client.get_object(Bucket=s3_bucket, Key="learn")
    assert time.monotonic() - started < 5


def test_a_body_cut_short_fails_instead_of_reading_fewer_bytes(
        s3_server: S3Server, s3_env: dict[str, str]) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nETag: \"e\"\r\n\r\n" + b"y" * 10)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    client = make_client(S3Config(endpoint_url=f"http://127.0.0.1:{listener.getsockname()[1]}",
                                  region=s3_server.region))
    try:
        for _ in range(2):  # boto3's, then the lean path's
            with pytest.raises(S3UnavailableError), s3_boundary("GET"):
                body = client.get_object(Bucket="b-short", Key="k")["Body"]
                copy_hashing(body, None)
    finally:
        listener.close()
    assert client._places["b-short"] is not None
