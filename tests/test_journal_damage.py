"""A damaged or unusable journal stops the daemon and the commands with one line; rebuild recovers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import EICAR, ROOT, Daemon, Layout
from test_sdnotify import Listener, listener  # noqa: F401  (a fixture)

from daemon.config import load_config
from daemon.errors import ScanwatchError
from daemon.journal import VERDICTS_FILE, Journal

JOURNAL = "journal.sqlite3"


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def _one_line(stderr: str | bytes) -> str:
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def _fill(state: Path, rows: int) -> Path:
    """A journal with `rows` finished rows (so that its pages reach well past the first)."""
    now = time.time()
    journal = Journal(state / JOURNAL)
    journal.restore({"watch": "inbox", "rel_path": f"old/{i:05d}.txt", "state": "done",
                     "verdict": "clean", "destination": f"/nowhere/{i:05d}.txt",
                     "raw_result": {"pad": "x" * 200}, "next_attempt_at": now,
                     "discovered_at": now, "done_at": now, "updated_at": now}
                    for i in range(rows))
    journal.close()
    return state / JOURNAL


def _process(layout: Layout, daemon_factory, files: dict[str, bytes]) -> None:
    daemon = daemon_factory(layout.config_path)
    daemon.wait_started()
    for name, data in files.items():
        (layout.inbox / name).write_bytes(data)
    daemon.wait_for(lambda: len(daemon.named("file.moved")) >= len(files), what="files moved")
    assert daemon.stop() == 0


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def test_truncated_journal_stops_run_status_and_check_with_one_line(layout: Layout,
                                                                    daemon_factory) -> None:
    config = layout.write_config()
    _truncate(_fill(layout.state, 3000))
    (layout.inbox / "waiting.txt").write_bytes(b"waits")
    daemon: Daemon = daemon_factory(config)
    assert daemon.proc.wait(30) == 1
    daemon.stop()
    line = _one_line(daemon.stderr)
    assert str(layout.state / JOURNAL) in line and "damaged" in line
    assert f"scanwatch journal rebuild --config {config}" in line
    assert not daemon.named("daemon.started")
    for command in (["status"], ["quarantine", "list"], ["journal", "check"]):
        result = _cli(config, *command)
        assert result.returncode == 1, (command, result)
        assert "journal rebuild" in _one_line(result.stderr + result.stdout), command
    assert (layout.inbox / "waiting.txt").exists()


def test_rebuild_restores_quarantine_and_lets_the_sources_be_scanned(layout: Layout,
                                                                     daemon_factory) -> None:
    config = layout.write_config()
    (layout.inbox / "sub").mkdir()
    _process(layout, daemon_factory, {"e.com": EICAR, "ok.txt": b"fine", "sub/f.txt": b"x"})
    before = json.loads(_cli(config, "quarantine", "list", "--json").stdout)
    _truncate(layout.state / JOURNAL)
    (layout.inbox / "new.txt").write_bytes(b"arrived while broken")
    (layout.inbox / "e2.com").write_bytes(EICAR)
    for _ in range(2):  # idempotent: a second rebuild gives the same history
        result = _cli(config, "journal", "rebuild")
        assert result.returncode == 0, result.stderr
        assert "inbox quarantine: 1 files" in result.stdout
        assert "inbox clean: 2 files" in result.stdout
        assert _cli(config, "journal", "check").returncode == 0
    aside = sorted(p.name for p in layout.state.iterdir() if ".damaged-" in p.name)
    assert len(aside) >= 2 and all(p.startswith(JOURNAL + ".damaged-") for p in aside)
    [row] = [json.loads(line) for line in _cli(config, "quarantine", "list", "--json").stdout.splitlines()]
    assert (row["rel_path"], row["threats"]) == ("e.com", ["EICAR_Test_File"])
    assert row["external_reference_id"] == before["external_reference_id"]
    shown = json.loads(_cli(config, "quarantine", "show", str(row["id"])).stdout)
    assert shown["sha256"] and shown["size"] == len(EICAR) and shown["engine"] == "default"
    assert shown["destination"] == str(layout.quarantine / "e.com")
    status = json.loads(_cli(config, "status", "--json").stdout)
    assert status["watches"]["inbox"]["outcomes"] == {"clean": 2, "infected": 1}
    daemon = daemon_factory(config)
    daemon.wait_for(lambda: len(daemon.named("file.moved")) >= 2, what="waiting files moved")
    refused = _cli(config, "journal", "rebuild")  # never under a running daemon
    assert refused.returncode == 1 and "stop it first" in _one_line(refused.stderr)
    assert daemon.stop() == 0
    assert layout.placed("clean") == ["new.txt", "ok.txt", "sub/f.txt"]
    assert layout.placed("quarantine") == ["e.com", "e2.com"]
    released = _cli(config, "quarantine", "release", str(row["id"]), "--reason", "test", "--force")
    assert released.returncode == 0, released.stderr
    assert (layout.clean / "e.com").exists()


@contextmanager
def _draining(notify: Listener) -> Iterator[None]:
    """Read the notify socket all along: a full datagram queue would block the daemon's sends."""
    done = threading.Event()

    def drain() -> None:
        while not done.is_set():
            notify.drain()

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    try:
        yield
    finally:
        done.set()
        drainer.join(5)


def _watchdog_after_stopping(messages: list[str]) -> bool:
    stopping = [m.startswith("STOPPING=1") for m in messages].index(True)
    return "WATCHDOG=1" in messages[stopping:]


def _chattr(path: Path, flag: str) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


@pytest.fixture
def immutable_state(layout: Layout) -> Iterator[Path]:
    """state_dir that even root cannot write in (the immutable attribute; root ignores modes)."""
    layout.state.mkdir()
    if not _chattr(layout.state, "+i"):
        pytest.skip("chattr +i is not available here (needs CAP_LINUX_IMMUTABLE and ext4/xfs)")
    try:
        yield layout.state
    finally:
        _chattr(layout.state, "-i")


def test_read_only_state_dir_stops_run_with_one_line(layout: Layout, immutable_state: Path,
                                                     daemon_factory) -> None:
    config = layout.write_config()
    daemon = daemon_factory(config)
    assert daemon.proc.wait(30) == 1
    daemon.stop()
    line = _one_line(daemon.stderr)
    assert f"state_dir {immutable_state} is not usable" in line and "writable" in line
    result = _cli(config, "status")
    assert result.returncode == 1 and "is not usable" in _one_line(result.stderr)


def test_corruption_while_running_stops_the_daemon(layout: Layout, daemon_factory,
                                                   listener: Listener) -> None:  # noqa: F811
    config = layout.write_config()
    path = _fill(layout.state, 3000)
    daemon = daemon_factory(config, env={"WATCHDOG_USEC": "2000000"})
    daemon.wait_started()
    listener.wait_for("WATCHDOG=1")
    page = 4096
    with _draining(listener):
        with open(path, "r+b") as f:  # every page but the first (the schema) becomes garbage
            f.seek(page)
            f.write(os.urandom(path.stat().st_size - page))
            f.flush()
            os.fsync(f.fileno())
        for i in range(5):
            (layout.inbox / f"n{i}.txt").write_bytes(b"new %d" % i)
        assert daemon.proc.wait(60) != 0
    daemon.stop()
    line = _one_line(daemon.stderr)
    assert "damaged" in line and "journal rebuild" in line, line
    assert daemon.named("daemon.failed")
    listener.drain()
    assert any(m.startswith("STOPPING=1\nSTATUS=failed: the journal") for m in listener.messages)
    assert not _watchdog_after_stopping(listener.messages)


def test_wal_removed_after_a_kill_refuses_to_start(layout: Layout, daemon_factory) -> None:
    config = layout.write_config()
    daemon = daemon_factory(config)
    daemon.wait_started()
    (layout.inbox / "e.com").write_bytes(EICAR)
    daemon.wait_for(lambda: daemon.named("file.moved"), what="file moved")
    daemon.proc.kill()
    daemon.proc.wait()
    wal = layout.state / f"{JOURNAL}-wal"
    assert wal.exists() and (layout.state / f"{JOURNAL}-shm").exists()
    wal.unlink()
    again = daemon_factory(config)
    assert again.proc.wait(30) == 1
    again.stop()
    line = _one_line(again.stderr)
    assert "-wal is missing" in line and f"journal rebuild --config {config}" in line
    assert _cli(config, "status").returncode == 1
    assert _cli(config, "journal", "rebuild").returncode == 0
    assert [json.loads(x)["rel_path"] for x in
            _cli(config, "quarantine", "list", "--json").stdout.splitlines()] == ["e.com"]


def test_a_thread_that_dies_stops_the_daemon_and_its_watchdog(layout: Layout,
                                                              listener: Listener) -> None:  # noqa: F811
    config_path = layout.write_config()
    from daemon.service import Service

    service = Service(str(config_path), load_config(str(config_path)))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    hook = threading.excepthook

    def die() -> None:
        listener.wait_for("WATCHDOG=1")
        raise RuntimeError("injected")

    # A daemon that went on regardless would run for ever: SIGTERM it after a deadline.
    deadline = threading.Timer(30, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        with _draining(listener):
            threading.Thread(target=die, name="watch-inbox", daemon=True).start()
            deadline.start()
            with pytest.raises(ScanwatchError, match="thread watch-inbox died: RuntimeError: injected"):
                service.run()
    finally:
        deadline.cancel()
        threading.excepthook = hook
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    listener.drain()
    assert any(m.startswith("STOPPING=1\nSTATUS=failed: thread watch-inbox died")
               for m in listener.messages)
    assert not _watchdog_after_stopping(listener.messages)


def test_a_damaged_verdicts_file_is_found_and_rebuild_starts_it_empty(layout: Layout,
                                                                     daemon_factory) -> None:
    config = layout.write_config()
    _process(layout, daemon_factory, {"e.com": EICAR, "ok.txt": b"fine"})
    verdicts = layout.state / VERDICTS_FILE
    with open(verdicts, "r+b") as f:  # its header: no longer an SQLite file
        f.write(b"\0" * 100)
    daemon: Daemon = daemon_factory(config)
    assert daemon.proc.wait(30) == 1
    daemon.stop()
    line = _one_line(daemon.stderr)
    assert str(verdicts) in line and "damaged" in line and "journal rebuild" in line
    check = _cli(config, "journal", "check")
    assert check.returncode == 1 and str(verdicts) in _one_line(check.stderr + check.stdout)
    result = _cli(config, "journal", "rebuild")
    assert result.returncode == 0, result.stderr
    aside = sorted(p.name for p in layout.state.iterdir() if ".damaged-" in p.name)
    assert any(p.startswith(VERDICTS_FILE + ".damaged-") for p in aside), aside
    assert _cli(config, "journal", "check").returncode == 0
    # A sound verdicts file stays as it is through a rebuild of the journal.
    _process(layout, daemon_factory, {"again.txt": b"fine"})
    assert _cli(config, "journal", "rebuild").returncode == 0
    assert not any(p.name.startswith(VERDICTS_FILE + ".damaged-") and p.name not in aside
                   for p in layout.state.iterdir())
    _process(layout, daemon_factory, {"copy.txt": b"fine"})  # the same bytes as again.txt
    status = json.loads(_cli(config, "status", "--json").stdout)
    assert status["engines"]["default"]["cache"]["hits"] == 1
