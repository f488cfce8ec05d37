"""Several engines on one watch, for real: YARA, a real clamd and the MetaDefender emulator,
driving `scanwatch run` as a subprocess."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from clamd_server import Clamd
from conftest import EICAR, Layout
from emulators.metadefender import MetadefenderEmulator
from realservers import TcpProxy

ENGINES = ["yara", "clam", "md"]


@pytest.fixture
def emulator() -> Iterator[MetadefenderEmulator]:
    with MetadefenderEmulator(polls=1) as server:
        yield server


def _config(layout: Layout, clamd: Clamd, md_url: str) -> Path:
    raw = layout.config(watch={"engine": ENGINES})
    raw["engines"] = {
        "yara": {"type": "yara"},
        "clam": {"type": "clamav", "socket": str(clamd.socket)},
        "md": {"type": "metadefender", "url": md_url, "apikey": "test-key", "poll_interval": 0.2,
               "timeout": 5},
    }
    layout.config_path.write_text(yaml.safe_dump(raw))
    return layout.config_path


def _submitted(daemon: Any, rel: str) -> list[str]:
    return [e["engine"] for e in daemon.named("scan.submitted") if e.get("rel_path") == rel]


def _sidecar(root: Path, rel: str) -> dict[str, Any]:
    return dict(json.loads((root / f"{rel}.scanwatch.json").read_text()))


def test_three_engines_decide_together(layout: Layout, clamd: Clamd, emulator: MetadefenderEmulator,
                                       daemon_factory: Any) -> None:
    daemon = daemon_factory(_config(layout, clamd, emulator.url))
    daemon.wait_started()
    # Infected by YARA and clamd while MetaDefender's scan is still in progress: decided at once.
    emulator.hold = True
    (layout.inbox / "e.com").write_bytes(EICAR)
    daemon.wait_for(lambda: daemon.named("file.moved"), what="e.com moved")
    emulator.hold = False
    assert [e["engines"] for e in daemon.named("scan.abandoned")] == [["md"]]
    (layout.inbox / "ok.txt").write_bytes(b"fine")
    (layout.inbox / "locked.zip").write_bytes(b"PK MD-ENCRYPTED")  # only MetaDefender fails it
    daemon.wait_for(lambda: len(daemon.named("file.moved")) == 3, timeout=30, what="three moved")
    assert daemon.stop() == 0
    assert layout.placed("quarantine") == ["e.com"]
    assert layout.placed("clean") == ["ok.txt"]
    assert layout.placed("failed") == ["locked.zip"]
    infected = _sidecar(layout.quarantine, "e.com")
    assert infected["engine"] == "yara+clam+md"
    assert [s["engine"] for s in infected["scans"]] == ["yara", "clam"]
    assert len(infected["threats"]) == 2  # YARA's rule name and clamd's signature, united
    failed = _sidecar(layout.failed, "locked.zip")
    assert failed["reason"] == "encrypted"
    assert [(s["engine"], s["verdict"]) for s in failed["scans"]] == [
        ("yara", "clean"), ("clam", "clean"), ("md", "failed")]
    assert sorted(_submitted(daemon, "ok.txt")) == sorted(ENGINES)


def test_an_engine_down_then_back_keeps_the_others_verdicts(
        layout: Layout, clamd: Clamd, emulator: MetadefenderEmulator, daemon_factory: Any) -> None:
    proxy = TcpProxy(int(emulator.url.rsplit(":", 1)[1]))
    proxy.start()
    daemon = daemon_factory(_config(layout, clamd, f"http://127.0.0.1:{proxy.port}"))
    daemon.wait_started()
    proxy.stop()
    (layout.inbox / "a.txt").write_bytes(b"waits for md")
    daemon.wait_for(lambda: daemon.named("engine.unhealthy"), what="md down")
    proxy.start()
    daemon.wait_for(lambda: daemon.named("file.moved"), timeout=30, what="a.txt moved")
    assert daemon.stop() == 0
    assert layout.placed("clean") == ["a.txt"]
    assert sorted(_submitted(daemon, "a.txt")) == sorted(ENGINES)  # yara and clam asked once
    assert len(emulator.submissions()) == 1


def test_kill_9_with_one_engine_answered_and_another_pending(
        layout: Layout, clamd: Clamd, emulator: MetadefenderEmulator, daemon_factory: Any) -> None:
    config = _config(layout, clamd, emulator.url)
    emulator.hold = True
    first = daemon_factory(config)
    first.wait_started()
    (layout.inbox / "a.txt").write_bytes(b"clean, md slow")
    first.wait_for(lambda: sorted(_submitted(first, "a.txt")) == sorted(ENGINES), what="submitted")
    first.proc.kill()
    first.proc.wait()
    emulator.hold = False
    second = daemon_factory(config)
    second.wait_for(lambda: second.named("file.moved"), timeout=30, what="a.txt moved")
    assert second.stop() == 0
    assert layout.placed("clean") == ["a.txt"]
    assert second.named("scan.submitted") == []  # yara and clam answered: never asked again
    assert len(emulator.submissions()) == 1  # md's scan followed, not submitted again
