"""S3 objects judged in place (tags on exactly the scanned version), on a real SeaweedFS."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import EICAR
from fakes import FakeEngine
from realservers import S3Server
from structlog.testing import capture_logs
from test_s3 import S3Harness

from daemon.cli import main
from daemon.config import Config, YaraEngineConfig
from daemon.engines.base import Engine, ScanRequest
from daemon.engines.yara import YaraEngine
from daemon.journal import Journal, owner_token
from daemon.model import FileState, Verdict, VerdictKind
from daemon.pipeline import Pipeline

IN_PLACE = {"clean": "in_place", "quarantine": "in_place"}


@pytest.fixture
def harness(s3_server: S3Server, s3_bucket: str, tmp_path: Path, s3_env: dict[str, str]
            ) -> Callable[..., S3Harness]:
    def make(engine: Engine | None = None, **kw: Any) -> S3Harness:
        yara = YaraEngine("default", YaraEngineConfig(type="yara"))
        return S3Harness(s3_server, s3_bucket, tmp_path, engine or yara, **kw)
    return make


def _tags(h: S3Harness, key: str, version_id: str | None = None) -> dict[str, str]:
    pinned = {"VersionId": version_id} if version_id else {}
    tag_set = h.client.get_object_tagging(Bucket=h.bucket, Key=key, **pinned)["TagSet"]
    return {t["Key"]: t["Value"] for t in tag_set}


def _swap_during_scan(h: S3Harness, data: bytes) -> FakeEngine:
    """An engine that replaces the object while it scans the old bytes (and calls them clean)."""
    replaced = threading.Event()

    def swap(request: ScanRequest) -> Verdict:
        if not replaced.is_set():
            replaced.set()
            h.put("in/a.txt", data)
        return Verdict(VerdictKind.CLEAN)

    return FakeEngine(script=[swap])


def test_in_place_needs_an_s3_source(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    raw = {"state_dir": str(tmp_path / "state"), "engines": {"d": {"type": "yara"}},
           "watches": [{"name": "w", "source": str(tmp_path / "in"), "engine": "d",
                        "clean": "in_place", "quarantine": str(tmp_path / "q"),
                        "failed": str(tmp_path / "f")}]}
    with pytest.raises(Exception, match="clean: in_place needs an s3:// source"):
        Config.model_validate(raw)


def test_tags_on_the_object_where_it_is_never_rescanned_and_new_bytes_are_new(
        harness: Callable[..., S3Harness]) -> None:
    h = harness(FakeEngine(), **IN_PLACE)
    h.client.put_object(Bucket=h.bucket, Key="in/a.txt", Body=b"hello", Tagging="owner=alice")
    h.put("in/e.com", EICAR)
    h.step()
    clean, infected = _tags(h, "in/a.txt"), _tags(h, "in/e.com")
    assert clean["scanwatch-verdict"] == "clean" and clean["scanwatch-reason"] == ""
    assert clean["owner"] == "alice"  # the object's own tags are kept
    assert clean["scanwatch-scanned-at"].endswith("Z")
    assert infected["scanwatch-verdict"] == "infected"
    assert infected["scanwatch-threat"] == "Eicar-Test-Signature"
    assert h.keys("") == ["in/a.txt", "in/e.com"]  # nothing moved, no sidecar written
    assert {r.state for r in h.rows()} == {FileState.DONE}
    assert h.watcher.poll_once() == 0
    # A restart: a new journal handle and pipeline see the same objects as judged.
    h.journal = Journal(h.tmp_path / "state" / "journal.sqlite3")
    h.pipeline = Pipeline(h.config, h.journal, {"default": FakeEngine()}, owner=owner_token())
    assert h.watcher.poll_once() == 0
    h.put("in/a.txt", EICAR)  # new bytes at the key: a new arrival
    assert h.watcher.poll_once() == 1
    h.step()
    assert _tags(h, "in/a.txt")["scanwatch-verdict"] == "infected"


def test_retention_keeps_the_newest_outcome_of_each_object_so_no_listing_scans_it_again(
        harness: Callable[..., S3Harness]) -> None:
    """docs/operations.md, "Journal retention": every row is past the cutoff here."""
    h = harness(FakeEngine(), **IN_PLACE)
    h.put("in/a.txt", b"hello")
    h.put("in/b.txt", b"world")
    h.step()
    h.put("in/a.txt", EICAR)  # new bytes: a second outcome of the key
    assert h.watcher.poll_once() == 1
    h.step()
    assert len(h.rows()) == 3
    assert h.journal.prune(time.time() + 1) == 1
    assert sorted((r.rel_path, r.verdict) for r in h.rows()) == [("a.txt", "infected"), ("b.txt", "clean")]
    assert h.watcher.poll_once() == 0  # both objects are still known as judged
    assert _tags(h, "in/a.txt")["scanwatch-verdict"] == "infected"


def test_unversioned_object_replaced_before_its_tagging_is_never_tagged_clean(
        harness: Callable[..., S3Harness]) -> None:
    h = harness(**IN_PLACE)
    engine = _swap_during_scan(h, EICAR)
    h.pipeline.engines = {"default": engine}
    h.put("in/a.txt", b"harmless")
    h.step()
    h.step()
    assert _tags(h, "in/a.txt")["scanwatch-verdict"] == "infected"
    assert len(engine.calls) == 2  # the self-copy was conditional on the scanned ETag: refused


def test_versioned_object_replaced_before_its_tagging_tags_only_the_scanned_version(
        harness: Callable[..., S3Harness]) -> None:
    h = harness(**IN_PLACE)
    h.client.put_bucket_versioning(Bucket=h.bucket, VersioningConfiguration={"Status": "Enabled"})
    engine = _swap_during_scan(h, EICAR)
    h.pipeline.engines = {"default": engine}
    first = h.client.put_object(Bucket=h.bucket, Key="in/a.txt", Body=b"harmless")["VersionId"]
    h.step()
    assert _tags(h, "in/a.txt", first)["scanwatch-verdict"] == "clean"  # the bytes scanned
    assert _tags(h, "in/a.txt").get("scanwatch-verdict") != "clean"  # never the replacement
    h.step()  # the new version is a new arrival
    assert _tags(h, "in/a.txt")["scanwatch-verdict"] == "infected"
    assert _tags(h, "in/a.txt", first)["scanwatch-verdict"] == "clean"


def test_ten_tags_of_its_own_send_the_object_to_failed(harness: Callable[..., S3Harness]) -> None:
    h = harness(FakeEngine(), **IN_PLACE)
    own = "&".join(f"t{i}={i}" for i in range(10))
    h.client.put_object(Bucket=h.bucket, Key="in/a.txt", Body=b"hello", Tagging=own)
    h.step()
    h.step()
    assert h.keys("failed/") == ["a.txt"]
    assert h.rows()[0].reason == "too_many_tags"


def test_ten_tags_and_failed_in_place_too_holds_the_object(harness: Callable[..., S3Harness]) -> None:
    h = harness(FakeEngine(), **IN_PLACE, failed="in_place")
    own = "&".join(f"t{i}={i}" for i in range(10))
    h.client.put_object(Bucket=h.bucket, Key="in/a.txt", Body=b"hello", Tagging=own)
    with capture_logs() as logs:
        h.step()
    [row] = h.rows()
    assert (row.state, row.reason) == (FileState.HELD, "too_many_tags")
    [skipped] = [e for e in logs if e["event"] == "file.skipped"]  # reported (docs/contract.md)
    assert (skipped["log_level"], skipped["rel_path"], skipped["reason"]) == ("warning", "a.txt",
                                                                              "too_many_tags")
    assert "scanwatch-verdict" not in _tags(h, "in/a.txt")
    assert h.watcher.poll_once() == 0


def test_a_multipart_object_keeps_being_known_after_its_self_copy(
        harness: Callable[..., S3Harness]) -> None:
    h = harness(FakeEngine(), **IN_PLACE)
    data = os.urandom(5 * 2**20 + 1)
    upload = h.client.create_multipart_upload(Bucket=h.bucket, Key="in/big.bin")["UploadId"]
    parts = [h.client.upload_part(Bucket=h.bucket, Key="in/big.bin", UploadId=upload, PartNumber=n,
                                  Body=chunk)["ETag"]
             for n, chunk in ((1, data[:5 * 2**20]), (2, data[5 * 2**20:]))]
    h.client.complete_multipart_upload(Bucket=h.bucket, Key="in/big.bin", UploadId=upload, MultipartUpload={
        "Parts": [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(parts, 1)]})
    h.step()
    head: dict[str, Any] = h.client.head_object(Bucket=h.bucket, Key="in/big.bin")
    assert h.rows()[0].etag == head["ETag"]  # the ETag after the self-copy is the one journaled
    assert _tags(h, "in/big.bin")["scanwatch-verdict"] == "clean"
    assert h.watcher.poll_once() == 0


def test_quarantine_show_and_list_carry_the_facts_of_an_object_judged_in_place(
        harness: Callable[..., S3Harness], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No sidecar beside an object judged in place: `quarantine show` carries the facts
    (docs/contract.md, "S3 in place")."""
    h = harness(FakeEngine(), **IN_PLACE)
    h.put("in/e.com", EICAR)
    h.step()
    [row] = h.rows()
    config = tmp_path / "scanwatch.yaml"
    config.write_text(yaml.safe_dump(json.loads(h.config.model_dump_json())))
    capsys.readouterr()
    assert main(["quarantine", "list", "--json", "--config", str(config)]) == 0
    [listed] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (listed["id"], listed["rel_path"]) == (row.id, "e.com")
    assert main(["quarantine", "show", str(row.id), "--config", str(config)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["verdict"] == "infected" and shown["threats"] == ["Eicar-Test-Signature"]
    assert shown["external_reference_id"] == row.ref_id and shown["sha256"] == row.sha256
    assert shown["source"] == f"s3://{h.bucket}/in/e.com"
    assert shown["scanned_at"].endswith("Z")
    assert shown["sidecar"] is None  # none by design, not "cannot read the sidecar: NoSuchKey"


@pytest.mark.parametrize("versioned", [False, True])
def test_release_of_an_object_judged_in_place_tags_it_released_where_it_is(
        harness: Callable[..., S3Harness], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        versioned: bool) -> None:
    """`quarantine release ID` with `clean: in_place` (docs/contract.md): the object stays at its
    key, tagged `scanwatch-verdict=released`; it was copied into a local folder named `in_place`
    under the current directory and deleted from the bucket."""
    monkeypatch.chdir(tmp_path)
    h = harness(FakeEngine(), **IN_PLACE)
    if versioned:
        h.client.put_bucket_versioning(Bucket=h.bucket, VersioningConfiguration={"Status": "Enabled"})
    h.client.put_object(Bucket=h.bucket, Key="in/e.com", Body=EICAR, Tagging="owner=alice")
    h.step()
    [row] = h.rows()
    config = tmp_path / "scanwatch.yaml"
    config.write_text(yaml.safe_dump(json.loads(h.config.model_dump_json())))
    assert main(["quarantine", "release", str(row.id), "--config", str(config)]) == 0
    assert not (tmp_path / "in_place").exists()
    assert h.keys("") == ["in/e.com"] and h.get("in/e.com") == EICAR
    tags = _tags(h, "in/e.com")
    assert (tags["scanwatch-verdict"], tags["owner"]) == ("released", "alice")
    assert "scanwatch-threat" not in tags
    assert h.watcher.poll_once() == 0  # the version released is known: not a new arrival
    [audit] = h.journal.audit_trail(row.id)
    assert audit.action == "release" and h.rows()[0].disposition == "released"
