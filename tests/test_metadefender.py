"""The MetaDefender Core engine against a strict loopback emulator of its REST API.

See docs/engines.md, "OPSWAT MetaDefender Core".
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
import yaml
from conftest import (
    EICAR,
    ROOT,
    Clock,
    Harness,
    Layout,
    kill_9_between_submit_and_verdict,
    kill_9_inside_submission,
    write_random,
)
from emulators._server import Fault, Logged
from emulators.metadefender import MetadefenderEmulator
from structlog.testing import capture_logs

from daemon.config import MetadefenderEngineConfig, load_config
from daemon.config.example import uncommented
from daemon.engines._pacing import Pacer
from daemon.engines.metadefender import MetadefenderEngine
from daemon.errors import ConfigError, EnginePermanentError, EngineUnavailableError
from daemon.model import FileState

CORE_VIEW = "/core view/drop"  # the inbox as the Core server sees it: a space, to prove %20


@pytest.fixture
def emulator() -> Iterator[MetadefenderEmulator]:
    with MetadefenderEmulator(polls=1) as server:
        yield server


def _engine_cfg(url: str, **cfg: object) -> dict[str, object]:
    return {"type": "metadefender", "url": url, "apikey": "test-key", "poll_interval": 0.1, "timeout": 5,
            **cfg}


def _harness(layout: Layout, emulator: MetadefenderEmulator, **cfg: object) -> Harness:
    engine_cfg = _engine_cfg(emulator.url, **cfg)
    config = MetadefenderEngineConfig.model_validate(engine_cfg)
    clock = Clock()  # the pacer waits on the harness's time
    engine = MetadefenderEngine("default", config, pacer=Pacer("default", config.rate_limit, clock=clock))
    return Harness(layout, engine, engine_cfg=engine_cfg, clock=clock)


def _posts(emulator: MetadefenderEmulator) -> list[Logged]:
    return [e for e in emulator.log if e.method == "POST"]


def _post_of(emulator: MetadefenderEmulator, name: str) -> Logged:
    [entry] = [e for e in _posts(emulator) if e.headers.get("filename") == name]
    return entry


def _text(header: str) -> str:
    """A header value as sent (UTF-8; http.server reads headers as latin-1)."""
    return header.encode("latin-1").decode()


def test_clean_infected_blocked_and_encrypted_end_in_their_places(
        layout: Layout, emulator: MetadefenderEmulator) -> None:
    harness = _harness(layout, emulator)
    harness.drop("docs/ok.pdf", b"%PDF fine")
    harness.drop("e.com", EICAR)
    harness.drop("macro.doc", b"xx MD-BLOCKED xx")
    harness.drop("secret.zip", b"PK MD-ENCRYPTED")
    harness.run()
    assert layout.placed("clean") == ["docs/ok.pdf"]
    assert layout.placed("quarantine") == ["e.com", "macro.doc"]
    assert layout.placed("failed") == ["secret.zip"]
    assert harness.row("e.com").threats == ["Eicar-Test-Signature"]
    assert harness.row("macro.doc").reason == "blocked:Blocked file type"
    assert harness.row("secret.zip").reason == "encrypted"
    sidecar = json.loads((layout.quarantine / "e.com.scanwatch.json").read_text())
    assert sidecar["engine_scan_id"] in emulator.scans  # the plain data_id
    assert sidecar["threats"] == ["Eicar-Test-Signature"]
    upload = _post_of(emulator, "e.com")
    assert upload.body_bytes == len(EICAR) and upload.headers["content-length"] == str(len(EICAR))
    assert upload.headers["apikey"] == "test-key" and upload.headers["user_agent"].startswith("scanwatch/")
    # Core is sent the snapshot's bytes (docs/integrity.md), named as the drop folder has them.
    assert _text(upload.headers["original_file_path"]) == str(layout.inbox / "e.com")
    assert upload.headers["source"] == socket.gethostname() and "filepath" not in upload.headers


def test_names_lose_angle_brackets_and_only_filename_is_url_encoded(
        layout: Layout, emulator: MetadefenderEmulator) -> None:
    harness = _harness(layout, emulator)
    harness.drop("odd <1> ü %41.txt", b"odd")
    harness.run()
    assert layout.placed("clean") == ["odd <1> ü %41.txt"]
    [upload] = _posts(emulator)
    assert upload.headers["filename"] == "odd%201%20%C3%BC%20%2541.txt"
    assert _text(upload.headers["original_file_path"]) == f"{layout.inbox}/odd 1 ü %41.txt"


def test_archive_password_is_sent_as_utf8_and_an_unsendable_one_fails_the_file(layout: Layout) -> None:
    with MetadefenderEmulator(polls=0, archive_password="pässwörd") as emulator:
        engine_cfg = _engine_cfg(emulator.url)
        engine = MetadefenderEngine("default", MetadefenderEngineConfig.model_validate(engine_cfg))
        harness = Harness(layout, engine, engine_cfg=engine_cfg, archivepwd="pässwörd")
        harness.drop("a.zip", b"PK MD-ENCRYPTED")
        harness.run()
        assert layout.placed("clean") == ["a.zip"]  # Core opened it with the password
        bad = Harness(layout, engine, engine_cfg=engine_cfg, archivepwd=" padded-secret")
        bad.drop("b.zip", b"PK MD-ENCRYPTED")
        bad.run()
    assert layout.placed("failed") == ["b.zip"] and bad.row("b.zip").reason == "bad_request"
    assert len(_posts(emulator)) == 1  # nothing was sent for b.zip
    assert "padded-secret" not in repr(bad.row("b.zip"))


def test_result_codes_map_to_verdicts_and_reasons(layout: Layout, emulator: MetadefenderEmulator) -> None:
    harness = _harness(layout, emulator)
    # Every code docs/engines.md#metadefender-results lists, and one it does not (17).
    infected, failed = (2, 4, 6, 8, 20, 21, 22), (3, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19, 23)
    codes = {0: "clean", 7: "clean"} | dict.fromkeys(infected, "quarantine") | dict.fromkeys(failed, "failed")
    for code in codes:
        harness.drop(f"code{code}.bin", b"MD-RESULT:%d" % code)
    harness.run()
    for code, where in codes.items():
        assert f"code{code}.bin" in layout.placed(where), code
    reasons = {code: harness.row(f"code{code}.bin").reason for code in codes}
    too_large, encrypted = (13, 15), (12,)
    assert reasons == {0: None, 7: None} | dict.fromkeys(infected) | {
        code: "too_large" if code in too_large else "encrypted" if code in encrypted else "engine_failed"
        for code in failed}
    assert harness.row("code2.bin").threats == ["Suspicious"]  # no engine named it: Core's summary


def test_path_mode_names_the_snapshot_under_filepath_map_and_uploads_elsewhere(
        layout: Layout, tmp_path: Path) -> None:
    staging = layout.state / "staging"  # what Core reads by path: the snapshots (docs/integrity.md)
    with MetadefenderEmulator(polls=0, views={CORE_VIEW: staging}) as emulator:
        harness = _harness(layout, emulator, filepath_map={str(staging): CORE_VIEW,
                                                           f"{layout.inbox}/": "/the drop itself"})
        harness.drop("mapped/a b ü.txt", b"by path")
        harness.drop("mapped/deep/e.com", EICAR)
        harness.run()
        other = Harness(Layout(tmp_path / "other"), harness.engine, engine_cfg=_engine_cfg(emulator.url))
        other.drop("d.txt", b"unmapped")
        other.run()
    assert layout.placed("clean") == ["mapped/a b ü.txt"]
    assert layout.placed("quarantine") == ["mapped/deep/e.com"]
    by_path = _post_of(emulator, "a%20b%20%C3%BC.txt")
    snap = f"{harness.row('mapped/a b ü.txt').id}.snap"
    assert by_path.headers["filepath"] == f"/core%20view/drop/{snap}"  # never the drop's own path
    assert by_path.headers["content-length"] == "0" and by_path.body_bytes == 0
    # Not URL-encoded, unlike filename and filepath (docs/engines.md#opswat-metadefender-core).
    assert _text(by_path.headers["original_file_path"]) == str(layout.inbox / "mapped/a b ü.txt")
    assert _post_of(emulator, "e.com").headers["filepath"].startswith("/core%20view/drop/")
    upload = _post_of(emulator, "d.txt")
    assert "filepath" not in upload.headers and upload.body_bytes == 8


def test_path_mode_verdict_about_other_bytes_is_not_used(layout: Layout, tmp_path: Path) -> None:
    decoy = tmp_path / "decoy"  # where a wrong filepath_map leads Core: same name, harmless bytes
    decoy.mkdir()
    (decoy / "1.snap").write_bytes(b"harmless")
    with MetadefenderEmulator(polls=0, views={CORE_VIEW: decoy}) as emulator:
        harness = _harness(layout, emulator, filepath_map={str(layout.state / "staging"): CORE_VIEW})
        harness.drop("e.com", EICAR)
        with capture_logs() as events:
            harness.run()
    assert layout.placed("quarantine") == ["e.com"] and layout.placed("clean") == []
    first, second = _posts(emulator)
    assert "filepath" in first.headers and second.body_bytes == len(EICAR)
    [warning] = [e for e in events if e["event"] == "scan.path_mismatch"]
    assert "filepath_map" in warning["hint"]


def test_chunked_upload_above_max_request_bytes(layout: Layout) -> None:
    data = os.urandom(990) + EICAR + os.urandom(1442)  # the marker straddles the first chunk boundary
    with MetadefenderEmulator(polls=0, max_request_bytes=1000) as emulator:
        # The same bytes again must reach Core: scanwatch's own verdict cache is off.
        harness = _harness(layout, emulator, max_request_bytes="1kB", cache={"enabled": False})
        harness.drop("big.com", data)
        harness.drop("exact.bin", b"x" * 1000)
        harness.run()
        harness.drop("copy/again.com", data)  # the same bytes: Core answers its older data_id
        harness.run()
    assert layout.placed("quarantine") == ["big.com", "copy/again.com"]
    assert layout.placed("clean") == ["exact.bin"]
    first = _post_of(emulator, "big.com")
    assert first.headers["x-file-size"] == str(len(data)) and first.body_bytes == 1000
    data_id = harness.row("big.com").engine_scan_id
    rest = [e for e in _posts(emulator) if e.headers.get("x-file-id") == data_id]
    assert [(e.headers.get("x-file-id"), "x-file-size" in e.headers, "filename" in e.headers, e.body_bytes)
            for e in rest] == [(data_id, False, False, 1000), (data_id, False, False, 500)]
    assert "x-file-size" not in _post_of(emulator, "exact.bin").headers
    assert harness.row("copy/again.com").engine_scan_id == data_id
    assert all(e.status == 200 for e in _posts(emulator))


def test_hash_lookup_uses_a_known_result_without_a_submission(
        layout: Layout, emulator: MetadefenderEmulator) -> None:
    # Core's own hash cache, not scanwatch's (which is off here).
    harness = _harness(layout, emulator, hash_lookup=True, cache={"enabled": False})
    harness.drop("e.com", EICAR)
    harness.drop("locked.zip", b"MD-ENCRYPTED")
    harness.run()
    harness.drop("again/e.com", EICAR)
    harness.drop("again/locked.zip", b"MD-ENCRYPTED")  # a failed result is no answer: scanned again
    harness.run()
    assert layout.placed("quarantine") == ["again/e.com", "e.com"]
    assert layout.placed("failed") == ["again/locked.zip", "locked.zip"]
    assert sorted(e.headers["filename"] for e in _posts(emulator)) == ["e.com", "locked.zip", "locked.zip"]
    assert len([e for e in emulator.log if e.path.startswith("/hash/")]) == 4
    again = harness.row("again/e.com")
    assert again.raw_result["hash_lookup"] is True
    assert again.engine_scan_id == harness.row("e.com").engine_scan_id


def test_hash_lookup_ignores_a_result_of_another_workflow(
        layout: Layout, emulator: MetadefenderEmulator) -> None:
    light = _harness(layout, emulator, rule="light")
    light.drop("a.txt", b"fine")
    light.run()
    strict = _harness(layout, emulator, rule="strict", hash_lookup=True, cache={"enabled": False})
    for rel in ("again/a.txt", "more/a.txt"):
        strict.drop(rel, b"fine")
        strict.run()
    assert layout.placed("clean") == ["a.txt", "again/a.txt", "more/a.txt"]
    # Scanned again under `strict` once; after that, its own earlier result is used.
    assert [e.headers.get("rule") for e in _posts(emulator)] == ["light", "strict"]
    assert strict.row("more/a.txt").raw_result["hash_lookup"] is True


def test_progress_is_polled_at_rest_ip(layout: Layout) -> None:
    with MetadefenderEmulator(polls=2, rest_ip=True) as emulator:
        harness = _harness(layout, emulator)
        harness.drop("a.txt", b"fine")
        harness.run()
        assert emulator.node is not None
        node_host = emulator.node.url.removeprefix("http://")
    assert layout.placed("clean") == ["a.txt"]
    polls = [e for e in emulator.log if e.path.startswith("/file/")]
    # The main address answers 404 while the node runs the scan: any poll there would fail it.
    assert len(polls) == 3 and {e.headers["host"] for e in polls} == {node_host}
    assert all(e.status == 200 and e.headers["apikey"] == "test-key" for e in polls)


def test_progress_only_in_process_info_is_followed_to_the_end(layout: Layout) -> None:
    with MetadefenderEmulator(polls=2) as emulator:
        emulator.scan_results_progress = False
        harness = _harness(layout, emulator)
        harness.drop("e.com", EICAR)
        harness.run()
    assert layout.placed("quarantine") == ["e.com"]
    assert len([e for e in emulator.log if e.path.startswith("/file/")]) == 3  # two at 50%, then done


@pytest.mark.parametrize("apikey", ["wrong-key", None])
def test_bad_or_missing_apikey_fails_auth_without_a_retry_storm(
        layout: Layout, emulator: MetadefenderEmulator, apikey: str | None) -> None:
    harness = _harness(layout, emulator, apikey=apikey)
    harness.drop("a.txt", b"a")
    harness.run()
    assert layout.placed("failed") == ["a.txt"] and harness.row().reason == "auth"
    assert len(emulator.log) == 1


def test_core_without_keys_is_sent_none(layout: Layout) -> None:
    with MetadefenderEmulator(apikey=None, polls=0) as emulator:
        harness = _harness(layout, emulator, apikey=None, rule="multiscan")
        harness.drop("a.txt", b"a")
        harness.run()
    assert layout.placed("clean") == ["a.txt"]
    assert not any("apikey" in e.headers for e in emulator.log)
    post = _post_of(emulator, "a.txt")
    assert post.headers["rule"] == "multiscan" and "user_agent" not in post.headers  # rule supersedes it


@pytest.mark.parametrize(("status", "err", "where", "reason"), [
    (403, "Invalid License", "failed", "engine_error"),
    (500, "License expired", "failed", "engine_error"),
    (500, "Not enough disk space", "failed", "engine_error"),
    (400, "Bad Request", "failed", "bad_request"),
    (403, "scan limit reached, try again later", "clean", None),
    (403, "exceeded number of allowed clients", "clean", None),
    (500, "Internal error", "clean", None),
])
def test_error_answers_fail_or_retry_as_documented(layout: Layout, emulator: MetadefenderEmulator,
                                                   status: int, err: str, where: str,
                                                   reason: str | None) -> None:
    harness = _harness(layout, emulator)
    emulator.inject(Fault(status, {"err": err}, {"Retry-After": "2"}), path_prefix="/file")
    harness.drop("a.txt", b"a")
    harness.run()
    assert layout.placed(where) == ["a.txt"] and harness.row().reason == reason
    assert len(_posts(emulator)) == (1 if where == "failed" else 2)
    # A licence or disk problem fails every file alike: the engine is down, which alerts
    # (docs/engines.md#metadefender-errors); a 400 is this file's.
    healthy, detail, _ = harness.journal.engine_health().get("default", (True, None, 0.0))
    assert healthy is (reason != "engine_error")
    assert healthy or "needs its administrator" in (detail or "")


def test_503_storm_ends_right_with_bounded_requests(layout: Layout, emulator: MetadefenderEmulator) -> None:
    harness = _harness(layout, emulator, max_attempts=10)
    emulator.inject(Fault(503, {"err": "Server is too busy. Try again later."}, {"Retry-After": "1"}),
                    count=8)
    emulator.inject(Fault(429, {"err": "slow down"}, {"Retry-After": "1"}), count=2)
    emulator.inject(Fault(reset=True), count=2)
    for i in range(5):
        harness.drop(f"f{i}.txt", b"x%d" % i)
    harness.drop("e.com", EICAR)
    harness.run(steps=80)
    assert len(layout.placed("clean")) == 5 and layout.placed("quarantine") == ["e.com"]
    assert len(emulator.submissions()) == 6 and len(emulator.scans) == 6  # each file submitted once
    assert len(emulator.log) < 40


def test_slow_answer_times_out_and_is_retried(layout: Layout, emulator: MetadefenderEmulator) -> None:
    harness = _harness(layout, emulator, timeout=0.3)
    emulator.inject(Fault(status=0, delay_s=1.0), path_prefix="/file/")
    harness.drop("a.txt", b"a")
    harness.run()
    assert layout.placed("clean") == ["a.txt"]
    assert len(emulator.submissions()) == 1  # the poll timed out, not the submission: nothing resent


def test_engine_down_at_start_then_back(layout: Layout) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine_cfg = _engine_cfg(f"http://127.0.0.1:{port}")
    engine = MetadefenderEngine("default", MetadefenderEngineConfig.model_validate(engine_cfg))
    harness = Harness(layout, engine, engine_cfg=engine_cfg)
    harness.drop("a.txt", b"a")
    for _ in range(3):
        harness.step(advance_s=20)
    row = harness.row()
    assert row.state is FileState.STABLE and row.attempts == 0  # waiting spends no attempt
    assert harness.journal.engine_health()["default"][0] is False
    with MetadefenderEmulator(polls=0, port=port):
        harness.run()
    assert layout.placed("clean") == ["a.txt"]
    assert harness.journal.engine_health()["default"][0] is True


def test_empty_file_fails_without_an_upload(layout: Layout, emulator: MetadefenderEmulator) -> None:
    harness = _harness(layout, emulator)
    harness.drop("empty.txt", b"")
    harness.run()
    assert layout.placed("failed") == ["empty.txt"] and harness.row("empty.txt").reason == "bad_request"
    assert _posts(emulator) == []


def test_probe_checks_reachability_and_key(emulator: MetadefenderEmulator) -> None:
    def engine(key: str, url: str) -> MetadefenderEngine:
        return MetadefenderEngine("md", MetadefenderEngineConfig.model_validate(_engine_cfg(url, apikey=key)))

    assert engine("test-key", emulator.url).probe() == f"metadefender 5.10.1 at {emulator.url}"
    with pytest.raises(EnginePermanentError, match="credentials") as info:
        engine("wrong", emulator.url).probe()
    assert info.value.reason == "auth" and "wrong" not in str(info.value)
    with pytest.raises(EngineUnavailableError, match="cannot reach"):
        engine("test-key", "http://127.0.0.1:9").probe()


def test_emulator_refuses_what_core_refuses(emulator: MetadefenderEmulator) -> None:
    key = {"apikey": "test-key"}
    with httpx.Client(base_url=emulator.url) as client:
        def status(**kw: object) -> int:
            return client.post("/file", **kw).status_code  # type: ignore[arg-type]

        assert status(headers=key, content=iter([b"streamed"])) == 411  # chunked transfer: no length
        assert status(headers=key, content=b"") == 422
        assert status(headers={**key, "filepath": "/x"}, content=b"body") == 400
        assert status(headers={**key, "filepath": "%2Fx%2Fa.txt"}, content=b"") == 400
        assert status(headers={**key, "filename": "a b.txt"}, content=b"x") == 400
        assert status(headers={**key, "rule": "r", "user_agent": "u"}, content=b"x") == 400
        assert status(headers={**key, "original_file_path": "/in/<a>.txt"}, content=b"x") == 400
        assert status(headers={**key, "X-File-ID": "nope"}, content=b"x") == 400
        assert status(headers={"apikey": "wrong"}, content=b"x") == 401
        assert status(headers=key, content=b"fine") == 200


def test_config_normalizes_filepath_map_and_names_bad_keys(layout: Layout) -> None:
    config = layout.config(engine={"type": "metadefender", "url": "http://127.0.0.1:8008",
                                   "filepath_map": {"/srv//drop/": "/mnt/drop"}, "max_request_bytes": "5MiB"})
    layout.config_path.write_text(yaml.safe_dump(config))
    md = load_config(layout.config_path).engines["default"]
    assert isinstance(md, MetadefenderEngineConfig) and md.apikey is None and md.hash_lookup is False
    assert md.filepath_map == {"/srv/drop": "/mnt/drop"} and md.max_request_bytes == 5 * 2**20
    config["engines"]["default"].update(filepath_map={"drop": "/mnt/drop"}, max_request_bytes=0,
                                        rule=" padded", url="ftp://core")
    layout.config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as info:
        load_config(layout.config_path)
    assert sorted(p.split(":")[0] for p in info.value.problems) == [
        "engines.default.filepath_map", "engines.default.max_request_bytes", "engines.default.rule",
        "engines.default.url"]
    assert "'drop': expected an absolute local directory" in " ".join(info.value.problems)


def test_the_commented_example_in_example_yaml_is_valid() -> None:
    text = uncommented((ROOT / "config" / "example.yaml").read_text(), "md")
    md = MetadefenderEngineConfig.model_validate(yaml.safe_load(text)["engines"]["md"])
    assert md.filepath_map == {"/srv/scanwatch/drop": "/mnt/drop"} and md.max_request_bytes == 100_000_000
    assert md.rule == "multiscan" and md.apikey is not None


def _daemon_config(layout: Layout, emulator: MetadefenderEmulator, **cfg: object) -> Path:
    engine = {**_engine_cfg(emulator.url, **cfg), "apikey": "${MD_KEY}", "poll_interval": 0.2}
    return layout.write_config(engine=engine)


def test_daemon_scans_by_path_and_upload_and_keeps_secrets_out_of_logs(
        layout: Layout, daemon_factory) -> None:
    apikey, password = "md-live-0123456789-very-secret", "zip-pass-9876-very-secret"
    mapped = layout.inbox / "mapped"
    mapped.mkdir()
    staging = layout.state / "staging"
    with MetadefenderEmulator(apikey, polls=1, views={CORE_VIEW: staging},
                              archive_password=password) as emulator:
        engine = {**_engine_cfg(emulator.url), "apikey": "${MD_KEY}", "poll_interval": 0.2,
                  "filepath_map": {str(staging): CORE_VIEW}}
        config = layout.write_config(engine=engine, watch={"archivepwd": "${MD_PWD}"})
        daemon = daemon_factory(config, {"MD_KEY": apikey, "MD_PWD": password})
        daemon.wait_started()
        (mapped / "ok.txt").write_bytes(b"fine")
        (mapped / "e.com").write_bytes(EICAR)
        (layout.inbox / "locked.zip").write_bytes(b"PK MD-ENCRYPTED")  # opens with the password
        (layout.inbox / "e2.com").write_bytes(EICAR + b" uploaded")
        daemon.wait_for(lambda: len(daemon.named("file.moved")) == 4, what="four files moved")
        assert daemon.stop() == 0
    assert layout.placed("clean") == ["locked.zip", "mapped/ok.txt"]
    assert layout.placed("quarantine") == ["e2.com", "mapped/e.com"]
    # Every local file is read by Core from its snapshot, by path, and named by its own path.
    ok = _post_of(emulator, "ok.txt").headers
    assert unquote(ok["filepath"]).startswith(f"{CORE_VIEW}/") and ok["filepath"].endswith(".snap")
    assert _text(ok["original_file_path"]) == str(mapped / "ok.txt")
    assert _post_of(emulator, "e.com").body_bytes == 0
    assert _post_of(emulator, "e2.com").body_bytes == 0
    assert _post_of(emulator, "locked.zip").headers["archivepwd"] == password
    assert all(e.headers["apikey"] == apikey for e in emulator.log)
    sidecars = "".join(p.read_text() for p in layout.quarantine.rglob("*.scanwatch.json"))
    for secret in (apikey, password):
        assert not daemon.leaked(secret)
        assert secret not in sidecars


def test_kill_9_between_submit_and_verdict_resumes_by_polling(
        layout: Layout, emulator: MetadefenderEmulator, daemon_factory) -> None:
    emulator.hold = True  # scans stay in progress until the first daemon is gone

    def release() -> None:
        emulator.hold = False

    kill_9_between_submit_and_verdict(layout, daemon_factory, _daemon_config(layout, emulator),
                                      {"MD_KEY": "test-key"}, before_restart=release)
    assert len(emulator.submissions()) == 6 and len(emulator.scans) == 6  # one submission per file


def test_kill_9_inside_the_submission_finds_the_scan_by_hash(
        layout: Layout, emulator: MetadefenderEmulator, daemon_factory) -> None:
    config = _daemon_config(layout, emulator, hash_lookup=True)
    metrics = kill_9_inside_submission(layout, daemon_factory, config, {"MD_KEY": "test-key"},
                                       emulator, "/file")
    assert len(emulator.submissions()) == 1  # the in-doubt submission was found, not repeated
    assert "scanwatch_resubmissions_total{" not in metrics


def test_kill_9_inside_the_submission_without_hash_lookup_submits_again(
        layout: Layout, emulator: MetadefenderEmulator, daemon_factory) -> None:
    metrics = kill_9_inside_submission(layout, daemon_factory, _daemon_config(layout, emulator),
                                       {"MD_KEY": "test-key"}, emulator, "/file")
    assert len(emulator.submissions()) == 2
    assert 'scanwatch_resubmissions_total{engine="default",watch="inbox"} 1.0' in metrics


def test_large_upload_streams_with_small_rss(layout: Layout, emulator: MetadefenderEmulator,
                                            daemon_factory) -> None:
    size_mb = 64
    daemon = daemon_factory(_daemon_config(layout, emulator), {"MD_KEY": "test-key"})
    daemon.wait_started()
    (layout.inbox / "small.txt").write_bytes(b"warm-up: every code path loaded")
    daemon.wait_for(lambda: daemon.named("file.moved"), what="small file moved")
    before_kb = daemon.peak_rss_kb()
    write_random(layout.inbox / "big.bin", size_mb)
    daemon.wait_for(lambda: len(daemon.named("file.moved")) == 2, timeout=60, what="big file moved")
    growth_kb = daemon.peak_rss_kb() - before_kb
    assert daemon.stop() == 0
    assert layout.placed("clean") == ["big.bin", "small.txt"]
    assert _post_of(emulator, "big.bin").body_bytes == size_mb * 1_000_000
    assert growth_kb < size_mb * 1024 // 4, f"peak RSS grew by {growth_kb} kB for a {size_mb} MB upload"
