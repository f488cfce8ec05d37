"""The ClamAV engine against a real clamd: path mode, stream fallback, limits, outages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from clamd_server import STREAM_MAX_BYTES, Clamd
from conftest import EICAR, Harness, Layout

from daemon.config import ClamavEngineConfig
from daemon.engines.clamav import ClamavEngine
from daemon.errors import EngineUnavailableError
from daemon.model import FileState


def _engine(**cfg: object) -> ClamavEngine:
    return ClamavEngine("default", ClamavEngineConfig.model_validate({"type": "clamav", **cfg}))


@pytest.fixture
def world_readable(layout: Layout) -> Layout:
    """Folders the clamav user can walk, as on a host where clamd scans drop folders."""
    for path in (layout.base, *layout.base.parents):
        if str(path).startswith("/tmp/pytest-of-"):
            path.chmod(0o755)
    layout.base.chmod(0o755)
    layout.inbox.chmod(0o755)
    return layout


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


@pytest.mark.skipif(os.geteuid() != 0, reason="needs clamd running as another user than the files' owner")
def test_auto_mode_streams_what_clamd_cannot_read(world_readable: Layout, clamd: Clamd) -> None:
    harness = _harness(world_readable, clamd, mode="auto")
    harness.drop("private.com", EICAR).chmod(0o600)  # clamd (user clamav) may not open it
    harness.drop("public.com", EICAR).chmod(0o644)
    harness.step()
    assert harness.layout.placed("quarantine") == ["private.com", "public.com"]
    assert harness.row("private.com").raw_result["mode"] == "stream"
    assert harness.row("public.com").raw_result["mode"] == "path"


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
    assert daemon.stop() == 0
