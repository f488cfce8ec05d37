"""S3: what moves is what was scanned (docs/integrity.md, "S3 objects"), against the real daemon.

On an unversioned bucket an ETag is an MD5. The uploader here swaps an object for its MD5
twin: other bytes with the same ETag (the 2004 collision pair of Wang and Yu; a common
suffix keeps the MD5 equal), which every `IfMatch`/`CopySourceIfMatch` lets through. A YARA
rule matches only the twin, so whatever lands in `clean` tells which bytes were promoted.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import EICAR, Daemon
from emulators.perception_point import PerceptionPointEmulator
from fakes import FakeEngine
from realservers import HttpProxy, S3Server
from test_integrity import Pauses
from test_s3 import S3Harness

from daemon.journal import Journal
from daemon.model import FileState

_BLOCK = bytes.fromhex(
    "d131dd02c5e6eec4693d9a0698aff95c2fcab58712467eab4004583eb8fb7f8955ad340609f4b30283e488832571415a"
    "085125e8f7cdc99fd91dbdf280373c5bd8823e3156348f5bae6dacd436c919c6dd53e2b487da03fd02396306d248cda0"
    "e99f33420f577ee8ce54b67080a80d1ec69821bcb6a8839396f9652b6ff72a70")
_TWIN_BLOCK = bytes.fromhex(
    "d131dd02c5e6eec4693d9a0698aff95c2fcab50712467eab4004583eb8fb7f8955ad340609f4b30283e4888325f1415a"
    "085125e8f7cdc99fd91dbd7280373c5bd8823e3156348f5bae6dacd436c919c6dd53e23487da03fd02396306d248cda0"
    "e99f33420f577ee8ce54b67080280d1ec69821bcb6a8839396f965ab6ff72a70")
_TWIN_RULE = "rule md5_twin { strings: $b = { 2f ca b5 07 12 46 7e ab } condition: $b }\n"


def twins(suffix: bytes) -> tuple[bytes, bytes]:
    """(harmless, evil): two contents with the same MD5, so the same ETag on S3."""
    return _BLOCK + suffix, _TWIN_BLOCK + suffix


class Bucket:
    """The test's own view of the bucket: the uploader's puts, and what is where."""

    def __init__(self, server: S3Server, name: str) -> None:
        self.client = server.client()
        self.name = name

    def put(self, key: str, data: bytes) -> str:
        return str(self.client.put_object(Bucket=self.name, Key=key, Body=data)["ETag"])

    def get(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.name, Key=key)["Body"].read())

    def keys(self, prefix: str) -> list[str]:
        """Keys under `prefix` (relative to it), sidecars left out."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(o["Key"].removeprefix(prefix) for page in pages for o in page.get("Contents", ())
                      if not o["Key"].endswith(".scanwatch.json"))

    def snapshots(self) -> list[str]:
        return self.keys("in/.scanwatch/snapshots/")


@pytest.fixture
def bucket(s3_server: S3Server, s3_bucket: str, s3_env: dict[str, str]) -> Bucket:
    return Bucket(s3_server, s3_bucket)


@pytest.fixture
def pauses(tmp_path: Path) -> Pauses:
    return Pauses(tmp_path / "pauses")


def _config(tmp_path: Path, endpoint: str, bucket: str, *, engine: dict[str, Any] | None = None,
            s3: dict[str, Any] | None = None) -> Path:
    rules = tmp_path / "twin.yar"
    rules.write_text(_TWIN_RULE)
    path = tmp_path / "scanwatch.yaml"
    path.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"),
        "log": {"format": "json", "level": "info"},
        "s3": {"endpoint_url": endpoint, "region": "us-east-1", **(s3 or {})},
        "engines": {"default": engine or {"type": "yara", "rules": [str(rules)]}},
        "watches": [{"name": "w", "engine": "default", "source": f"s3://{bucket}/in/",
                     "clean": f"s3://{bucket}/clean/", "quarantine": f"s3://{bucket}/quarantine/",
                     "failed": f"s3://{bucket}/failed/", "poll_interval": 0.5}],
    }))
    return path


def _moved(daemon: Daemon, count: int) -> Callable[[], bool]:
    return lambda: len(daemon.named("file.moved")) >= count


# -- small objects: the staged copy is promoted -------------------------------------------------


def test_object_swapped_for_its_md5_twin_after_the_download_lands_as_scanned(
        bucket: Bucket, s3_server: S3Server, tmp_path: Path, pauses: Pauses,
        daemon_factory: Callable[..., Daemon]) -> None:
    harmless, evil = twins(b"small object")
    bucket.put("in/a.bin", harmless)
    daemon = daemon_factory(_config(tmp_path, s3_server.endpoint_url, bucket.name),
                            pauses.env("scan.hashed"))
    pauses.reached(daemon, "scan.hashed")  # downloaded and hashed, not judged yet
    bucket.put("in/a.bin", evil)  # same ETag: every ETag condition still holds
    pauses.go("scan.hashed")
    daemon.wait_for(_moved(daemon, 1), what="moved")
    assert daemon.stop() == 0
    assert bucket.keys("clean/") == ["a.bin"] and bucket.get("clean/a.bin") == harmless
    assert not list((tmp_path / "state" / "staging" / "s3").iterdir())


def test_racing_md5_twins_never_reach_clean(bucket: Bucket, s3_server: S3Server, tmp_path: Path,
                                            daemon_factory: Callable[..., Daemon]) -> None:
    """No pause points: the uploader flips every object between its twins while the daemon works."""
    count = 24
    pairs = {f"in/f{i:02d}.bin": twins(b"%d" % i * 64) for i in range(count)}
    etag = {key: bucket.put(key, harmless) for key, (harmless, _) in pairs.items()}
    daemon = daemon_factory(_config(tmp_path, s3_server.endpoint_url, bucket.name))

    def flip(keys: list[str]) -> None:  # only while the object is there: no PUT re-creates it
        live = set(keys)
        while live:
            for key in sorted(live):
                try:
                    for data in reversed(pairs[key]):
                        bucket.client.put_object(Bucket=bucket.name, Key=key, Body=data, IfMatch=etag[key])
                except bucket.client.exceptions.ClientError:
                    live.discard(key)

    racers = [threading.Thread(target=flip, args=(list(pairs)[i::6],)) for i in range(6)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(120)
    daemon.wait_for(lambda: not bucket.keys("in/"), timeout=60, what="the source drained")
    assert daemon.stop() == 0
    clean = bucket.keys("clean/")
    assert clean, "nothing was promoted: the race proved nothing"
    for name in clean:
        assert bucket.get(f"clean/{name}") == pairs[f"in/{name.partition('.')[0]}.bin"][0], name


def _move_hello(bucket: Bucket, s3_proxy: HttpProxy, tmp_path: Path,
                daemon_factory: Callable[..., Daemon]) -> None:
    """`in/a.txt` moved S3 to S3 by a daemon, in three requests on the object."""
    bucket.put("in/a.txt", b"hello")
    daemon = daemon_factory(_config(tmp_path, s3_proxy.endpoint_url, bucket.name))
    daemon.wait_for(_moved(daemon, 1), what="moved")
    assert daemon.stop() == 0
    assert bucket.get("clean/a.txt") == b"hello" and bucket.keys("in/") == []
    assert _on("a.txt", bucket, s3_proxy) == _THREE_REQUESTS


def test_unversioned_s3_to_s3_uploads_the_scanned_bytes_in_three_requests(
        bucket: Bucket, s3_proxy: HttpProxy, tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    _move_hello(bucket, s3_proxy, tmp_path, daemon_factory)
    assert s3_proxy.copies == []  # never a server-side copy of the live key


def test_versioned_s3_to_s3_copies_the_scanned_version_server_side(
        bucket: Bucket, s3_proxy: HttpProxy, tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    bucket.client.put_bucket_versioning(Bucket=bucket.name, VersioningConfiguration={"Status": "Enabled"})
    _move_hello(bucket, s3_proxy, tmp_path, daemon_factory)
    ((_, copied),) = s3_proxy.copies
    assert "versionId=" in copied  # the immutable version: nothing staged, nothing snapshotted
    assert not any((tmp_path / "state" / "staging" / "s3").iterdir()) and bucket.snapshots() == []


_THREE_REQUESTS = [("GET", "in/a.txt"), ("PUT", "clean/a.txt"), ("DELETE", "in/a.txt")]


def _on(name: str, bucket: Bucket, s3_proxy: HttpProxy) -> list[tuple[str, str]]:
    """The requests the daemon made about objects named `name`: method and key."""
    return [(m, p.partition("?")[0].rpartition(f"/{bucket.name}/")[2]) for m, p, _ in s3_proxy.requests
            if name in p]


def test_a_lost_staged_copy_is_downloaded_again_and_checked(
        bucket: Bucket, s3_server: S3Server, tmp_path: Path, pauses: Pauses,
        daemon_factory: Callable[..., Daemon]) -> None:
    harmless, evil = twins(b"staged")
    bucket.put("in/a.bin", harmless)
    config = _config(tmp_path, s3_server.endpoint_url, bucket.name)
    first = daemon_factory(config, pauses.env("move.start"))
    pauses.reached(first, "move.start")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    staging = tmp_path / "state" / "staging" / "s3"
    staging.mkdir(parents=True, exist_ok=True)
    staged_at_kill = [p.read_bytes() for p in staging.iterdir()]
    for staged in staging.iterdir():
        staged.unlink()  # lost: only the pinned download remains, and its ETag is an MD5
    (staging / "999.snap").write_bytes(b"no row stands for this")
    bucket.put("in/a.bin", evil)
    second = daemon_factory(config)
    second.wait_for(lambda: not bucket.keys("in/"), what="the source drained")
    assert second.stop() == 0
    assert bucket.keys("clean/") == [] and bucket.get("quarantine/a.bin") == evil
    assert second.named("file.changed") and not list(staging.iterdir())
    assert staged_at_kill == [harmless]


# -- large objects: a private server-side snapshot -------------------------------------------------


def test_large_object_is_scanned_and_promoted_from_a_private_snapshot(
        bucket: Bucket, s3_proxy: HttpProxy, tmp_path: Path, pauses: Pauses,
        daemon_factory: Callable[..., Daemon]) -> None:
    harmless, evil = twins(os.urandom(4096))
    bucket.put("in/big.bin", harmless)
    daemon = daemon_factory(_config(tmp_path, s3_proxy.endpoint_url, bucket.name,
                                    s3={"snapshot_threshold": 1024}), pauses.env("scan.snapshotted"))
    pauses.reached(daemon, "scan.snapshotted")
    (snapshot,) = bucket.snapshots()
    bucket.put("in/big.bin", evil)  # the live key changes: the snapshot does not
    pauses.go("scan.snapshotted")
    daemon.wait_for(_moved(daemon, 1), what="moved")
    assert daemon.stop() == 0
    assert bucket.get("clean/big.bin") == harmless
    assert bucket.snapshots() == [] and bucket.keys("in/") == []  # the twin went with its ETag
    snapshot_key = f"in/.scanwatch/snapshots/{snapshot}"
    copies = [(path.partition("?")[0].rpartition("/")[2], source.partition("?")[0].split("/", 1)[1])
              for path, source in s3_proxy.copies]
    assert copies == [(snapshot.rpartition("/")[2], "in/big.bin"), ("big.bin", snapshot_key)]
    assert s3_proxy.count("GET", snapshot_key) == 1 and s3_proxy.count("GET", "in/big.bin") == 0


def test_snapshot_and_promotion_above_the_multipart_threshold(
        s3_server: S3Server, s3_bucket: str, tmp_path: Path, s3_env: dict[str, str]) -> None:
    h = S3Harness(s3_server, s3_bucket, tmp_path, FakeEngine(),
                  top_s3={"snapshot_threshold": 1024, "multipart_threshold": 1024,
                          "multipart_chunksize": "5MiB"})
    data = os.urandom(5 * 2**20 + 4321)
    h.put("in/big.bin", data)
    h.step()
    assert h.get("clean/big.bin") == data and h.tags("clean/big.bin")["scanwatch-verdict"] == "clean"
    assert h.keys("in/") == []  # snapshot and source deleted
    (row,) = h.rows()
    assert row.snapshot is not None and row.snapshot.startswith("in/.scanwatch/snapshots/")


@pytest.mark.parametrize("point", ["scan.snapshotted", "move.start"])
def test_kill_9_between_snapshot_and_move_finishes_once(
        bucket: Bucket, s3_server: S3Server, tmp_path: Path, pauses: Pauses, point: str,
        daemon_factory: Callable[..., Daemon]) -> None:
    data = os.urandom(8192)
    bucket.put("in/big.bin", data)
    config = _config(tmp_path, s3_server.endpoint_url, bucket.name, s3={"snapshot_threshold": 1024})
    first = daemon_factory(config, pauses.env(point))
    pauses.reached(first, point)
    assert len(bucket.snapshots()) == 1
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    node = (tmp_path / "state" / "node-id").read_text().strip()
    bucket.put(f"in/.scanwatch/snapshots/{node}/999-0123", b"left by a crash, no row")
    second = daemon_factory(config)
    second.wait_for(lambda: not bucket.keys("in/"), what="source and snapshots gone")
    assert second.stop() == 0
    assert bucket.keys("clean/") == ["big.bin"] and bucket.get("clean/big.bin") == data
    rows = Journal(tmp_path / "state" / "journal.sqlite3").rows()
    assert [(r.rel_path, r.state) for r in rows] == [("big.bin", FileState.DONE)]


# -- Perception Point reads the snapshot by path --------------------------------------------------


@pytest.mark.parametrize("versioned", [False, True])
def test_perception_point_with_storage_is_sent_the_snapshot_path(
        bucket: Bucket, s3_server: S3Server, tmp_path: Path, versioned: bool,
        daemon_factory: Callable[..., Daemon]) -> None:
    if versioned:
        bucket.client.put_bucket_versioning(Bucket=bucket.name,
                                            VersioningConfiguration={"Status": "Enabled"})
    bucket.put("in/docs/a.txt", b"hello")
    bucket.put("in/e.com", EICAR)

    def read(name: str, key: str) -> bytes | None:
        try:
            return bucket.get(key) if name == bucket.name else None
        except bucket.client.exceptions.NoSuchKey:
            return None

    with PerceptionPointEmulator(polls_to_done=1, storages={"s3": read}) as emulator:
        engine = {"type": "perception_point", "url": emulator.url, "token": "${PP_TOKEN}",
                  "storage": "s3", "poll_interval": 0.2}
        daemon = daemon_factory(_config(tmp_path, s3_server.endpoint_url, bucket.name, engine=engine),
                                {"PP_TOKEN": "test-token"})
        daemon.wait_for(_moved(daemon, 2), timeout=30, what="both moved")
        assert daemon.stop() == 0
        sent = [e.fields for e in emulator.submissions()]
    assert len(sent) == 2 and all(f["storage"] == "s3" and "data_bytes" not in f for f in sent)
    paths = sorted(f["path"] for f in sent)
    assert all(p.startswith(f"{bucket.name}/in/.scanwatch/snapshots/") for p in paths), paths
    assert bucket.get("clean/docs/a.txt") == b"hello" and bucket.keys("quarantine/") == ["e.com"]
    left = bucket.client.list_object_versions(Bucket=bucket.name, Prefix="in/.scanwatch/")
    assert not left.get("Versions") and not left.get("DeleteMarkers")  # no version kept, no marker
