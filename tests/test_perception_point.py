"""The Perception Point engine against a strict loopback emulator of its files API.

See docs/engines.md, "Perception Point X-Ray".
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import (
    EICAR,
    Clock,
    Harness,
    Layout,
    big_upload_peak_rss_kb,
    kill_9_between_submit_and_verdict,
    kill_9_inside_submission,
)
from emulators._server import Fault
from emulators.perception_point import PerceptionPointEmulator

from daemon.config import BlazelockEngineConfig, PerceptionPointEngineConfig
from daemon.config.example import uncommented
from daemon.engines._pacing import Pacer
from daemon.engines.base import S3Object, ScanHandle, ScanRequest
from daemon.engines.perception_point import PerceptionPointEngine
from daemon.errors import EnginePermanentError, EngineResubmitError, EngineUnavailableError
from daemon.model import FileState, Verdict, VerdictKind


@pytest.fixture
def emulator() -> Iterator[PerceptionPointEmulator]:
    with PerceptionPointEmulator(polls_to_done=2) as server:
        yield server


def _engine_cfg(url: str, **cfg: object) -> dict[str, object]:
    return {"type": "perception_point", "url": url, "token": "test-token", "poll_interval": 0.1,
            "timeout": 5, **cfg}


def _engine(url: str, **cfg: object) -> PerceptionPointEngine:
    return PerceptionPointEngine("pp", PerceptionPointEngineConfig.model_validate(_engine_cfg(url, **cfg)))


def _harness(layout: Layout, url: str, watch: dict[str, object] | None = None, **cfg: object) -> Harness:
    engine_cfg = _engine_cfg(url, **cfg)
    config = PerceptionPointEngineConfig.model_validate(engine_cfg)
    clock = Clock()  # the pacer waits on the harness's time
    engine = PerceptionPointEngine("default", config, pacer=Pacer("default", config.rate_limit, clock=clock))
    return Harness(layout, engine, engine_cfg=engine_cfg, clock=clock, **(watch or {}))


def _finish(engine: PerceptionPointEngine, request: ScanRequest) -> Verdict:
    """Submit and poll until the verdict, as the pipeline would."""
    answer = engine.scan(request)
    for _ in range(20):
        if isinstance(answer, Verdict):
            return answer
        answer = engine.poll(request.handle(answer.engine_scan_id))
    raise AssertionError("no verdict after 20 polls")


def _s3_request(bucket: str, key: str, content: bytes, url: str = "", version_id: str | None = "v1",
                fd: int | None = None) -> ScanRequest:
    obj = S3Object(bucket, key, etag='"e1"', version_id=version_id, url=url)
    return ScanRequest("s3w", key, f"s3://{bucket}/{key}", fd, len(content),
                       hashlib.sha256(content).hexdigest(), f"s3w:{key}#x", s3=obj)


# -- verdicts ---------------------------------------------------------------------------------

def test_upload_maps_clean_infected_blocked_and_error(layout: Layout,
                                                      emulator: PerceptionPointEmulator) -> None:
    harness = _harness(layout, emulator.url)
    harness.drop("docs/ok.pdf", b"%PDF fine")
    harness.drop("e.com", EICAR)
    harness.drop("policy.doc", b"xx PP-BLK xx")
    harness.drop("broken.bin", b"xx PP-ERROR xx")
    harness.run()
    assert layout.placed("clean") == ["docs/ok.pdf"]
    assert layout.placed("quarantine") == ["e.com", "policy.doc"]
    assert layout.placed("failed") == ["broken.bin"]
    assert harness.row("e.com").threats == ["EICAR-Test-File"]
    assert harness.row("policy.doc").threats == ["Blocked.Policy"]
    assert harness.row("broken.bin").reason == "engine_failed"
    sidecar = json.loads((layout.quarantine / "e.com.scanwatch.json").read_text())
    assert sidecar["engine_scan_id"] == harness.row("e.com").engine_scan_id
    uploads = {e.fields["name"]: e for e in emulator.submissions()}
    assert set(uploads) == {"ok.pdf", "e.com", "policy.doc", "broken.bin"}
    ok = uploads["ok.pdf"].fields
    assert (ok["data_filename"], ok["data_bytes"]) == ("ok.pdf", str(len(b"%PDF fine")))
    assert not {"path", "storage", "download_link", "callback_url"} & set(ok)
    # Each scan finishes on its second poll: polled, never submitted again.
    assert len(emulator.polls()) == 2 * 4 and len(emulator.scans) == 4


def test_a_submission_answered_200_is_taken_like_201(layout: Layout,
                                                    emulator: PerceptionPointEmulator) -> None:
    harness = _harness(layout, emulator.url)
    emulator.submit_status = 200
    harness.drop("e.com", EICAR)
    harness.run()
    assert layout.placed("quarantine") == ["e.com"]
    assert [e.status for e in emulator.log if e.method == "POST"] == [200]


@pytest.mark.parametrize(("setting", "where", "reason"), [
    ("quarantine", "quarantine", "suspicious"), ("clean", "clean", None), ("failed", "failed", "suspicious")])
def test_suspicious_and_spam_follow_the_suspicious_setting(
        layout: Layout, emulator: PerceptionPointEmulator, setting: str, where: str,
        reason: str | None) -> None:
    harness = _harness(layout, emulator.url, suspicious=setting)
    harness.drop("sus.bin", b"xx PP-SUS xx")
    harness.drop("spam.eml", b"xx PP-SPM xx")
    harness.run()
    assert layout.placed(where) == ["spam.eml", "sus.bin"]
    assert harness.row("sus.bin").reason == reason
    expected_threats = ["SUS"] if where == "quarantine" else []
    assert harness.row("sus.bin").threats == expected_threats
    assert harness.row("sus.bin").raw_result["verdict"] == "SUS"


def test_archive_password_is_sent_as_file_password(layout: Layout,
                                                   emulator: PerceptionPointEmulator) -> None:
    harness = _harness(layout, emulator.url, watch={"archivepwd": "infected"})
    harness.drop("a.zip", b"PK zip")
    harness.run()
    assert layout.placed("clean") == ["a.zip"]
    assert emulator.submissions()[0].fields["file_password"] == "infected"


# -- refusals, limits, storms -------------------------------------------------------------

@pytest.mark.parametrize("s3", [False, True])
def test_over_500mb_fails_too_large_without_a_request(emulator: PerceptionPointEmulator, tmp_path: Path,
                                                      s3: bool) -> None:
    path = tmp_path / "huge.iso"
    path.write_bytes(b"")
    os.truncate(path, 500_000_001)  # sparse: costs no disk
    with open(path, "rb") as f:
        request = ScanRequest("w", "huge.iso", str(path), None if s3 else f.fileno(), 500_000_001,
                              "0" * 64, "w:huge.iso#0",
                              s3=S3Object("b", "huge.iso", '"e"', None, "http://x") if s3 else None)
        with pytest.raises(EnginePermanentError, match="max_size") as refused:
            _engine(emulator.url, storage="s3").scan(request)
    assert refused.value.reason == "too_large"
    assert emulator.log == []


def test_413_from_the_service_fails_too_large(layout: Layout) -> None:
    with PerceptionPointEmulator(max_bytes=1000) as emulator:
        harness = _harness(layout, emulator.url)
        harness.drop("big.bin", b"x" * 5000)
        harness.run()
        assert [(e.method, e.status) for e in emulator.log] == [("POST", 413)]
    assert layout.placed("failed") == ["big.bin"] and harness.row("big.bin").reason == "too_large"


@pytest.mark.parametrize("forbidden", [False, True])
def test_bad_or_revoked_token_fails_auth_without_retries(
        layout: Layout, emulator: PerceptionPointEmulator, forbidden: bool) -> None:
    if forbidden:
        emulator.forbidden_tokens.add("revoked")
    harness = _harness(layout, emulator.url, token="revoked" if forbidden else "wrong")
    harness.drop("a.txt", b"a")
    harness.run()
    assert layout.placed("failed") == ["a.txt"] and harness.row().reason == "auth"
    assert [e.status for e in emulator.log] == [403 if forbidden else 401]  # no retry storm


def test_429_and_503_storm_ends_right_with_bounded_requests(layout: Layout,
                                                           emulator: PerceptionPointEmulator) -> None:
    harness = _harness(layout, emulator.url, max_attempts=10)
    emulator.inject(Fault(503, {"detail": "busy"}), count=4)
    emulator.inject(Fault(429, {"detail": "throttled"}, {"Retry-After": "1"}), count=4)
    for i in range(5):
        harness.drop(f"f{i}.txt", b"x%d" % i)
    harness.drop("e.com", EICAR)
    harness.run(steps=80)
    assert len(layout.placed("clean")) == 5 and layout.placed("quarantine") == ["e.com"]
    assert len(emulator.submissions()) == 6 and len(emulator.scans) == 6
    assert len(emulator.log) <= 8 + 6 + 2 * 6 + 6  # faults, submissions, polls, slack for retries


def test_engine_down_at_start_then_back(layout: Layout) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    harness = _harness(layout, f"http://127.0.0.1:{port}")
    harness.drop("a.txt", b"a")
    for _ in range(3):
        harness.step(advance_s=11)
    row = harness.row()
    assert row.state is FileState.STABLE and row.attempts == 0  # waiting spends no attempt
    assert row.last_error.startswith("engine 'default' cannot reach")
    assert harness.journal.engine_health()["default"][0] is False
    with PerceptionPointEmulator(port=port) as emulator:
        harness.run()
        assert len(emulator.submissions()) == 1
    assert layout.placed("clean") == ["a.txt"]
    assert harness.journal.engine_health()["default"][0] is True


def test_poll_of_a_scan_the_service_lost_submits_again(layout: Layout,
                                                       emulator: PerceptionPointEmulator) -> None:
    handle = ScanHandle("w", "a.txt", "/in/a.txt", "0" * 64, "w:a.txt#0", "999")
    with pytest.raises(EngineResubmitError) as lost:
        _engine(emulator.url).poll(handle)
    assert not lost.value.may_duplicate  # the scan is gone: the repeat is not a duplicate
    assert [(e.method, e.status) for e in emulator.log] == [("GET", 404)]
    emulator.log.clear()
    harness = _harness(layout, emulator.url)
    harness.drop("a.txt", b"a")
    harness.step(advance_s=3)
    emulator.scans.clear()  # the service lost the scan
    harness.run()
    assert layout.placed("clean") == ["a.txt"]
    assert len(emulator.submissions()) == 2 and emulator.submissions()[1].fields["data_bytes"] == "1"


# -- S3 sources: by path and by presigned link --------------------------------------------

def test_s3_storage_mode_sends_only_a_snapshot_as_path(tmp_path: Path) -> None:
    """`path` names no version: only a private snapshot is sent by path; a versioned object
    that is not one goes by its version's link, an unversioned one is uploaded from the copy
    that was hashed (docs/integrity.md, "Remote engines")."""
    key = "in/2026/a b#1 ü.com"
    snapshot = "in box ü/.scanwatch/snapshots/0123456789abcdef/7-e1"  # `path` is plain text
    (tmp_path / "s3" / "drop" / snapshot).parent.mkdir(parents=True)
    (tmp_path / "s3" / "drop" / snapshot).write_bytes(EICAR)
    copy = tmp_path / "copy"
    copy.write_bytes(EICAR)
    link = "http://127.0.0.1:9/drop/obj?versionId=v1&X-Amz-Signature=0"
    with PerceptionPointEmulator(storages={"s3": tmp_path / "s3"}) as emulator, open(copy, "rb") as f:
        engine = _engine(emulator.url, storage="s3")
        assert engine.reads_s3
        private = S3Object("drop", snapshot, '"e1"', None, "", is_snapshot=True)
        by_path = dataclasses.replace(_s3_request("drop", key, EICAR, version_id=None), s3=private)
        assert _finish(engine, by_path).threats == ("EICAR-Test-File",)
        verdict = _finish(engine, _s3_request("drop", key, EICAR, version_id=None, fd=f.fileno()))
        with pytest.raises(EnginePermanentError):  # the emulator cannot fetch this link
            engine.scan(_s3_request("drop", key, EICAR, link))
        pathed, uploaded, linked = (e.fields for e in emulator.log if e.method == "POST")
    assert (pathed["path"], pathed["storage"]) == (f"drop/{snapshot}", "s3")
    assert not {"data_bytes", "download_link"} & set(pathed)
    assert verdict.kind is VerdictKind.INFECTED and verdict.threats == ("EICAR-Test-File",)
    assert (uploaded["data_bytes"], uploaded["name"]) == (str(len(EICAR)), "a b#1 ü.com")
    assert linked["download_link"] == link
    assert not {"path", "storage"} & (set(uploaded) | set(linked))


def test_s3_download_link_mode_sends_the_presigned_url(tmp_path: Path) -> None:
    (tmp_path / "objects").mkdir()
    (tmp_path / "objects" / "obj.bin").write_bytes(b"xx PP-SUS xx")
    handler = functools.partial(_QuietFiles, directory=str(tmp_path / "objects"))
    files = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{files.server_address[1]}/obj.bin?X-Amz-Signature=0123abcd"
    try:
        with PerceptionPointEmulator() as emulator:
            engine = _engine(emulator.url, download_link=True)
            assert engine.reads_s3
            verdict = _finish(engine, _s3_request("drop", "obj.bin", b"xx PP-SUS xx", url))
            fields = emulator.submissions()[0].fields
    finally:
        files.shutdown()
        files.server_close()
    assert verdict.kind is VerdictKind.INFECTED and verdict.reason == "suspicious"
    assert fields["download_link"] == url
    assert not {"path", "storage", "data_bytes"} & set(fields)


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_local_sources_are_uploaded_even_with_storage(emulator: PerceptionPointEmulator,
                                                      tmp_path: Path) -> None:
    assert not _engine(emulator.url).reads_s3
    path = tmp_path / "a.txt"
    path.write_bytes(b"local bytes")
    with open(path, "rb") as f:
        request = ScanRequest("w", "a.txt", str(path), f.fileno(), 11, "0" * 64, "w:a.txt#0")
        verdict = _finish(_engine(emulator.url, storage="s3"), request)
    assert verdict.kind is VerdictKind.CLEAN
    fields = emulator.submissions()[0].fields
    assert fields["data_bytes"] == "11" and "path" not in fields and "storage" not in fields


def test_callback_fields_name_the_receiver_and_carry_the_secret(emulator: PerceptionPointEmulator,
                                                                tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"a")
    engine = _engine(emulator.url, callback={"listen": "127.0.0.1:9480", "secret": "cb-secret",
                                             "public_url": "https://scanwatch.example/hooks/"})
    with open(path, "rb") as f:
        engine.scan(ScanRequest("w", "a.txt", str(path), f.fileno(), 1, "0" * 64, "w:a.txt#0"))
    fields = emulator.submissions()[0].fields
    assert fields["callback_url"] == "https://scanwatch.example/hooks/webhooks/pp"
    assert json.loads(fields["callback_headers"]) == {"X-Scanwatch-Callback-Secret": "cb-secret"}
    assert json.loads(fields["callback_params"]) == {"engine": "pp"}
    default = _engine(emulator.url, callback={"listen": "127.0.0.1:9480", "secret": "s"})
    assert default._fields(ScanRequest("w", "a", "a", None, 1, "", ""))[1] == (
        "callback_url", (None, "http://127.0.0.1:9480/webhooks/pp"))


def test_probe_checks_reachability_and_token(emulator: PerceptionPointEmulator) -> None:
    assert _engine(emulator.url).probe().startswith("perception_point at")
    assert [(e.path, e.status) for e in emulator.log] == [("/api/v1/scans/0/", 404)]
    with pytest.raises(EnginePermanentError, match="credentials") as refused:
        _engine(emulator.url, token="wrong").probe()
    assert refused.value.reason == "auth"
    with pytest.raises(EngineUnavailableError, match="cannot reach"):
        _engine("http://127.0.0.1:9").probe()


# -- the daemon -------------------------------------------------------------------------------

def _daemon_config(layout: Layout, emulator: PerceptionPointEmulator, **cfg: object) -> Path:
    config = layout.config(engine={"type": "perception_point", "url": emulator.url,
                                   "token": "${PP_TOKEN}", "poll_interval": 0.2, **cfg})
    layout.config_path.write_text(yaml.safe_dump(config))
    return layout.config_path


def test_kill_9_between_submit_and_verdict_resumes_by_polling(
        layout: Layout, emulator: PerceptionPointEmulator, daemon_factory) -> None:
    emulator.polls_to_done, emulator.scan_delay_s = 0, 1.5
    kill_9_between_submit_and_verdict(layout, daemon_factory, _daemon_config(layout, emulator),
                                      {"PP_TOKEN": "test-token"})
    assert len(emulator.submissions()) == 6 and len(emulator.scans) == 6  # one submission per file


def test_kill_9_inside_the_submission_submits_once_more_and_counts_it(
        layout: Layout, emulator: PerceptionPointEmulator, daemon_factory) -> None:
    metrics = kill_9_inside_submission(layout, daemon_factory, _daemon_config(layout, emulator),
                                       {"PP_TOKEN": "test-token"}, emulator, "/api/v1/files/")
    # The files API cannot be asked by reference: the in-doubt submission is repeated once.
    assert len(emulator.submissions()) == 2
    assert 'scanwatch_resubmissions_total{engine="default",watch="inbox"} 1.0' in metrics


def test_token_never_reaches_logs(layout: Layout, emulator: PerceptionPointEmulator,
                                  daemon_factory) -> None:
    secret = "pp-live-0123456789-very-secret"
    emulator.token = secret
    emulator.inject(Fault(503, {"detail": "busy"}), path_prefix="/api/v1/files/")  # errors log too
    daemon = daemon_factory(_daemon_config(layout, emulator), {"PP_TOKEN": secret})
    daemon.wait_started()
    (layout.inbox / "e.com").write_bytes(EICAR)
    daemon.wait_for(lambda: daemon.named("file.moved"), what="moved")
    assert daemon.stop() == 0
    assert daemon.named("retry.scheduled")
    assert not daemon.leaked(secret)
    assert secret not in (layout.quarantine / "e.com.scanwatch.json").read_text()


def test_100mb_upload_streams_with_small_rss(layout: Layout, emulator: PerceptionPointEmulator,
                                             daemon_factory) -> None:
    emulator.polls_to_done = 1
    daemon = daemon_factory(_daemon_config(layout, emulator), {"PP_TOKEN": "test-token"})
    daemon.wait_started()
    peak_kb = big_upload_peak_rss_kb(layout, daemon)
    assert emulator.submissions()[0].fields["data_bytes"] == "100000000"
    assert peak_kb < 100 * 1024, f"peak RSS {peak_kb} kB"


def test_the_commented_examples_in_example_yaml_are_valid() -> None:
    text = (Path(__file__).parent.parent / "config" / "example.yaml").read_text()
    engines = yaml.safe_load(uncommented(uncommented(text, "webhook"), "pp"))["engines"]
    assert engines["blz"]["webhook"]["listen"] == engines["pp"]["callback"]["listen"]
    assert BlazelockEngineConfig.model_validate(engines["blz"]).webhook is not None
    pp = PerceptionPointEngineConfig.model_validate(engines["pp"])
    assert pp.storage == "s3" and pp.callback is not None and pp.callback.public_url
