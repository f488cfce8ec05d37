"""Every S3 object version is an arrival with its own outcome: real daemons, SeaweedFS and moto."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit
from xml.sax.saxutils import escape

import pytest
import yaml
from clamd_server import free_port
from conftest import EICAR, Daemon
from realservers import HttpProxy, ProxiedRequest, ProxyAnswer, S3Server, SqsServer

from daemon.journal import open_journal
from daemon.model import FileState


class Watch:
    """One S3 watch `s3://bucket/in/` of a real daemon, and the bucket as its users see it."""

    def __init__(self, server: S3Server, bucket: str, base: Path, env: dict[str, str],
                 start: Callable[..., Daemon]) -> None:
        self.s3 = server.client()
        self.server, self.bucket, self.base, self.env, self._start = server, bucket, base, env, start
        self.config_path = base / "scanwatch.yaml"
        self.metrics_port = free_port()

    def configure(self, *, endpoint_url: str | None = None, engine: dict[str, Any] | None = None,
                  s3: dict[str, Any] | None = None, **watch: Any) -> Path:
        where = f"s3://{self.bucket}"
        self.config_path.write_text(yaml.safe_dump({
            "state_dir": str(self.base / "state"), "log": {"format": "json", "level": "debug"},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
            "s3": {"endpoint_url": endpoint_url or self.server.endpoint_url, "region": self.server.region,
                   **(s3 or {})},
            "engines": {"default": {"type": "yara", **(engine or {})}},
            "watches": [{"name": "w", "engine": "default", "source": f"{where}/in/",
                         "clean": f"{where}/clean/", "quarantine": f"{where}/quarantine/",
                         "failed": f"{where}/failed/",
                         "poll_interval": 0.5, **watch}]}))
        return self.config_path

    def start(self) -> Daemon:
        daemon = self._start(self.config_path, env=self.env)
        daemon.wait_started()
        return daemon

    def put(self, key: str, data: bytes) -> dict[str, Any]:
        return dict(self.s3.put_object(Bucket=self.bucket, Key=key, Body=data))

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"].removeprefix(prefix) for page in pages for o in page.get("Contents", ())
                      if not o["Key"].endswith(".scanwatch.json") and "/.scanwatch/" not in o["Key"])

    def tags(self, key: str, version_id: str | None = None) -> dict[str, str]:
        pinned = {"VersionId": version_id} if version_id else {}
        tag_set = self.s3.get_object_tagging(Bucket=self.bucket, Key=key, **pinned)["TagSet"]
        return {t["Key"]: t["Value"] for t in tag_set}

    def verdict(self, key: str, version_id: str | None = None) -> str | None:
        return self.tags(key, version_id).get("scanwatch-verdict")

    def rows(self) -> list[Any]:
        return open_journal(self.base / "state").rows()

    def status(self) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--json", "--config",
                              str(self.config_path)], capture_output=True, text=True, check=True)
        return dict(json.loads(out.stdout)["watches"]["w"])

    def metric(self, name: str, labels: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        prefix = f"{name}{{{labels}}} "
        return next((float(line.removeprefix(prefix)) for line in text.splitlines()
                     if line.startswith(prefix)), 0.0)


@pytest.fixture
def watch(s3_server: S3Server, s3_bucket: str, tmp_path: Path, s3_env: dict[str, str],
          daemon_factory: Callable[..., Daemon]) -> Iterator[Watch]:
    yield Watch(s3_server, s3_bucket, tmp_path, s3_env, daemon_factory)


def _next_second() -> None:
    """Unversioned, a version is its ETag and LastModified, in whole seconds (docs/contract.md):
    the same bytes uploaded again within the second of the version judged are that version."""
    time.sleep(1.05)


def _settle(daemon: Daemon, rounds_s: float = 2.0) -> None:
    """Let a few listing rounds (every 0.5 s) pass."""
    time.sleep(rounds_s)
    assert daemon.proc.poll() is None


# -- move mode ---------------------------------------------------------------------------------------

def test_the_same_bytes_uploaded_again_are_scanned_and_moved_again(watch: Watch) -> None:
    watch.configure()
    daemon = watch.start()
    watch.put("in/hello.txt", b"hello")
    watch.put("in/e.com", EICAR)
    daemon.wait_for(lambda: watch.keys("clean/") == ["hello.txt"] and watch.keys("quarantine/") == ["e.com"],
                    what="first uploads placed")
    _next_second()
    watch.put("in/hello.txt", b"hello")
    watch.put("in/e.com", EICAR)
    daemon.wait_for(lambda: watch.keys("clean/") == ["hello.1.txt", "hello.txt"]
                    and watch.keys("quarantine/") == ["e.1.com", "e.com"], what="second uploads placed")
    assert daemon.stop() == 0
    watch.put("in/hello.txt", b"hello")  # while no daemon runs: the restart finds it
    daemon = watch.start()
    daemon.wait_for(lambda: len(watch.keys("clean/")) == 3, what="third upload placed after a restart")
    _settle(daemon)
    assert daemon.stop() == 0
    assert watch.keys("in/") == []
    assert watch.keys("clean/") == ["hello.1.txt", "hello.2.txt", "hello.txt"]
    assert [r.state for r in watch.rows()] == [FileState.DONE] * 5


@pytest.mark.parametrize("snapshots", [False, True], ids=["staged", "snapshot"])
def test_the_same_bytes_sent_again_by_event_are_moved_again(watch: Watch, sqs_server: SqsServer,
                                                            sqs_queue: str, snapshots: bool) -> None:
    # `snapshot`: scanned from a server-side snapshot (docs/integrity.md); neither an event nor
    # the snapshot says the source's LastModified, yet each version is placed (docs/fleet.md).
    watch.configure(s3={"snapshot_threshold": 1} if snapshots else None, poll_interval=3600,
                    events={"sqs_queue_url": sqs_queue, "endpoint_url": sqs_server.endpoint_url,
                            "region": sqs_server.region, "visibility_timeout": 2})
    daemon = watch.start()
    sqs = sqs_server.client()

    def upload_with_event() -> None:
        etag = str(watch.put("in/hello.txt", b"hello")["ETag"]).strip('"')
        record = {"eventName": "ObjectCreated:Put", "eventSource": "aws:s3", "s3": {
            "bucket": {"name": watch.bucket}, "object": {"key": "in/hello.txt", "size": 5, "eTag": etag}}}
        sqs.send_message(QueueUrl=sqs_queue, MessageBody=json.dumps({"Records": [record]}))

    upload_with_event()
    daemon.wait_for(lambda: watch.keys("clean/") == ["hello.txt"], what="moved by its event")
    _next_second()
    upload_with_event()
    daemon.wait_for(lambda: watch.keys("clean/") == ["hello.1.txt", "hello.txt"], what="moved again")
    _next_second()
    upload_with_event()
    daemon.wait_for(lambda: watch.keys("clean/") == ["hello.1.txt", "hello.2.txt", "hello.txt"],
                    what="moved a third time")
    assert daemon.stop() == 0
    assert watch.keys("in/") == []
    assert len({watch.tags(f"clean/{key}")["scanwatch-source-version"] for key in watch.keys("clean/")}) == 3


# -- in place ---------------------------------------------------------------------------------------

def test_in_place_on_a_versioned_bucket_tags_each_new_version(watch: Watch) -> None:
    watch.s3.put_bucket_versioning(Bucket=watch.bucket, VersioningConfiguration={"Status": "Enabled"})
    watch.configure(clean="in_place", quarantine="in_place")
    daemon = watch.start()
    first = watch.put("in/a.txt", b"harmless")["VersionId"]
    daemon.wait_for(lambda: watch.verdict("in/a.txt", first) == "clean", what="A tagged clean")
    second = watch.put("in/a.txt", EICAR)["VersionId"]
    daemon.wait_for(lambda: watch.verdict("in/a.txt", second) == "infected", what="EICAR tagged infected")
    third = watch.put("in/a.txt", b"harmless")["VersionId"]
    daemon.wait_for(lambda: watch.verdict("in/a.txt", third) == "clean", what="A again tagged clean")
    _settle(daemon)
    assert daemon.stop() == 0
    assert [watch.verdict("in/a.txt", v) for v in (first, second, third)] == ["clean", "infected", "clean"]
    assert len(watch.rows()) == 3  # tagging a version is not a new version
    assert daemon.named("config.warning") == []


def test_in_place_on_an_unversioned_bucket_tags_the_same_bytes_uploaded_again(watch: Watch) -> None:
    watch.configure(clean="in_place", quarantine="in_place")
    daemon = watch.start()
    watch.put("in/a.txt", b"harmless")
    daemon.wait_for(lambda: watch.verdict("in/a.txt") == "clean", what="A tagged clean")
    watch.put("in/a.txt", EICAR)
    daemon.wait_for(lambda: watch.verdict("in/a.txt") == "infected", what="EICAR tagged infected")
    watch.put("in/a.txt", b"harmless")
    daemon.wait_for(lambda: watch.verdict("in/a.txt") == "clean", what="A again tagged clean")
    _next_second()
    watch.put("in/a.txt", b"harmless")  # the very same bytes once more: a new upload, untagged
    daemon.wait_for(lambda: watch.verdict("in/a.txt") == "clean", what="the same bytes tagged again")
    _settle(daemon)
    assert daemon.stop() == 0
    # The rewrite that tags an object is remembered as the version judged: not a new arrival.
    assert len(watch.rows()) == 4 and {r.state for r in watch.rows()} == {FileState.DONE}
    [warning] = daemon.named("config.warning")
    assert warning["reason"] == "unversioned_bucket" and "MD5" in warning["detail"]


def test_seaweedfs_honours_if_match_on_put_object(watch: Watch) -> None:
    """The ground the unversioned in-place rewrite stands on (docs/contract.md, "S3 in place")."""
    from botocore.exceptions import ClientError

    etag = watch.put("in/a.txt", b"one")["ETag"]
    with pytest.raises(ClientError) as refused:
        watch.s3.put_object(Bucket=watch.bucket, Key="in/a.txt", Body=b"two", IfMatch='"0123"')
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    watch.s3.put_object(Bucket=watch.bucket, Key="in/a.txt", Body=b"two", IfMatch=etag)
    assert watch.s3.get_object(Bucket=watch.bucket, Key="in/a.txt")["Body"].read() == b"two"


@pytest.mark.slow
def test_a_put_racing_the_in_place_tag_never_ends_up_tagged_clean(watch: Watch) -> None:
    """Harmless bytes, then EICAR put over them about when the daemon tags: many tries.

    Whatever the order, an object tagged clean holds the harmless bytes (the ones scanned).
    """
    import random
    import threading

    watch.configure(clean="in_place", quarantine="in_place", engine={"concurrency": 4})
    daemon = watch.start()
    rng = random.Random(22)
    tries, deadline = 150, time.monotonic() + 90
    keys = [f"in/race/{n}.txt" for n in range(tries)]

    def race(key: str, delay_s: float) -> None:
        watch.put(key, b"harmless")
        time.sleep(delay_s)
        watch.put(key, EICAR)

    for start in range(0, tries, 10):
        threads = [threading.Thread(target=race, args=(key, rng.uniform(0.0, 0.4)))
                   for key in keys[start:start + 10]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert time.monotonic() < deadline, f"only {start} tries in time"
    daemon.wait_for(lambda: all(watch.verdict(k) == "infected" for k in keys), timeout=60,
                    what="every key ends infected")
    assert daemon.stop() == 0
    for key in keys:
        body = watch.s3.get_object(Bucket=watch.bucket, Key=key)["Body"].read()
        assert (watch.verdict(key), body) == ("infected", EICAR)


class NonAtomicStore:
    """SeaweedFS behind HttpProxy, played as a store whose conditional writes race a PUT.

    Once, when the daemon writes to `key` (the in-place tag of docs/contract.md, "S3 in place"),
    a PUT of `racing` bytes lands in between: a self-copy conditional on the source's ETag
    (`x-amz-copy-source-if-match`) is checked, then the racing PUT lands, then the copy reads
    whatever is there, as a store whose copy is not atomic does (SeaweedFS was seen doing it);
    a PutObject conditional on the object's ETag (`If-Match`) is forwarded as sent after the
    racing PUT, and the store checks the condition against what is there now.
    """

    def __init__(self, s3: Any, bucket: str, key: str, racing: bytes) -> None:
        self.s3, self.bucket, self.key, self.racing = s3, bucket, key, racing
        self.raced: list[str] = []  # the kinds of write raced: "copy", "put"

    def __call__(self, request: ProxiedRequest) -> ProxyAnswer | None:
        at_key = urlsplit(request.path).path == quote(f"/{self.bucket}/{self.key}")
        if self.raced or request.method != "PUT" or not at_key:
            return None
        source = unquote(request.headers.get("x-amz-copy-source") or "").lstrip("/")
        condition = request.headers.get("x-amz-copy-source-if-match")
        if source == f"{self.bucket}/{self.key}" and condition:
            return self._copy_after_the_race(request, condition)
        if request.headers.get("If-Match"):
            self._race("put")
        return None

    def _race(self, kind: str) -> None:
        self.raced.append(kind)
        self.s3.put_object(Bucket=self.bucket, Key=self.key, Body=self.racing)

    def _copy_after_the_race(self, request: ProxiedRequest, condition: str) -> ProxyAnswer:
        if self.s3.head_object(Bucket=self.bucket, Key=self.key)["ETag"] != condition:
            return 412, {}, b"<Error><Code>PreconditionFailed</Code></Error>"
        self._race("copy")
        copied = self.s3.copy_object(
            Bucket=self.bucket, Key=self.key, CopySource={"Bucket": self.bucket, "Key": self.key},
            MetadataDirective="COPY", TaggingDirective=request.headers.get("x-amz-tagging-directive", "COPY"),
            Tagging=request.headers.get("x-amz-tagging", ""))["CopyObjectResult"]
        when = copied["LastModified"].strftime("%Y-%m-%dT%H:%M:%S.000Z")
        result = f"<CopyObjectResult><ETag>{escape(copied['ETag'])}</ETag>" \
                 f"<LastModified>{when}</LastModified></CopyObjectResult>"
        return 200, {"Content-Type": "application/xml"}, result.encode()


def test_a_put_racing_the_in_place_tag_on_a_store_without_atomic_copies_is_never_tagged_clean(
        watch: Watch, s3_server: S3Server) -> None:
    """The in-place write lets a racing PUT in between on purpose: it is refused, never tagged."""
    store = NonAtomicStore(watch.s3, watch.bucket, "in/a.txt", EICAR)
    proxy = HttpProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]), intercept=store)
    proxy.start()
    try:
        watch.configure(endpoint_url=proxy.endpoint_url, clean="in_place", quarantine="in_place")
        daemon = watch.start()
        watch.put("in/a.txt", b"harmless")
        daemon.wait_for(lambda: store.raced and watch.verdict("in/a.txt"), what="the raced write tagged")
        tagged = watch.verdict("in/a.txt")
        body = watch.s3.get_object(Bucket=watch.bucket, Key="in/a.txt")["Body"].read()
        assert (tagged, body) != ("clean", EICAR), "the racing PUT's bytes were tagged clean"
        daemon.wait_for(lambda: watch.verdict("in/a.txt") == "infected", what="the racing bytes judged")
        _settle(daemon)
        assert daemon.stop() == 0
    finally:
        proxy.stop()
    assert store.raced == ["put"]  # one conditional PutObject, raced once: the store refused it
    assert proxy.count("PUT", "/in/a.txt", 412) == 1
    body = watch.s3.get_object(Bucket=watch.bucket, Key="in/a.txt")["Body"].read()
    assert (watch.verdict("in/a.txt"), body) == ("infected", EICAR)


# -- keys never scanned, sizes before bytes -----------------------------------------------------------

def test_dot_files_and_part_names_are_scanned_and_ignored_keys_are_reported_once(watch: Watch) -> None:
    watch.configure()  # the default for an S3 source: nothing ignored
    daemon = watch.start()
    watch.put("in/x/", b"")
    watch.put("in/.env", b"SECRET=1")
    watch.put("in/report.part", b"part")
    daemon.wait_for(lambda: watch.keys("clean/") == [".env", "report.part"], what="dot and part names moved")
    daemon.wait_for(lambda: daemon.named("file.skipped"), what="the folder marker reported")
    assert daemon.stop() == 0
    reported = [(e["rel_path"], e["reason"]) for e in daemon.named("file.skipped")]
    assert reported == [("x/", "directory_marker")]
    watch.configure(ignore=["*.skip"])
    daemon = watch.start()
    watch.put("in/a.skip", b"ignored on purpose")
    daemon.wait_for(lambda: daemon.named("file.skipped"), what="the ignored key reported")
    _settle(daemon)
    # Each once, across listings and restarts.
    assert [(e["rel_path"], e["reason"]) for e in daemon.named("file.skipped")] == [("a.skip", "ignored")]
    assert watch.metric("scanwatch_files_skipped", 'reason="ignored",watch="w"') == 1.0
    assert watch.metric("scanwatch_files_skipped", 'reason="directory_marker",watch="w"') == 1.0
    assert daemon.stop() == 0
    assert watch.status()["skipped"] == {"directory_marker": 1, "ignored": 1}
    assert watch.keys("in/") == ["a.skip", "x/"]  # left where they are


def test_an_object_listed_over_max_size_fails_too_large_without_a_download(
        watch: Watch, s3_proxy: HttpProxy) -> None:
    watch.configure(endpoint_url=s3_proxy.endpoint_url, engine={"max_size": 1000})
    daemon = watch.start()
    watch.put("in/big.bin", b"x" * 5000)
    watch.put("in/small.txt", b"small")
    daemon.wait_for(lambda: watch.keys("failed/") == ["big.bin"] and watch.keys("clean/") == ["small.txt"],
                    what="placed")
    assert daemon.stop() == 0
    downloads = [path for method, path, _ in s3_proxy.requests
                 if method == "GET" and path.split("?")[0].endswith("/in/big.bin") and "tagging" not in path]
    assert downloads == []
    [row] = [r for r in watch.rows() if r.rel_path == "big.bin"]
    assert row.reason == "too_large" and "as listed" in str(row.raw_result)
    assert s3_proxy.count("GET", "/in/small.txt") >= 1  # the counting sees downloads


# -- SQS operations -------------------------------------------------------------------------------

def test_an_unreadable_message_is_logged_once_then_counted(watch: Watch, sqs_server: SqsServer,
                                                          sqs_queue: str) -> None:
    watch.configure(poll_interval=3600, events={"sqs_queue_url": sqs_queue,
                                                "endpoint_url": sqs_server.endpoint_url,
                                                "region": sqs_server.region, "visibility_timeout": 1})
    daemon = watch.start()
    sqs_server.client().send_message(QueueUrl=sqs_queue, MessageBody="not json at all")
    daemon.wait_for(lambda: watch.metric("scanwatch_sqs_malformed_total", 'watch="w"') >= 3, timeout=30,
                    what="received three times")
    assert daemon.stop() == 0
    assert len(daemon.named("sqs.malformed")) == 1
    assert [e["event"] for e in daemon.named("sqs.no_redrive_policy")] == ["sqs.no_redrive_policy"]
    assert "redrive policy" in watch.status()["events"]["advice"]


# -- fleets -----------------------------------------------------------------------------------------

def test_a_fleet_of_two_moves_the_same_bytes_uploaded_again(
        s3_server: S3Server, s3_bucket: str, sqs_server: SqsServer, sqs_queue: str, tmp_path: Path,
        s3_env: dict[str, str], daemon_factory: Callable[..., Daemon]) -> None:
    from fleetkit import Fleet

    fleet = Fleet(s3_server.client(), sqs_server.client(), s3_bucket, sqs_queue, tmp_path,
                  s3_server.endpoint_url, sqs_server.endpoint_url, s3_server.region)
    nodes = [daemon_factory(fleet.config(n), env=s3_env) for n in (0, 1)]
    for node in nodes:
        node.wait_started()
    names = [f"f{n}.txt" for n in range(6)] + ["e.com"]
    body: Callable[[str], bytes] = lambda name: EICAR if name.endswith(".com") else name.encode()  # noqa: E731
    fleet.put(names, body)
    fleet.send_events(names, duplicates=0.5)
    nodes[0].wait_for(lambda: len(fleet.placed()) == len(names) and not fleet.keys("in/"), timeout=30,
                      what="first uploads placed")
    _next_second()
    fleet.put(names, body)  # the same bytes again: the same ETags, new versions
    fleet.send_events(names, duplicates=0.5)
    nodes[0].wait_for(lambda: len(fleet.placed()) == 2 * len(names) and not fleet.keys("in/"), timeout=30,
                      what="second uploads placed")
    _settle(nodes[0])
    assert [node.stop() for node in nodes] == [0, 0]
    assert fleet.keys("quarantine/") == ["e.1.com", "e.com"]
    assert fleet.keys("clean/") == sorted([f"f{n}.txt" for n in range(6)] + [f"f{n}.1.txt" for n in range(6)])
