"""S3 sources and destinations against a real S3 server (SeaweedFS from tests/realservers.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import EICAR, Daemon, local_watcher, wait_until
from fakes import FakeEngine, answers, raises
from hypothesis import given
from hypothesis import strategies as st
from realservers import S3Server, SqsServer, TcpProxy
from structlog.testing import capture_logs

from daemon.cli import main
from daemon.config import Config, YaraEngineConfig
from daemon.engines.base import Engine, ScanRequest
from daemon.engines.yara import YaraEngine
from daemon.errors import EngineUnavailableError, LocationError, UnsafePathError
from daemon.journal import Journal, owner_token
from daemon.model import FileState, Verdict, VerdictKind
from daemon.naming import flat_name, local_rel
from daemon.pipeline import Pipeline
from daemon.retry import RetryPolicy
from daemon.s3url import is_s3
from daemon.watchers.s3 import S3Watcher


class S3Harness:
    """One watch with S3 (or local) locations, its journal, an engine and a pipeline, stepped by hand."""

    def __init__(self, server: S3Server, bucket: str, tmp_path: Path, engine: Engine,
                 top_s3: dict[str, Any] | None = None, **watch: Any) -> None:
        self.bucket = bucket
        self.client = server.client()
        self.tmp_path = tmp_path
        where = {"source": f"s3://{bucket}/in/", "clean": f"s3://{bucket}/clean/",
                 "quarantine": f"s3://{bucket}/quarantine/", "failed": f"s3://{bucket}/failed/",
                 **watch}
        self.config = Config.model_validate({
            "state_dir": str(tmp_path / "state"),
            "s3": {"endpoint_url": server.endpoint_url, "region": server.region, **(top_s3 or {})},
            "engines": {"default": {"type": "yara"}},
            "watches": [{"name": "w", "engine": "default", "settle_seconds": 0, **where}],
        })
        self.journal = Journal(tmp_path / "state" / "journal.sqlite3")
        self.pipeline = Pipeline(self.config, self.journal, {"default": engine}, owner=owner_token(),
                                 policy=RetryPolicy(base_s=60, max_s=60))
        watch_cfg = self.config.watches[0]
        wake = threading.Event()
        s3 = self.config.s3_for(watch_cfg)
        self.watcher = (S3Watcher(watch_cfg, self.journal, wake, self.pipeline.s3(s3), s3)
                        if is_s3(watch_cfg.source) else local_watcher(watch_cfg, self.journal, wake))

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def step(self) -> None:
        self.watcher.poll_once() if isinstance(self.watcher, S3Watcher) else self.watcher.step()
        while self.pipeline.run_once(["w"]):
            pass

    def keys(self, prefix: str) -> list[str]:
        """Keys under `prefix` (relative to it), sidecars left out."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"].removeprefix(prefix) for page in pages for o in page.get("Contents", ())
                      if not o["Key"].endswith(".scanwatch.json"))

    def get(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def tags(self, key: str) -> dict[str, str]:
        tag_set = self.client.get_object_tagging(Bucket=self.bucket, Key=key)["TagSet"]
        return {t["Key"]: t["Value"] for t in tag_set}

    def rows(self) -> list[Any]:
        return self.journal.rows()


@pytest.fixture
def harness(s3_server: S3Server, s3_bucket: str, tmp_path: Path, s3_env: dict[str, str]
            ) -> Callable[..., S3Harness]:
    def make(engine: Engine | None = None, **kw: Any) -> S3Harness:
        return S3Harness(s3_server, s3_bucket, tmp_path, engine or YaraEngine("default", _yara()), **kw)
    return make


def _yara() -> YaraEngineConfig:
    return YaraEngineConfig(type="yara")


def _states(h: S3Harness) -> list[tuple[str, FileState]]:
    return sorted((r.rel_path, r.state) for r in h.rows())


def test_a_held_key_deleted_is_gone_at_the_next_whole_listing_and_news_if_put_again(
        harness: Callable[..., S3Harness]) -> None:
    """docs/operations.md, "Journal retention": held rows are reconciled with the listing."""
    h = harness(ignore=["*.skip"])
    h.put("in/x/", b"")
    h.put("in/a.skip", b"ignored on purpose")
    with capture_logs() as logs:
        h.watcher.poll_once()
        assert _states(h) == [("a.skip", FileState.HELD), ("x/", FileState.HELD)]
        h.client.delete_object(Bucket=h.bucket, Key="in/a.skip")
        h.watcher.poll_once()
        assert _states(h) == [("a.skip", FileState.GONE), ("x/", FileState.HELD)]
        h.watcher.poll_once()  # the marker still there: still held, not reported again
        h.put("in/a.skip", b"again")
        h.watcher.poll_once()
    assert _states(h) == [("a.skip", FileState.GONE), ("a.skip", FileState.HELD), ("x/", FileState.HELD)]
    assert sorted(e["rel_path"] for e in logs if e["event"] == "file.skipped") == ["a.skip", "a.skip", "x/"]


# -- S3 → S3 ----------------------------------------------------------------------------------------


def test_s3_to_s3_clean_infected_and_failed(harness: Callable[..., S3Harness]) -> None:
    engine = FakeEngine()
    h = harness(engine)
    h.put("in/a.txt", b"hello")
    h.put("in/deep/er/e.com", EICAR)
    h.step()
    assert h.keys("clean/") == ["a.txt"]
    assert h.get("clean/a.txt") == b"hello"
    assert h.keys("quarantine/") == ["deep/er/e.com"]
    assert h.keys("in/") == []
    sidecar = json.loads(h.get("quarantine/deep/er/e.com.scanwatch.json"))
    assert sidecar["verdict"] == "infected"
    assert sidecar["source"] == f"s3://{h.bucket}/in/deep/er/e.com"
    assert sidecar["destination"] == f"s3://{h.bucket}/quarantine/deep/er/e.com"
    assert sidecar["external_reference_id"].startswith("w:deep/er/e.com#")
    assert h.tags("quarantine/deep/er/e.com")["scanwatch-verdict"] == "infected"
    assert h.tags("clean/a.txt")["scanwatch-verdict"] == "clean"

    engine.script.append(answers(Verdict.failed("encrypted")))
    h.put("in/locked.zip", b"PK...")
    h.step()
    assert h.keys("failed/") == ["locked.zip"]
    assert h.tags("failed/locked.zip")["scanwatch-reason"] == "encrypted"
    assert json.loads(h.get("failed/locked.zip.scanwatch.json"))["reason"] == "encrypted"


def test_keys_with_spaces_unicode_plus_and_percent(harness: Callable[..., S3Harness]) -> None:
    h = harness()
    names = ["a b.txt", "ünï cödé/ß.txt", "1+1=2.txt", "100%/x%20y.txt", "d/e/f/g/h/i/j/k.txt"]
    for name in names:
        h.put(f"in/{name}", name.encode())
    h.step()
    assert h.keys("clean/") == sorted(names)
    assert all(h.get(f"clean/{name}") == name.encode() for name in names)


def test_collision_gets_a_suffix_and_nothing_is_overwritten(harness: Callable[..., S3Harness]) -> None:
    h = harness()
    h.put("clean/same.txt", b"already there")
    h.put("in/same.txt", b"new")
    h.step()
    assert h.get("clean/same.txt") == b"already there"
    assert h.get("clean/same.1.txt") == b"new"


def test_object_replaced_between_scan_and_move_promotes_the_scanned_bytes_and_keeps_the_new_ones(
        harness: Callable[..., S3Harness]) -> None:
    h = harness()
    replaced = threading.Event()

    def swap(request: ScanRequest) -> Verdict:
        if not replaced.is_set():
            replaced.set()
            h.put("in/a.txt", EICAR)  # the bytes change after they were scanned clean
            return Verdict(VerdictKind.CLEAN)
        return Verdict(VerdictKind.INFECTED, threats=("EICAR",))

    engine = FakeEngine(script=[swap, swap])
    h.pipeline.engines = {"default": engine}
    h.put("in/a.txt", b"harmless")
    h.step()
    # The staged copy that was scanned is promoted; the new upload is left as a new arrival.
    assert h.keys("clean/") == ["a.txt"] and h.get("clean/a.txt") == b"harmless"
    assert h.keys("in/") == ["a.txt"]
    h.step()
    assert h.keys("quarantine/") == ["a.txt"] and h.get("quarantine/a.txt") == EICAR
    assert h.keys("in/") == [] and len(engine.calls) == 2
    assert not list((h.tmp_path / "state" / "staging" / "s3").iterdir())


def test_versioned_object_replaced_between_scan_and_move_moves_the_scanned_version(
        harness: Callable[..., S3Harness]) -> None:
    h = harness()
    h.client.put_bucket_versioning(Bucket=h.bucket, VersioningConfiguration={"Status": "Enabled"})

    def swap(request: ScanRequest) -> Verdict:
        if len(engine.calls) == 1:
            h.put("in/a.txt", EICAR)  # a new version lands while the listed one is judged
        if EICAR in os.pread(request.bytes_fd, 1 << 16, 0):
            return Verdict(VerdictKind.INFECTED, threats=("EICAR",))
        return Verdict(VerdictKind.CLEAN)

    engine = FakeEngine(script=[swap, swap])
    h.pipeline.engines = {"default": engine}
    h.put("in/a.txt", b"harmless")
    h.step()  # the version the download served is the one judged, copied and deleted
    assert h.keys("clean/") == ["a.txt"] and h.get("clean/a.txt") == b"harmless"
    h.step()  # the new version is a new arrival
    assert h.keys("quarantine/") == ["a.txt"] and h.get("quarantine/a.txt") == EICAR
    assert h.keys("in/") == []


def test_multipart_copy_above_a_lowered_threshold(harness: Callable[..., S3Harness]) -> None:
    h = harness(top_s3={"multipart_threshold": 1024, "multipart_chunksize": "5MiB"})
    data = os.urandom(5 * 2**20 + 12345)  # two parts
    h.put("in/big.bin", data)
    h.step()
    assert h.get("clean/big.bin") == data
    assert h.tags("clean/big.bin")["scanwatch-verdict"] == "clean"


def test_a_listing_again_adds_nothing_and_a_new_version_is_a_new_arrival(
        harness: Callable[..., S3Harness]) -> None:
    h = harness()
    h.put("in/a.txt", b"one")
    with capture_logs() as logs:
        assert h.watcher.poll_once() == 1
        assert h.watcher.poll_once() == 0
    assert [(e["watch"], e["rel_path"], e["by"]) for e in logs if e["event"] == "file.discovered"] \
        == [("w", "a.txt", "listing")]  # one record per file, once
    h.put("in/folder/", b"")
    assert h.watcher.poll_once() == 0  # a folder marker is held and reported, never scanned
    h.put("in/a.txt", b"two")
    assert h.watcher.poll_once() == 1  # replaced before its scan: the row follows it
    h.step()
    assert h.keys("clean/") == ["a.txt"] and h.get("clean/a.txt") == b"two"


def test_engine_reading_s3_itself_gets_the_object_not_a_download(harness: Callable[..., S3Harness]) -> None:
    seen: list[ScanRequest] = []

    def record(request: ScanRequest) -> Verdict:
        seen.append(request)
        return Verdict(VerdictKind.CLEAN)

    h = harness(FakeEngine(reads_s3=True, script=[record, record]))
    h.put("in/old.txt", b"unversioned")
    h.step()
    h.client.put_bucket_versioning(Bucket=h.bucket, VersioningConfiguration={"Status": "Enabled"})
    h.put("in/x/a.txt", b"hello")
    h.step()
    unversioned, request = seen
    # Only a VersionId pins what the engine reads: else it gets the hashed copy (docs/integrity.md).
    assert unversioned.fd is not None and unversioned.s3 is not None and unversioned.s3.url == ""
    assert request.fd is None and request.s3 is not None and request.s3.version_id
    assert (request.s3.bucket, request.s3.key) == (h.bucket, "in/x/a.txt")
    assert request.sha256 == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert "Signature=" in request.s3.url and f"versionId={request.s3.version_id}" in request.s3.url
    assert h.keys("clean/") == ["old.txt", "x/a.txt"]


# -- S3 ↔ local ----------------------------------------------------------------------------------


def test_s3_to_local_and_unsafe_keys(harness: Callable[..., S3Harness], tmp_path: Path) -> None:
    local = {k: str(tmp_path / k) for k in ("clean", "quarantine", "failed")}
    h = harness(**local)
    h.put("in/dir/a.txt", b"hello")
    h.put("in/e.com", EICAR)
    long_segment = "é" * 200  # 400 bytes: no local file system takes that name
    h.put(f"in/{long_segment}/x", b"unsafe")
    h.step()
    assert (tmp_path / "clean/dir/a.txt").read_bytes() == b"hello"
    quarantined = tmp_path / "quarantine/e.com"
    assert quarantined.read_bytes() == EICAR and quarantined.stat().st_mode & 0o777 == 0o600
    (failed,) = [p.name for p in (tmp_path / "failed").iterdir() if not p.name.endswith(".json")]
    assert failed.startswith("%C3%A9%C3%A9") and len(failed.encode()) <= 200
    sidecar = json.loads((tmp_path / "failed" / f"{failed}.scanwatch.json").read_text())
    assert sidecar["reason"] == "unsafe_key"
    (row,) = [r for r in h.rows() if r.rel_path.startswith(long_segment)]
    assert (row.reason, row.sha256) == ("unsafe_key", None)  # failed before anything was read
    assert h.keys("in/") == []


def test_local_to_s3(harness: Callable[..., S3Harness], tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    h = harness(source=str(inbox), top_s3={"multipart_chunksize": "5MiB"})
    big = os.urandom(6 * 2**20)  # a multipart upload
    (inbox / "sub" / "big.bin").write_bytes(big)
    (inbox / "e.com").write_bytes(EICAR)
    h.step()
    assert h.get("clean/sub/big.bin") == big
    assert h.get("quarantine/e.com") == EICAR
    assert h.tags("quarantine/e.com")["scanwatch-verdict"] == "infected"
    assert [p.name for p in inbox.rglob("*")] == ["sub"]


def test_local_names_that_are_not_utf8_fail_to_s3_as_unsafe_name(harness: Callable[..., S3Harness],
                                                                  tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    h = harness(source=str(inbox))
    for name, data in ((b"bad\xff.txt", b"fine"), (b"evil\xfe.com", EICAR)):
        with open(os.fsencode(inbox) + b"/" + name, "wb") as f:
            f.write(data)
    h.step()
    assert h.keys("failed/") == ["bad%FF%2Etxt", "evil%FE%2Ecom"] and os.listdir(inbox) == []
    sidecar = json.loads(h.get("failed/evil%FE%2Ecom.scanwatch.json"))
    assert sidecar["reason"] == "unsafe_name" and sidecar["threats"] == ["EICAR_Test_File"]
    assert {r.reason for r in h.rows()} == {"unsafe_name"}


@given(st.text(st.characters(codec="utf-8"), max_size=300))
def test_keys_become_local_paths_only_when_safe(rel: str) -> None:
    try:
        path = local_rel(rel)
    except UnsafePathError:
        assert any(p == ".." or "\0" in p or len(p.encode()) > 255 for p in rel.split("/")) or not \
            rel.strip("/.")
        return
    parts = path.split("/")
    assert all(p not in ("", ".", "..") and "\0" not in p for p in parts)
    assert os.path.normpath(os.path.join("/root", path)).startswith("/root/")


@given(st.text(st.characters(codec="utf-8"), max_size=400),
       st.text(st.characters(codec="utf-8"), max_size=400))
def test_flat_names_are_one_safe_segment_and_distinct(a: str, b: str) -> None:
    for rel in (a, b):
        name = flat_name(rel)
        assert "/" not in name and "\0" not in name and name not in (".", "..")
        assert 0 < len(name.encode()) <= 200
        assert re.fullmatch(r"([^%@]|%[0-9A-F]{2})*(@[0-9a-f]{12})?", name)  # no escape cut in half
    assert (flat_name(a) == flat_name(b)) == (a == b)


def test_a_watch_own_s3_settings_are_used_for_listing_scanning_and_moving(
        harness: Callable[..., S3Harness], s3_server: S3Server, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The top level points at nothing and the environment's keys are wrong: only the
    # watch's endpoint and profile can reach the bucket.
    aws_config = tmp_path / "aws-config"
    aws_config.write_text(f"[profile drop]\naws_access_key_id = {s3_server.access_key}\n"
                          f"aws_secret_access_key = {s3_server.secret_key}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(aws_config))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    h = harness(top_s3={"endpoint_url": "http://127.0.0.1:9"},
                s3={"endpoint_url": s3_server.endpoint_url, "profile": "drop"})
    h.put("in/a.txt", b"hello")
    h.put("in/e.com", EICAR)
    h.step()
    assert (h.keys("clean/"), h.keys("quarantine/"), h.keys("in/")) == (["a.txt"], ["e.com"], [])


# -- failures ---------------------------------------------------------------------------------------


def test_missing_bucket_waits_without_failing(harness: Callable[..., S3Harness]) -> None:
    h = harness(clean="s3://no-such-bucket-here/clean/")
    h.put("in/a.txt", b"hello")
    h.step()
    (row,) = h.rows()
    assert row.state is FileState.VERDICT and "no-such-bucket-here" in (row.last_error or "")
    assert h.keys("in/") == ["a.txt"]  # left where it was


def test_s3_down_and_back(s3_server: S3Server, s3_bucket: str, tmp_path: Path,
                          s3_env: dict[str, str]) -> None:
    proxy = TcpProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]))
    proxy.start()
    through_proxy = dataclasses.replace(s3_server, endpoint_url=f"http://127.0.0.1:{proxy.port}")
    h = S3Harness(through_proxy, s3_bucket, tmp_path, FakeEngine())
    h.put("in/a.txt", b"one")
    h.watcher.poll_once()
    proxy.stop()
    with pytest.raises(LocationError):  # the listing fails; the watcher's loop retries it
        h.watcher.poll_once()
    while h.pipeline.run_once(["w"]):
        pass
    (row,) = h.rows()
    assert row.state is FileState.STABLE and row.attempts == 0  # waited, no attempt spent
    assert "Could not connect" in (row.last_error or "")
    proxy.start()
    h.journal.apply([(row.id, {"next_attempt_at": 0})])
    h.step()
    assert h.keys("clean/") == ["a.txt"] and h.keys("in/") == []


def test_an_internal_error_fails_the_object_once(harness: Callable[..., S3Harness]) -> None:
    h = harness(FakeEngine(script=[raises(RuntimeError("bug"))]))
    h.put("in/a.txt", b"x")
    h.step()
    assert h.keys("failed/") == ["a.txt"]
    (row,) = h.rows()
    assert (row.state, row.reason) == (FileState.DONE, "internal_error")


def test_engine_down_leaves_objects_in_place(harness: Callable[..., S3Harness]) -> None:
    h = harness(FakeEngine(script=[raises(EngineUnavailableError("down"))]))
    h.put("in/a.txt", b"x")
    h.step()
    (row,) = h.rows()
    assert row.state is FileState.STABLE and h.keys("in/") == ["a.txt"]


# -- the daemon --------------------------------------------------------------------------------------


def _daemon_config(tmp_path: Path, server: S3Server, bucket: str, workers: int = 1, **watch: Any) -> Path:
    path = tmp_path / "scanwatch.yaml"
    path.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "workers": workers,
        "log": {"format": "json", "level": "info"},
        "s3": {"endpoint_url": server.endpoint_url, "region": server.region},
        "engines": {"default": {"type": "yara", "concurrency": 4}},
        "watches": [{"name": "w", "engine": "default", "source": f"s3://{bucket}/in/",
                     "clean": f"s3://{bucket}/clean/", "quarantine": f"s3://{bucket}/quarantine/",
                     "failed": f"s3://{bucket}/failed/", "poll_interval": 1, **watch}],
    }))
    return path


def _put_many(h: S3Harness, count: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: h.put(f"in/{i % 10}/f{i}.txt", b"x" * (i % 50) if i % 100 else EICAR),
                      range(count)))


@pytest.mark.parametrize("workers", [1, 2])
def test_daemon_backfills_1000_objects_and_survives_kill_9(
        harness: Callable[..., S3Harness], s3_server: S3Server, tmp_path: Path,
        s3_env: dict[str, str], daemon_factory: Callable[..., Daemon], workers: int) -> None:
    h = harness()
    _put_many(h, 1000)
    config = _daemon_config(tmp_path, s3_server, h.bucket, workers)
    first = daemon_factory(config, env=s3_env)
    first.wait_for(lambda: len(first.named("file.moved")) >= 200, timeout=60, what="200 moved")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    second = daemon_factory(config, env=s3_env)
    second.wait_for(lambda: not h.keys("in/"), timeout=120, what="source drained")
    second.wait_for(lambda: len(h.keys("clean/")) + len(h.keys("quarantine/")) >= 1000, timeout=30,
                    what="all placed")
    assert second.stop() == 0
    assert second.named("raw") == []  # every line of the log is one whole record
    clean, quarantined = h.keys("clean/"), h.keys("quarantine/")
    assert len(clean) == 990 and len(quarantined) == 10
    assert not set(clean) & set(quarantined)
    assert all(".1." not in k for k in clean)  # nothing placed twice
    done = h.journal.rows(states=[FileState.DONE])
    assert len(done) == 1000


@pytest.mark.parametrize("workers", [1, 2])
def test_daemon_takes_sqs_events(harness: Callable[..., S3Harness], s3_server: S3Server,
                                 sqs_server: SqsServer, sqs_queue: str, tmp_path: Path,
                                 s3_env: dict[str, str], daemon_factory: Callable[..., Daemon],
                                 workers: int) -> None:
    h = harness()
    config = _daemon_config(tmp_path, s3_server, h.bucket, workers, poll_interval=3600,
                            events={"sqs_queue_url": sqs_queue, "endpoint_url": sqs_server.endpoint_url,
                                    "region": sqs_server.region})
    daemon = daemon_factory(config, env=s3_env)
    daemon.wait_started()
    h.put("in/by event.txt", b"hello")
    etag = h.client.head_object(Bucket=h.bucket, Key="in/by event.txt")["ETag"].strip('"')
    record = {"eventName": "ObjectCreated:Put", "eventSource": "aws:s3", "s3": {
        "bucket": {"name": h.bucket}, "object": {"key": "in/by+event.txt", "size": 5, "eTag": etag}}}
    sqs = sqs_server.client()
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=json.dumps({"Records": [record, record]}))
    sqs.send_message(QueueUrl=sqs_queue, MessageBody=json.dumps({"Event": "s3:TestEvent"}))
    daemon.wait_for(lambda: h.keys("clean/") == ["by event.txt"], timeout=30, what="moved by event")
    assert daemon.stop() == 0
    assert len(h.journal.rows()) == 1


def test_scan_command_takes_s3_urls(harness: Callable[..., S3Harness], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    h = harness()
    h.put("in/a.txt", b"hello")
    h.put("in/e.com", EICAR)
    config = tmp_path / "scanwatch.yaml"
    config.write_text(yaml.safe_dump(json.loads(h.config.model_dump_json())))
    urls = [f"s3://{h.bucket}/in/a.txt", f"s3://{h.bucket}/in/e.com"]
    assert main(["scan", "--config", str(config), "--json", urls[0]]) == 0
    assert main(["scan", "--config", str(config), *urls]) == 1
    assert h.keys("in/") == ["a.txt", "e.com"]  # scanning moves nothing
    assert main(["scan", "--config", str(config), f"s3://{h.bucket}/in/missing"]) == 3
    capsys.readouterr()
    assert main(["scan", "--config", str(config), "--move", "--json", *urls]) == 1
    lines = [r for r in map(json.loads, capsys.readouterr().out.splitlines()) if "path" in r]  # not logs
    assert [r["destination"] for r in lines] == [f"s3://{h.bucket}/clean/a.txt",
                                                 f"s3://{h.bucket}/quarantine/e.com"]
    assert h.keys("in/") == [] and h.keys("quarantine/") == ["e.com"]


def test_quarantine_release_and_delete_on_s3(harness: Callable[..., S3Harness], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    h = harness()
    h.put("in/one/e.com", EICAR)
    h.put("in/two.com", EICAR + b" ")
    h.step()
    config = tmp_path / "scanwatch.yaml"
    config.write_text(yaml.safe_dump(json.loads(h.config.model_dump_json())))
    ids = {r.rel_path: r.id for r in h.rows()}
    capsys.readouterr()
    assert main(["quarantine", "show", "--config", str(config), str(ids["one/e.com"])]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["sidecar"]["destination"] == f"s3://{h.bucket}/quarantine/one/e.com"

    assert main(["quarantine", "release", "--config", str(config), str(ids["one/e.com"]),
                 "--reason", "false positive"]) == 0
    assert h.keys("clean/") == ["one/e.com"] and h.get("clean/one/e.com") == EICAR
    assert main(["quarantine", "delete", "--config", str(config), str(ids["two.com"]),
                 "--reason", "malware"]) == 0
    listing = h.client.list_objects_v2(Bucket=h.bucket, Prefix="quarantine/").get("Contents", [])
    assert listing == []  # files and sidecars gone
    trail = {a.action: a for i in ids.values() for a in h.journal.audit_trail(i)}
    assert trail["release"].reason == "false positive" and trail["delete"].reason == "malware"


def test_s3_watch_workers_are_sized_for_io_and_engine_calls_held_to_its_concurrency(
        harness: Callable[..., S3Harness]) -> None:
    in_flight, most = [0], [0]
    lock = threading.Lock()

    def counted(request: ScanRequest) -> Verdict:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        threading.Event().wait(0.02)  # an engine taking its time: others pile up at its door
        with lock:
            in_flight[0] -= 1
        return Verdict(VerdictKind.CLEAN)

    engine = FakeEngine(script=[counted] * 40)
    h = harness(engine)
    assert h.config.engines["default"].concurrency == 2
    for i in range(40):
        h.put(f"in/{i:02d}.txt", b"x")
    h.watcher.poll_once()
    h.pipeline.start()
    try:
        wait_until(lambda: len(h.keys("clean/")) == 40, 60, "all 40 objects moved")
    finally:
        assert h.pipeline.stop(30)
    assert len(h.pipeline._threads) == 32
    assert most[0] <= 2  # the engine's concurrency holds across all the workers
    assert h.pipeline.engines == {"default": engine}


def test_the_s3_and_sqs_boundaries_translate_what_botocore_raises() -> None:
    """What boto3 raises becomes scanwatch's errors (docs/contract.md); anything else passes."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    from daemon.errors import LocationError, QueueUnavailableError, S3ConditionError, S3UnavailableError
    from daemon.s3client import s3_boundary, sqs_boundary

    def client_error(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"}}, "GetObject")

    cases: list[tuple[BaseException, type[BaseException]]] = [
        (client_error("NoSuchKey"), FileNotFoundError), (client_error("412"), S3ConditionError),
        (client_error("SlowDown"), S3UnavailableError), (client_error("Other"), LocationError),
        (EndpointConnectionError(endpoint_url="http://x"), S3UnavailableError),
        (ConnectionResetError(), S3UnavailableError), (FileNotFoundError(), FileNotFoundError),
        (ValueError("v"), ValueError)]
    for raised, expected in cases:
        with pytest.raises(expected) as caught, s3_boundary("GET s3://b/k"):
            raise raised
        assert type(caught.value) is expected
    for raised in (client_error("AccessDenied"), EndpointConnectionError(endpoint_url="http://x")):
        with pytest.raises(QueueUnavailableError), sqs_boundary("ReceiveMessage", "q"):
            raise raised
    with pytest.raises(KeyError), sqs_boundary("ReceiveMessage", "q"):
        raise KeyError("k")
