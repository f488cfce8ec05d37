"""Remote engines against a real S3 server: polls download nothing, scans are pinned to the
listed object version (docs/integrity.md, "Remote engines")."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import EICAR
from emulators.blazelock import BlazelockEmulator
from emulators.perception_point import PerceptionPointEmulator
from realservers import S3Server, TcpProxy
from test_s3 import S3Harness

from daemon.config import BlazelockEngineConfig, PerceptionPointEngineConfig
from daemon.engines.blazelock import BlazelockEngine
from daemon.engines.perception_point import PerceptionPointEngine
from daemon.model import FileState

_MB = 1_000_000


def _due_now(h: S3Harness) -> None:
    h.journal.apply([(row.id, {"next_attempt_at": 0}) for row in h.rows()])
    while h.pipeline.run_once(["w"]):
        pass


@pytest.mark.usefixtures("s3_env")
def test_polls_of_a_pending_s3_scan_download_nothing(s3_server: S3Server, s3_bucket: str,
                                                      tmp_path: Path) -> None:
    proxy = TcpProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]))
    proxy.start()
    through_proxy = dataclasses.replace(s3_server, endpoint_url=f"http://127.0.0.1:{proxy.port}")
    with BlazelockEmulator(scan_delay_s=3600) as emulator:
        engine = BlazelockEngine("default", BlazelockEngineConfig.model_validate(
            {"type": "blazelock", "url": emulator.url, "api_key": "test-key", "poll_interval": 0.1}))
        h = S3Harness(through_proxy, s3_bucket, tmp_path, engine)
        h.put("in/big.bin", b"\0" * (50 * _MB))
        h.watcher.poll_once()
        before = proxy.bytes_from_server
        _due_now(h)  # downloaded once, hashed, uploaded: the scan stays `processing`
        for _ in range(10):
            _due_now(h)
        polls = [e for e in emulator.log if e.method == "GET" and e.path.startswith("/file-scans/")]
        assert len(polls) >= 10 and h.rows()[0].state is FileState.SCANNING
        for scan in emulator.scans.values():
            scan["_ready_at"] = 0.0
        _due_now(h)
    downloaded = proxy.bytes_from_server - before
    assert h.keys("clean/") == ["big.bin"]
    proxy.stop()
    assert 50 * _MB <= downloaded < 51 * _MB, f"{downloaded} bytes from S3 for 11 polls"


@pytest.mark.usefixtures("s3_env")
def test_pp_storage_mode_scans_a_replaced_object_by_its_version(
        s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    with PerceptionPointEmulator(polls_to_done=1) as emulator:
        engine = PerceptionPointEngine("default", PerceptionPointEngineConfig.model_validate(
            {"type": "perception_point", "url": emulator.url, "token": "test-token", "storage": "s3",
             "poll_interval": 0.1}))
        h = S3Harness(s3_server, s3_bucket, tmp_path, engine)
        h.client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
        h.put("in/a.com", EICAR)
        h.watcher.poll_once()
        h.put("in/a.com", b"harmless bytes put in its place")  # replaced between listing and scan
        current = h.client.head_object(Bucket=s3_bucket, Key="in/a.com")["VersionId"]
        for _ in range(5):
            _due_now(h)
        sent = [e.fields for e in emulator.log if e.method == "POST"]
    # The listed version was gone by the time it was read: the version there now was scanned,
    # by a link that names that version, never by the unversioned `path`.
    assert len(sent) == 1 and f"versionId={current}" in sent[0]["download_link"]
    assert "path" not in sent[0] and "storage" not in sent[0]
    assert h.keys("clean/") == ["a.com"] and h.get("clean/a.com") == b"harmless bytes put in its place"
