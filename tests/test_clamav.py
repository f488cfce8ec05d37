"""The ClamAV engine against a real clamd: the held descriptor (FILDES), path and stream modes,
the stream fallback, limits, outages."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from clamd_server import STREAM_MAX_BYTES, Clamd, running_clamd, unix_relay
from conftest import EICAR, Harness, Layout
from structlog.testing import capture_logs

from daemon.config import ClamavEngineConfig, Config
from daemon.engines.base import ScanRequest
from daemon.engines.clamav import ClamavEngine, follow_clamd_threads
from daemon.errors import EngineRetryableError, EngineUnavailableError
from daemon.fsutil import sha256_fd
from daemon.model import FileState, Reason, VerdictKind


def _engine(**cfg: object) -> ClamavEngine:
    return ClamavEngine("default", ClamavEngineConfig.model_validate({"type": "clamav", **cfg}))


@pytest.fixture
def world_readable(layout: Layout) -> Layout:
    """Folders the clamav user can walk, as on a host where clamd scans drop folders (and,
    in path mode, the staging directory of snapshots: docs/integrity.md)."""
    for path in (layout.base, *layout.base.parents):
        if str(path).startswith("/tmp/pytest-of-"):
            path.chmod(0o755)
    layout.base.chmod(0o755)
    layout.inbox.chmod(0o755)
    (layout.state / "staging").mkdir(parents=True, mode=0o755)
    return layout


@contextmanager
def _held(path: Path) -> Iterator[ScanRequest]:
    """What the pipeline hands an engine: `path` opened read-only and hashed, the fd held."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.lseek(fd, 0, os.SEEK_END)  # clamd must read from 0 whatever our offset
        yield ScanRequest(watch="inbox", rel_path=path.name, path=str(path), fd=fd,
                          size=os.fstat(fd).st_size, sha256=sha256_fd(fd), ref_id="r")
    finally:
        os.close(fd)


def _public(path: Path, data: bytes) -> Path:
    """A file clamd's user can open by name, so a SCAN by path would read it."""
    path.write_bytes(data)
    path.chmod(0o644)
    return path


def _harness(layout: Layout, clamd: Clamd, **cfg: object) -> Harness:
    engine_cfg = {"type": "clamav", "socket": str(clamd.socket), **cfg}
    harness = Harness(layout, _engine(**{k: v for k, v in engine_cfg.items() if k != "type"}),
                      engine_cfg=engine_cfg)
    return harness


def test_probe_answers_pong_and_version(clamd: Clamd) -> None:
    assert _engine(socket=str(clamd.socket)).probe().startswith("ClamAV ")
    assert _engine(address=clamd.address).probe().startswith("ClamAV ")


def test_path_mode_scans_by_path_clean_and_infected(world_readable: Layout, clamd: Clamd) -> None:
    harness = _harness(world_readable, clamd, mode="path")
    harness.drop("dir with space/ok.txt", b"fine").chmod(0o644)
    harness.drop("e.com", EICAR).chmod(0o644)
    harness.step()
    assert harness.layout.placed("clean") == ["dir with space/ok.txt"]
    assert harness.layout.placed("quarantine") == ["e.com"]
    row = harness.row("e.com")
    assert row.threats == [clamd.signature] and row.raw_result["mode"] == "path"
    sidecar = json.loads((harness.layout.quarantine / "e.com.scanwatch.json").read_text())
    assert sidecar["threats"] == [clamd.signature] and sidecar["engine"] == "default"


def test_auto_mode_scans_the_held_descriptor(layout: Layout, clamd: Clamd) -> None:
    harness = _harness(layout, clamd)  # mode auto: the default
    harness.drop("ok.txt", b"fine").chmod(0o600)
    harness.drop("e.com", EICAR).chmod(0o600)
    harness.step()
    assert harness.layout.placed("clean") == ["ok.txt"]
    assert harness.layout.placed("quarantine") == ["e.com"]
    row = harness.row("e.com")
    assert row.threats == [clamd.signature] and row.raw_result["mode"] == "fd"
    assert harness.row("ok.txt").raw_result["mode"] == "fd"


@pytest.mark.parametrize(("held", "then_named", "kind"), [
    (b"clean bytes", EICAR, VerdictKind.CLEAN),
    (EICAR, b"clean bytes", VerdictKind.INFECTED),
], ids=["held-clean", "held-eicar"])
def test_fildes_judges_the_held_bytes_not_the_name(world_readable: Layout, clamd: Clamd,
                                                    held: bytes, then_named: bytes,
                                                    kind: VerdictKind) -> None:
    name = _public(world_readable.inbox / "a.com", held)
    with _held(name) as request:
        os.replace(_public(world_readable.inbox / "swap.com", then_named), name)  # after the hash
        verdict = _engine(socket=str(clamd.socket)).scan(request)
    assert verdict.kind is kind and verdict.raw["mode"] == "fd"


def test_fildes_needs_no_name_clamd_can_open(tmp_path: Path, clamd: Clamd) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with _held(_public(private / "e.com", EICAR)) as request:
        (private / "e.com").chmod(0)
        (private / "e.com").unlink()  # no name at all: only the descriptor is left
        verdict = _engine(socket=str(clamd.socket)).scan(request)
    assert verdict.kind is VerdictKind.INFECTED and verdict.threats == (clamd.signature,)
    assert verdict.raw["mode"] == "fd"


def test_concurrent_scans_share_the_pool_and_match_their_replies(layout: Layout, clamd: Clamd) -> None:
    engine = _engine(socket=str(clamd.socket))
    names = [_public(layout.inbox / f"{i}.com", EICAR if i % 3 == 0 else b"clean %d" % i)
             for i in range(12)]

    def scan(name: Path) -> VerdictKind:
        with _held(name) as request:
            return engine.scan(request).kind

    with ThreadPoolExecutor(max_workers=6) as pool:
        kinds = list(pool.map(scan, names * 5))
    engine.close()
    assert kinds == [VerdictKind.INFECTED if i % 3 == 0 else VerdictKind.CLEAN
                     for i in range(12)] * 5


def test_a_fildes_scan_is_one_message(layout: Layout, clamd: Clamd, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command and the byte carrying the descriptor go in one `sendmsg` (clamd reads them
    with one wake-up); and a session's sends and receives are bounded by the kernel
    (docs/engines.md), not by a poll before each of them."""
    engine = _engine(socket=str(clamd.socket))
    with _held(_public(layout.inbox / "a.com", EICAR)) as request:
        assert engine.scan(request).kind is VerdictKind.INFECTED  # a pooled session from now on
        sends: list[str] = []
        for name in ("send", "sendall", "sendmsg"):
            original = getattr(socket.socket, name)
            monkeypatch.setattr(socket.socket, name, lambda sock, *a, _o=original, _n=name, **k: (
                sends.append(_n), _o(sock, *a, **k))[1])
        verdict = engine.scan(request)
        sent = list(sends)
    (session,) = engine._idle
    assert session.sock.gettimeout() is None
    engine.close()
    assert verdict.kind is VerdictKind.INFECTED and verdict.raw["mode"] == "fd"
    assert sent == ["sendmsg"]


def test_a_clamd_that_does_not_answer_is_a_timeout(layout: Layout, tmp_path: Path) -> None:
    """`timeout` bounds the wait for clamd's reply: a retryable timeout, the session dropped."""
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        engine = _engine(socket=str(path), timeout=0.5)
        with _held(_public(layout.inbox / "a.txt", b"fine")) as request:
            started = time.monotonic()
            with pytest.raises(EngineRetryableError) as raised:
                engine.scan(request)
        assert raised.value.reason is Reason.TIMEOUT
        assert 0.4 < time.monotonic() - started < 5
        assert engine._idle == []


def test_path_mode_lets_clamd_open_the_name(world_readable: Layout, clamd: Clamd) -> None:
    name = _public(world_readable.inbox / "a.com", b"clean bytes")
    with _held(name) as request:
        os.replace(_public(world_readable.inbox / "swap.com", EICAR), name)
        verdict = _engine(socket=str(clamd.socket), mode="path").scan(request)
    assert verdict.kind is VerdictKind.INFECTED and verdict.raw["mode"] == "path"


def test_auto_over_tcp_streams_the_held_bytes(world_readable: Layout, clamd: Clamd) -> None:
    name = _public(world_readable.inbox / "a.com", EICAR)
    with _held(name) as request:
        os.replace(_public(world_readable.inbox / "swap.com", b"clean bytes"), name)
        verdict = _engine(address=clamd.address).scan(request)
    assert verdict.kind is VerdictKind.INFECTED and verdict.raw["mode"] == "stream"


def test_refused_fildes_falls_back_to_stream_never_to_path(world_readable: Layout, clamd: Clamd,
                                                           tmp_path: Path) -> None:
    with unix_relay(tmp_path / "old-clamd.sock", clamd.address) as sent:
        engine = _engine(socket=str(tmp_path / "old-clamd.sock"))
        verdicts = []
        with capture_logs() as logs:
            for data in (EICAR, b"clean bytes"):
                name = _public(world_readable.inbox / "a.com", data)
                with _held(name) as request:
                    os.replace(_public(world_readable.inbox / "swap.com", EICAR), name)
                    verdicts.append(engine.scan(request))
        engine.close()
    assert [(v.kind, v.raw["mode"]) for v in verdicts] == [
        (VerdictKind.INFECTED, "stream"), (VerdictKind.CLEAN, "stream")]
    wire = b"".join(sent)
    assert wire.count(b"zFILDES\0") == 1 and b"zSCAN" not in wire  # refused once, then remembered
    assert [e["event"] for e in logs] == ["engine.fildes_refused"]


def test_stream_mode_over_tcp(layout: Layout, clamd: Clamd) -> None:
    harness = Harness(layout, _engine(address=clamd.address, mode="stream"),
                      engine_cfg={"type": "clamav", "address": clamd.address, "mode": "stream"})
    harness.drop("e.com", EICAR)
    harness.drop("big-clean.bin", os.urandom(STREAM_MAX_BYTES // 2))
    harness.step()
    assert harness.layout.placed("quarantine") == ["e.com"]
    assert harness.layout.placed("clean") == ["big-clean.bin"]
    assert harness.row("e.com").raw_result["mode"] == "stream"


def test_stream_over_clamd_limit_fails_too_large(layout: Layout, clamd: Clamd) -> None:
    harness = Harness(layout, _engine(socket=str(clamd.socket), mode="stream"),
                      engine_cfg={"type": "clamav", "socket": str(clamd.socket), "mode": "stream"})
    harness.drop("huge.bin", b"\0" * (STREAM_MAX_BYTES + 1))
    harness.step()
    assert harness.layout.placed("failed") == ["huge.bin"]
    assert harness.row("huge.bin").reason == "too_large"
    harness.drop("after.txt", b"the pool still works")
    harness.step(advance_s=3)  # past the rescan interval: the harness has no inotify
    assert harness.layout.placed("clean") == ["after.txt"]


def test_clamd_down_files_wait_then_finish(layout: Layout, clamd: Clamd, tmp_path: Path) -> None:
    missing = tmp_path / "not-yet.sock"
    engine_cfg = {"type": "clamav", "socket": str(missing)}
    harness = Harness(layout, _engine(socket=str(missing)), engine_cfg=engine_cfg)
    with pytest.raises(EngineUnavailableError, match="cannot reach clamd"):
        harness.engine.probe()
    harness.drop("a.txt", b"waiting")
    for _ in range(3):
        harness.step(advance_s=400)
    assert harness.layout.placed("failed") == [] and harness.row().state is FileState.STABLE
    assert harness.row().attempts == 0
    healthy, detail, _ = harness.journal.engine_health()["default"]
    assert not healthy and "cannot reach clamd" in detail  # what `status` and /healthz show
    missing.symlink_to(clamd.socket)  # clamd is back
    harness.step(advance_s=400)
    assert harness.layout.placed("clean") == ["a.txt"]
    assert harness.journal.engine_health()["default"][0] is True


def test_daemon_with_clamav_engine_end_to_end(world_readable: Layout, clamd: Clamd, daemon_factory) -> None:
    layout = world_readable
    config = layout.write_config()
    text = config.read_text().replace("type: yara", f"type: clamav\n    socket: {clamd.socket}")
    config.write_text(text)
    daemon = daemon_factory(config)
    daemon.wait_started()
    (layout.inbox / "ok.txt").write_bytes(b"ok")
    (layout.inbox / "e.com").write_bytes(EICAR)
    daemon.wait_for(lambda: len(daemon.named("file.moved")) >= 2, what="both files moved")
    assert layout.placed("clean") == ["ok.txt"] and layout.placed("quarantine") == ["e.com"]
    assert daemon.named("engine.ready")[0]["detail"].startswith("ClamAV ")
    assert daemon.named("engine.concurrency")[0]["concurrency"] == 4  # clamd's MaxThreads
    assert daemon.stop() == 0


# -- concurrency at clamd's MaxThreads, sessions across a restart (docs/engines.md) -------------------

def test_unset_concurrency_follows_clamds_max_threads_and_a_set_one_stays(layout: Layout, clamd: Clamd,
                                                                          tmp_path: Path) -> None:
    engines = {"unset": {"type": "clamav", "socket": str(clamd.socket)},
               "set": {"type": "clamav", "socket": str(clamd.socket), "concurrency": 3},
               "tcp": {"type": "clamav", "address": clamd.address},
               "down": {"type": "clamav", "socket": str(tmp_path / "no.sock")}}
    config = Config.model_validate({**layout.config(), "engines": {**engines, "default": {"type": "yara"}}})
    with capture_logs() as logs:
        followed = follow_clamd_threads(config)
    assert {name: cfg.concurrency for name, cfg in followed.engines.items()} == {
        "unset": 4, "set": 3, "tcp": 4, "down": 2, "default": 2}  # the test clamd: MaxThreads 4
    assert [e["engine"] for e in logs if e["event"] == "engine.concurrency_default"] == ["down"]


def test_a_clamd_restart_loses_no_scan_of_pooled_sessions(layout: Layout, tmp_path: Path) -> None:
    """Sessions pooled before clamd restarted are all closed: the next scans, one after
    another or at once, each reach the new clamd at the first try."""
    link = tmp_path / "clamd.sock"
    engine = _engine(socket=str(link))
    names = [_public(layout.inbox / f"{i}.com", EICAR if i % 3 == 0 else b"clean %d" % i)
             for i in range(12)]
    expected = [VerdictKind.INFECTED if i % 3 == 0 else VerdictKind.CLEAN for i in range(12)]

    def scan(name: Path) -> VerdictKind:
        with _held(name) as request:
            return engine.scan(request).kind

    with running_clamd() as before:
        link.symlink_to(before.socket)
        _three_pooled_sessions(engine)
        assert [scan(name) for name in names[:3]] == expected[:3]
    link.unlink()
    with running_clamd() as after:
        link.symlink_to(after.socket)
        assert scan(names[0]) is VerdictKind.INFECTED  # two stale sessions would end this one
        _three_pooled_sessions(engine)
    link.unlink()
    with running_clamd() as again:
        link.symlink_to(again.socket)
        with ThreadPoolExecutor(max_workers=4) as pool:
            assert list(pool.map(scan, names)) == expected
    engine.close()


def _three_pooled_sessions(engine: ClamavEngine) -> None:
    """Three sessions open at once, then back in the pool."""
    sessions = [engine._take(pooled=True) for _ in range(3)]
    for session in sessions:
        engine._pool(session)


# -- files clamd would not read whole (docs/engines.md#file-size-limits) --------------------------

_LIMITS = {"MaxFileSize": "1M", "MaxScanSize": "1M", "StreamMaxLength": "1M"}


def _eicar_body_signature(db: Path) -> None:
    """A body signature for the EICAR string anywhere in a file (not only a whole-file hash)."""
    marker = EICAR.split(b"$")[1]  # EICAR-STANDARD-ANTIVIRUS-TEST-FILE!
    (db / "body.ndb").write_text(f"Scanwatch-Test-EICAR-Body:0:*:{marker.hex()}\n")


@pytest.fixture(scope="module", params=["no", "yes"], ids=["limits", "limits-alert"])
def limited_clamd(request: pytest.FixtureRequest) -> Iterator[tuple[Clamd, bool]]:
    """clamd with 1M limits and the EICAR body signature; AlertExceedsMax per param."""
    options = {**_LIMITS, "AlertExceedsMax": request.param}
    with running_clamd(populate=_eicar_body_signature, options=options) as server:
        yield server, request.param == "yes"


def _eicar_at_the_end(path: Path, size_bytes: int) -> Path:
    """A file of `size_bytes` (sparse) whose last bytes are the EICAR string."""
    with open(path, "wb") as f:
        f.truncate(size_bytes - len(EICAR))
        f.seek(0, os.SEEK_END)
        f.write(EICAR)
    return path


def test_a_file_past_clamds_limits_is_never_clean(layout: Layout, limited_clamd: tuple[Clamd, bool]) -> None:
    clamd, alerts = limited_clamd
    # Over clamd's limits, under max_size: only AlertExceedsMax tells; else max_size must.
    harness = _harness(layout, clamd, max_size="1MiB" if not alerts else "10MiB")
    _eicar_at_the_end(layout.inbox / "big.bin", 3_000_000)
    _eicar_at_the_end(layout.inbox / "small.bin", 500_000)
    harness.step()
    assert layout.placed("quarantine") == ["small.bin"]  # the body signature finds the tail
    assert layout.placed("failed") == ["big.bin"] and layout.placed("clean") == []
    row = harness.row("big.bin")
    assert row.reason == "too_large" and row.verdict == "failed"
    error = row.raw_result["error"]
    assert ("Heuristics.Limits.Exceeded.MaxFileSize" in error) if alerts else ("max_size" in error)


def test_default_max_size_keeps_a_30mb_file_from_a_clamd_that_reads_less(
        layout: Layout, limited_clamd: tuple[Clamd, bool]) -> None:
    harness = _harness(layout, limited_clamd[0])  # max_size: the default, 25 MiB
    _eicar_at_the_end(layout.inbox / "big.bin", 30_000_000)
    harness.step()
    assert layout.placed("failed") == ["big.bin"] and harness.row("big.bin").reason == "too_large"
    assert "max_size" in harness.row("big.bin").raw_result["error"]  # never sent


# -- the verdict cache's flights (docs/engines.md, "Verdict cache") ---------------------------------

@pytest.mark.parametrize(("where", "size", "flights"), [
    ("socket", 4096, 0), ("socket", 256 * 1024, 0), ("socket", 256 * 1024 + 1, 16), ("address", 4096, 16)])
def test_small_files_to_a_local_clamd_take_no_flight(layout: Layout, clamd: Clamd,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     where: str, size: int, flights: int) -> None:
    """A clamd on a unix socket scans a copy of up to 256 KiB again for less than a flight's
    journal write on every file: 16 files cost the batch's claim, verdicts and moves only.
    Over TCP, or larger, each file holds its bytes' flight while clamd is asked."""
    harness = _harness(layout, clamd) if where == "socket" else Harness(
        layout, _engine(address=clamd.address), engine_cfg={"type": "clamav", "address": clamd.address})
    for i in range(16):
        harness.drop(f"f{i}.bin", os.urandom(size))
    harness.watcher.step()
    writes = harness.journal_writes(monkeypatch)
    harness.pipeline.run_once(["inbox"])
    assert len(harness.layout.placed("clean")) == 16
    assert writes[0] == 3 + flights
    assert harness.journal.verdicts.stats() == {"default": (0, 16)}
