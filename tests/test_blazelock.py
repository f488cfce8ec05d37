"""The Blazelock engine against a strict loopback emulator of its API (docs/engines.md, "Blazelock")."""

from __future__ import annotations

import email.utils
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
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
from emulators.blazelock import BlazelockEmulator
from structlog.testing import capture_logs

from daemon.config import BlazelockEngineConfig
from daemon.engines._pacing import Pacer
from daemon.engines.base import ScanHandle
from daemon.engines.blazelock import BlazelockEngine
from daemon.errors import EngineThrottledError
from daemon.model import Verdict, VerdictKind


@pytest.fixture
def emulator() -> Iterator[BlazelockEmulator]:
    with BlazelockEmulator(scan_delay_s=0.2) as server:
        yield server  # type: ignore[misc]


def _harness(layout: Layout, emulator: BlazelockEmulator, **cfg: object) -> Harness:
    engine_cfg = {"type": "blazelock", "url": emulator.url, "api_key": "test-key",
                  "poll_interval": 0.1, "timeout": 5, **cfg}
    config = BlazelockEngineConfig.model_validate(engine_cfg)
    clock = Clock()  # the pacer waits on the harness's time
    engine = BlazelockEngine("default", config, pacer=Pacer("default", config.rate_limit, clock=clock))
    return Harness(layout, engine, engine_cfg=engine_cfg, clock=clock)


def test_async_upload_clean_infected_failed(layout: Layout, emulator: BlazelockEmulator) -> None:
    harness = _harness(layout, emulator)
    harness.drop("docs/ok.pdf", b"%PDF fine")
    harness.drop("e.com", EICAR)
    harness.drop("broken.bin", b"xx BLZ-FAIL xx")
    harness.run()
    assert harness.layout.placed("clean") == ["docs/ok.pdf"]
    assert harness.layout.placed("quarantine") == ["e.com"]
    assert harness.layout.placed("failed") == ["broken.bin"]
    assert harness.row("e.com").threats == ["EICAR-Test-File"]
    assert harness.row("broken.bin").reason == "engine_failed"
    sidecar = json.loads((layout.quarantine / "e.com.scanwatch.json").read_text())
    assert sidecar["engine_scan_id"].startswith("fs_")
    assert sidecar["external_reference_id"] == harness.row("e.com").ref_id
    uploads = {e.fields["external_reference_id"]: e for e in emulator.submissions()}
    assert set(uploads) == {harness.row(r).ref_id for r in ("docs/ok.pdf", "e.com", "broken.bin")}
    assert uploads[harness.row("docs/ok.pdf").ref_id].fields["file_name"] == "ok.pdf"
    assert all(e.path == "/file-scans" for e in emulator.submissions())


def test_sync_mode_answers_in_the_upload_and_408_continues_by_polling(
        layout: Layout, emulator: BlazelockEmulator) -> None:
    harness = _harness(layout, emulator, mode="sync")
    emulator.scan_delay_s = 0.0
    harness.drop("quick.txt", b"quick")
    harness.run()
    assert harness.layout.placed("clean") == ["quick.txt"]
    emulator.scan_delay_s, emulator.sync_timeout_s = 1.0, 0.2
    harness.drop("slow.com", EICAR)
    harness.run()
    assert harness.layout.placed("quarantine") == ["slow.com"]
    posts = [e for e in emulator.log if e.method == "POST"]
    assert [(e.path, e.status) for e in posts] == [("/file-scans/sync", 200), ("/file-scans/sync", 408)]


def test_sync_mode_sends_files_over_10mb_to_the_async_endpoint(layout: Layout,
                                                             emulator: BlazelockEmulator) -> None:
    harness = _harness(layout, emulator, mode="sync")
    harness.drop("big.bin", b"\0" * 10_000_001)
    with capture_logs() as logs:
        harness.run()
    assert harness.layout.placed("clean") == ["big.bin"]
    assert [e.path for e in emulator.submissions()] == ["/file-scans"]
    # docs/engines.md#blazelock: the detour is logged, with the size and the sync limit.
    detours = [e for e in logs if e["event"] == "scan.sync_too_large"]
    assert [(e["engine"], e["size"], e["sync_limit"]) for e in detours] == [("default", 10_000_001,
                                                                            10_000_000)]


def test_over_100mb_fails_too_large_without_a_request(layout: Layout, emulator: BlazelockEmulator) -> None:
    harness = _harness(layout, emulator)
    path = harness.drop("huge.iso", b"")
    os.truncate(path, 100_000_001)  # sparse: costs no disk
    harness.run()
    assert harness.layout.placed("failed") == ["huge.iso"]
    assert harness.row("huge.iso").reason == "too_large"
    assert [e for e in emulator.log if e.method == "POST"] == []


@pytest.mark.parametrize("forbidden", [False, True])
def test_bad_or_revoked_key_fails_auth(layout: Layout, emulator: BlazelockEmulator, forbidden: bool) -> None:
    if forbidden:
        emulator.forbidden_keys.add("revoked")
    harness = _harness(layout, emulator, api_key="revoked" if forbidden else "wrong")
    harness.drop("a.txt", b"a")
    harness.run()
    assert harness.layout.placed("failed") == ["a.txt"] and harness.row().reason == "auth"
    assert len(emulator.log) == 1  # no retry storm
    healthy, detail, _ = harness.journal.engine_health()["default"]
    assert not healthy and f"HTTP {403 if forbidden else 401}" in (detail or "")  # the alarm


def test_429_and_503_storm_ends_right_with_bounded_requests(layout: Layout,
                                                           emulator: BlazelockEmulator) -> None:
    harness = _harness(layout, emulator, max_attempts=10)
    emulator.inject(Fault(503, {"code": "uncaught_error"}), count=4)
    emulator.inject(Fault(429, {"code": "throttle_requests"}, {"Retry-After": "1"}), count=4)
    for i in range(5):
        harness.drop(f"f{i}.txt", b"x%d" % i)
    harness.drop("e.com", EICAR)
    harness.run(steps=80)
    assert len(harness.layout.placed("clean")) == 5 and harness.layout.placed("quarantine") == ["e.com"]
    assert len(emulator.log) < 60
    assert len(emulator.submissions()) == 6


@pytest.mark.parametrize(("status", "code", "where", "reason", "posts"), [
    (413, "file_too_large", "failed", "too_large", 1),
    (422, "validation_failed", "failed", "bad_request", 1),
    (500, "uncaught_error", "clean", None, 2),  # retried: looked up by reference, then submitted
])
def test_error_answers_to_an_upload_fail_or_retry_as_documented(
        layout: Layout, emulator: BlazelockEmulator, status: int, code: str, where: str,
        reason: str | None, posts: int) -> None:
    harness = _harness(layout, emulator)
    emulator.inject(Fault(status, {"code": code, "message": "no"}), path_prefix="/file-scans")
    harness.drop("a.txt", b"a")
    harness.run()
    assert harness.layout.placed(where) == ["a.txt"] and harness.row().reason == reason
    assert len([e for e in emulator.log if e.method == "POST"]) == posts


def test_a_scan_the_service_lost_is_submitted_again_by_reference(layout: Layout,
                                                                emulator: BlazelockEmulator) -> None:
    harness = _harness(layout, emulator)
    emulator.scan_delay_s = 5.0
    harness.drop("a.txt", b"a")
    harness.step(advance_s=3)
    assert len(emulator.submissions()) == 1
    emulator.scans.clear()  # purged: GET /file-scans/{id} answers 404
    emulator.by_ref.clear()
    emulator.scan_delay_s = 0.0
    harness.run()
    assert harness.layout.placed("clean") == ["a.txt"]
    refs = [e.fields["external_reference_id"] for e in emulator.submissions()]
    assert refs == [harness.row().ref_id] * 2  # the same reference: a 409 would have found it


@pytest.mark.parametrize("reset", ["delta", "unix"])
def test_an_exhausted_rate_window_holds_every_request_until_its_reset(emulator: BlazelockEmulator,
                                                                       reset: str) -> None:
    engine = BlazelockEngine("blz", BlazelockEngineConfig.model_validate(
        {"type": "blazelock", "url": emulator.url, "api_key": "test-key"}))
    value = "30" if reset == "delta" else str(int(time.time()) + 30)
    emulator.inject(Fault(404, {"code": "resource_not_found"},
                          {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": value}))
    engine.probe()  # 404 to the probe is fine; the window is spent
    with pytest.raises(EngineThrottledError) as held:
        engine.probe()
    assert held.value.retry_after_s == pytest.approx(30, abs=2)
    assert len(emulator.log) == 1  # held here, not sent into a 429
    engine.close()


def test_retry_after_as_an_http_date_holds_the_engine(emulator: BlazelockEmulator) -> None:
    engine = BlazelockEngine("blz", BlazelockEngineConfig.model_validate(
        {"type": "blazelock", "url": emulator.url, "api_key": "test-key"}))
    emulator.inject(Fault(429, {"code": "throttle_requests"},
                          {"Retry-After": email.utils.formatdate(time.time() + 40, usegmt=True)}))
    with pytest.raises(EngineThrottledError) as throttled:
        engine.probe()
    assert throttled.value.retry_after_s == pytest.approx(40, abs=2)
    with pytest.raises(EngineThrottledError):
        engine.probe()
    assert len(emulator.log) == 1
    engine.close()


def test_lost_answer_to_an_upload_is_followed_by_reference_not_resubmitted(
        layout: Layout, emulator: BlazelockEmulator) -> None:
    harness = _harness(layout, emulator)
    emulator.inject(Fault(reset=True, after=True), path_prefix="/file-scans")
    harness.drop("e.com", EICAR)
    harness.run()
    assert harness.layout.placed("quarantine") == ["e.com"]
    assert len(emulator.scans) == 1  # the first upload created the scan; the retry found it
    # The first upload was handled (its answer lost on the way): the submission stayed in
    # doubt, and the retry looked it up by reference instead of posting it again.
    assert [e.status for e in emulator.log if e.method == "POST"] == [201]
    assert any(e.path.startswith("/file-scans/external-reference/") and e.status == 200
               for e in emulator.log)


def test_lookup_by_reference_sends_the_id_as_one_path_segment(layout: Layout,
                                                               emulator: BlazelockEmulator) -> None:
    harness = _harness(layout, emulator)
    emulator.inject(Fault(reset=True, after=True), path_prefix="/file-scans")
    harness.drop("sub dir/e.com", EICAR)
    harness.run()
    assert harness.layout.placed("quarantine") == ["sub dir/e.com"] and len(emulator.scans) == 1
    ref = harness.row("sub dir/e.com").ref_id
    assert "/" in ref and "#" in ref
    lookups = [e.path for e in emulator.log if e.path.startswith("/file-scans/external-reference/")]
    assert lookups and set(lookups) == {"/file-scans/external-reference/" + quote(ref, safe="")}


def test_emulator_takes_the_reference_only_as_one_encoded_segment(emulator: BlazelockEmulator) -> None:
    emulator.by_ref["inbox:a/b.txt"] = "fs_000001"
    emulator.scans["fs_000001"] = {"id": "fs_000001", "_ready_at": 0.0, "_failed": True, "_safe": True}
    with httpx.Client(base_url=emulator.url, headers={"Authorization": "Bearer test-key"}) as client:
        assert client.get("/file-scans/external-reference/inbox:a%2Fb.txt").status_code == 200
        assert client.get("/file-scans/external-reference/inbox:a/b.txt").status_code == 404


def test_emulator_refuses_what_blazelock_refuses(emulator: BlazelockEmulator) -> None:
    def status(attributes: object, *, with_file: bool = True, path: str = "/file-scans") -> int:
        files = {"file": ("a.txt", b"a", "application/octet-stream")} if with_file else None
        data = {"attributes": json.dumps(attributes)}
        with httpx.Client(base_url=emulator.url, headers={"Authorization": "Bearer test-key"}) as client:
            return client.post(path, files=files, data=data).status_code

    good = {"file_name": "a.txt", "external_reference_id": "w:a.txt#1"}
    assert status({**good, "external_reference_id": "w:a b.txt"}) == 422  # outside the charset
    assert status({**good, "external_reference_id": "x" * 256}) == 422
    assert status({"external_reference_id": "w:b.txt#1"}) == 422  # no file_name
    assert status(good, with_file=False) == 422
    assert status(good) == 201
    assert status(good) == 409  # duplicate_external_reference_id
    assert status({**good, "external_reference_id": "w:big"}, path="/file-scans/sync") == 200


def test_failed_scan_of_the_same_id_is_resubmitted_as_generation_2(
        layout: Layout, emulator: BlazelockEmulator) -> None:
    harness = _harness(layout, emulator)
    emulator.scan_delay_s = 0
    first = harness.drop("a.txt", b"xx BLZ-FAIL xx")
    harness.run()
    assert harness.layout.placed("failed") == ["a.txt"]
    ref = harness.row().ref_id
    (layout.failed / "a.txt").rename(first)  # the same bytes dropped again
    (layout.failed / "a.txt.scanwatch.json").unlink()
    harness.step(advance_s=5)
    harness.run()
    refs = [e.fields["external_reference_id"] for e in emulator.log if e.method == "POST"]
    assert refs == [ref, ref, f"{ref}.2"]
    assert harness.row().ref_id == f"{ref}.2"


@pytest.mark.parametrize("status", [200, 202])
def test_an_async_upload_answered_200_or_202_is_followed(layout: Layout, emulator: BlazelockEmulator,
                                                        status: int) -> None:
    harness = _harness(layout, emulator)
    emulator.async_status = status
    harness.drop("e.com", EICAR)
    harness.run()
    assert harness.layout.placed("quarantine") == ["e.com"]
    assert [e.status for e in emulator.log if e.method == "POST"] == [status]


@pytest.mark.parametrize("in_seconds", [False, True])
def test_scan_duration_in_seconds_or_ms_is_kept_in_seconds(emulator: BlazelockEmulator,
                                                          in_seconds: bool) -> None:
    emulator.duration_in_seconds = in_seconds
    engine = BlazelockEngine("blz", BlazelockEngineConfig.model_validate(
        {"type": "blazelock", "url": emulator.url, "api_key": "test-key"}))
    scan_id = "fs_000001"
    emulator.scans[scan_id] = {"id": scan_id, "_ready_at": 0.0, "_failed": False, "_safe": True}
    verdict = engine.poll(ScanHandle("w", "a.txt", "/in/a.txt", "0" * 64, "w:a.txt#0", scan_id))
    engine.close()
    assert isinstance(verdict, Verdict) and verdict.kind is VerdictKind.CLEAN
    assert verdict.raw["scan_duration_s"] == pytest.approx(0.2)


def test_envelope_is_optional(layout: Layout) -> None:
    with BlazelockEmulator(envelope=False) as emulator:
        harness = _harness(layout, emulator)  # type: ignore[arg-type]
        harness.drop("e.com", EICAR)
        harness.run()
    assert harness.layout.placed("quarantine") == ["e.com"]


def test_probe_checks_reachability_and_key(emulator: BlazelockEmulator, tmp_path: Path) -> None:
    def engine(key: str, url: str) -> BlazelockEngine:
        return BlazelockEngine("blz", BlazelockEngineConfig.model_validate(
            {"type": "blazelock", "url": url, "api_key": key}))

    assert engine("test-key", emulator.url).probe().startswith("blazelock at")
    from daemon.errors import EnginePermanentError, EngineUnavailableError

    with pytest.raises(EnginePermanentError, match="credentials"):
        engine("wrong", emulator.url).probe()
    with pytest.raises(EngineUnavailableError, match="cannot reach"):
        engine("test-key", "http://127.0.0.1:9").probe()


def _daemon_config(layout: Layout, emulator: BlazelockEmulator, **cfg: object) -> Path:
    config = layout.write_config()
    text = config.read_text().replace(
        "type: yara", f"type: blazelock\n    url: {emulator.url}\n    api_key: ${{BLZ_KEY}}\n"
                      f"    poll_interval: 0.2")
    for key, value in cfg.items():
        text = text.replace("    poll_interval: 0.2", f"    poll_interval: 0.2\n    {key}: {value}")
    config.write_text(text)
    return config


def test_kill_9_inside_the_submission_follows_the_scan_by_reference(
        layout: Layout, emulator: BlazelockEmulator, daemon_factory) -> None:
    metrics = kill_9_inside_submission(layout, daemon_factory, _daemon_config(layout, emulator),
                                       {"BLZ_KEY": "test-key"}, emulator, "/file-scans")
    assert len(emulator.submissions()) == 1 and len(emulator.scans) == 1
    assert "scanwatch_resubmissions_total{" not in metrics


def test_kill_9_between_submit_and_verdict_resumes_the_same_scans(
        layout: Layout, emulator: BlazelockEmulator, daemon_factory) -> None:
    emulator.scan_delay_s = 4.0
    kill_9_between_submit_and_verdict(layout, daemon_factory, _daemon_config(layout, emulator),
                                      {"BLZ_KEY": "test-key"})
    assert len(emulator.submissions()) == 6 and len(emulator.scans) == 6  # one upload per file


def test_api_key_never_reaches_logs(layout: Layout, emulator: BlazelockEmulator, daemon_factory) -> None:
    secret = "sk-live-0123456789-very-secret"
    emulator.api_key = secret
    daemon = daemon_factory(_daemon_config(layout, emulator), {"BLZ_KEY": secret})
    daemon.wait_started()
    (layout.inbox / "e.com").write_bytes(EICAR)
    daemon.wait_for(lambda: daemon.named("file.moved"), what="moved")
    assert daemon.stop() == 0
    assert not daemon.leaked(secret)
    assert secret not in (layout.quarantine / "e.com.scanwatch.json").read_text()


def test_100mb_upload_streams_with_small_rss(layout: Layout, emulator: BlazelockEmulator,
                                             daemon_factory) -> None:
    emulator.scan_delay_s = 0
    daemon = daemon_factory(_daemon_config(layout, emulator), {"BLZ_KEY": "test-key"})
    daemon.wait_started()
    peak_kb = big_upload_peak_rss_kb(layout, daemon)
    assert emulator.submissions()[0].body_bytes > 100_000_000
    assert peak_kb < 100 * 1024, f"peak RSS {peak_kb} kB"


def test_status_prints_the_external_reference_id_of_a_file_in_flight(
        layout: Layout, emulator: BlazelockEmulator, capsys: pytest.CaptureFixture[str]) -> None:
    """`scanwatch status` prints the ID the engine knows a pending file by (docs/contract.md)."""
    from daemon.cli import main

    emulator.scan_delay_s = 60
    harness = _harness(layout, emulator)
    harness.drop("docs/slow.pdf", b"%PDF still being scanned")
    harness.step(advance_s=3)
    row = harness.row("docs/slow.pdf")
    assert row.ref_id and row.state.value == "scanning" and len(emulator.submissions()) == 1
    config = layout.write_config(watch={"settle_seconds": 0}, engine=dict(harness.config.engines[
        "default"].model_dump(mode="json"), api_key="test-key"))
    capsys.readouterr()
    assert main(["status", "--config", str(config), "--json"]) == 0
    oldest = json.loads(capsys.readouterr().out)["watches"]["inbox"]["oldest_pending_file"]
    assert oldest == {"id": row.id, "rel_path": "docs/slow.pdf", "state": "scanning",
                      "external_reference_id": row.ref_id}
    assert main(["status", "--config", str(config)]) == 0
    assert f"oldest pending: docs/slow.pdf (scanning; {row.ref_id})" in capsys.readouterr().out


def test_a_found_scan_is_followed_until_older_than_reuse_max_age_then_resubmitted_as_2(
        layout: Layout, emulator: BlazelockEmulator) -> None:
    """The same bytes at the same path have the same ID: Blazelock answers 409, the scan found by
    its ID is followed, not submitted again; once older than `reuse_max_age` (default 1 day)
    it is submitted again as `<id>.2` (docs/contract.md, "External reference IDs")."""
    harness = _harness(layout, emulator, cache={"enabled": False})
    assert harness.config.engines["default"].reuse_max_age == 86400  # type: ignore[union-attr]
    emulator.scan_delay_s = 0
    data = b"the same invoice, dropped again"

    def again() -> str:
        (layout.clean / "a.txt").unlink()
        harness.drop("a.txt", data)
        harness.step(advance_s=5)
        harness.run()
        assert harness.layout.placed("clean") == ["a.txt"]
        return harness.row().ref_id or ""

    harness.drop("a.txt", data)
    harness.run()
    ref = harness.row().ref_id
    assert again() == ref  # 409 duplicate: looked up by its ID and followed
    assert len(emulator.scans) == 1 and any(e.status == 409 for e in emulator.log)
    [scan] = emulator.scans.values()
    scan["created_at"] = "2026-01-01T00:00:00Z"  # the service's scan is now older than a day
    assert again() == f"{ref}.2"
    assert len(emulator.scans) == 2
    assert [e.fields["external_reference_id"] for e in emulator.submissions() if e.status in (200, 201)] == [
        ref, f"{ref}.2"]
