"""Shared fixtures: real filesystems, the daemon as a real subprocess, real servers on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from daemon.config import Config
from daemon.engines import Engine
from daemon.journal import FileRow, Journal, owner_token
from daemon.model import FileState
from daemon.pipeline import Pipeline
from daemon.retry import RetryPolicy
from daemon.watchers.local import LocalWatcher

# s3_server/s3_bucket (SeaweedFS), sqs_server/sqs_queue (moto), clamd_server/clamdscan_args.
pytest_plugins = ["realservers"]

ROOT = Path(__file__).resolve().parent.parent
EICAR = (ROOT / "samples" / "eicar.com").read_bytes()


def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0, what: str = "") -> Any:
    """Poll `predicate` until it returns something true (returned), or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what or predicate}")


class Layout:
    """A watch's folders under tmp_path and a config that points at them."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.inbox = base / "inbox"
        self.clean = base / "clean"
        self.quarantine = base / "quarantine"
        self.failed = base / "failed"
        self.state = base / "state"
        self.config_path = base / "scanwatch.yaml"
        self.inbox.mkdir(parents=True, exist_ok=True)

    def config(self, *, watch: dict[str, Any] | None = None, engine: dict[str, Any] | None = None,
               **top: Any) -> dict[str, Any]:
        return {
            "state_dir": str(self.state),
            "log": {"format": "json", "level": "debug"},
            "engines": {"default": {"type": "yara", **(engine or {})}},
            "watches": [{
                "name": "inbox", "source": str(self.inbox), "engine": "default",
                "clean": str(self.clean), "quarantine": str(self.quarantine),
                "failed": str(self.failed), "settle_seconds": 0.3, "rescan_interval": 2,
                **(watch or {}),
            }],
            "workers": 1,  # tests of N > 1 ask for it
            **top,
        }

    def write_config(self, **kw: Any) -> Path:
        self.config_path.write_text(yaml.safe_dump(self.config(**kw), allow_unicode=True))
        return self.config_path

    def placed(self, where: str) -> list[str]:
        """Relative paths of the files in clean/quarantine/failed (sidecars left out)."""
        root = getattr(self, where)
        if not root.exists():
            return []
        return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                      if p.is_file() and not p.name.endswith(".scanwatch.json"))


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A watch, its journal, a fake engine and a pipeline, driven step by step."""

    def __init__(self, layout: Layout, engine: Engine, *, engine_cfg: dict[str, object] | None = None,
                 clock: Clock | None = None, **watch: object) -> None:
        """`clock`: the one the engine's pacer already reads (an HTTP engine's), else a new one."""
        self.layout = layout
        self.config = Config.model_validate(layout.config(watch={"settle_seconds": 0, **watch},
                                                          engine=engine_cfg))
        self.journal = Journal(layout.state / "journal.sqlite3")
        self.engine = engine
        self.clock = clock or Clock()
        self.watcher = local_watcher(self.config.watches[0], self.journal, threading.Event(),
                                     clock=self.clock)
        self.pipeline = Pipeline(self.config, self.journal, {"default": engine},
                                 owner=owner_token(), clock=self.clock,
                                 policy=RetryPolicy(base_s=10, max_s=10))

    def drop(self, rel: str, data: bytes) -> Path:
        path = self.layout.inbox / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def step(self, advance_s: float = 0.0) -> None:
        self.clock.now += advance_s
        self.watcher.step()
        while self.pipeline.run_once(["inbox"]):
            pass

    def run(self, steps: int = 40) -> None:
        """Step until every file is done or held (the first step rescans: the harness has no inotify)."""
        self.step(advance_s=3)
        for _ in range(steps):
            if all(r.state in (FileState.DONE, FileState.HELD) for r in self.journal.rows()):
                return
            time.sleep(0.05)
            self.step(advance_s=1)

    def row(self, rel: str = "a.txt") -> FileRow:
        row = self.journal.latest(self.config.watches[0].name, rel)
        assert row is not None, rel
        return row

    def journal_writes(self, monkeypatch: pytest.MonkeyPatch) -> list[int]:
        """A counter (its one item) of the journal's write transactions from now on."""
        writes = [0]
        tx = self.journal._tx

        def counted_tx():  # type: ignore[no-untyped-def]
            writes[0] += 1
            return tx()

        monkeypatch.setattr(self.journal, "_tx", counted_tx)
        return writes


_WATCHERS: list[LocalWatcher] = []


def local_watcher(*args: Any, **kwargs: Any) -> LocalWatcher:
    """A LocalWatcher stepped by the test, stopped after it: one armed holds an inotify
    instance, of the 128 a user may have, which the daemons of later tests need too."""
    watcher = LocalWatcher(*args, **kwargs)
    _WATCHERS.append(watcher)
    return watcher


@pytest.fixture(autouse=True)
def _stop_watchers() -> Iterator[None]:
    yield
    while _WATCHERS:
        _WATCHERS.pop().stop()


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """Undo `configure_logging` by in-process CLI calls, whose level filter would hide
    debug events from a later test's `capture_logs`."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path)


class Daemon:
    """`scanwatch run` as a real subprocess; its JSON log lines are collected as dicts."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None,
                 wrapper: tuple[str, ...] = ()) -> None:
        self.config_path = config_path
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "daemon.cli", "run", "--config", str(config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
            env={**os.environ, **(env or {})})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "raw", "line": line.decode(errors="replace")}
            with self._lock:
                self.events.append(event)

    def named(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("event") == name]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if result := predicate():
                return result
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what or predicate}; daemon rc="
                             f"{self.proc.poll()} last events: {self.events[-5:]}")

    def leaked(self, secret: str) -> bool:
        """Whether `secret` is in anything the stopped daemon wrote: its events or stderr."""
        return secret in repr(self.events) or secret.encode() in self.stderr

    def wait_started(self) -> None:
        self.wait_for(lambda: self.named("daemon.started"), what="daemon.started")

    def peak_rss_kb(self) -> int:
        """The daemon's peak resident memory so far (VmHWM)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        self._reader.join(5)
        return rc


def kill_9_between_submit_and_verdict(layout: Layout, start: Callable[..., Daemon], config: Path,
                                      env: dict[str, str], before_restart: Callable[[], None] = lambda: None
                                      ) -> None:
    """Five clean files and EICAR submitted to a remote engine, kill -9, restart: all placed once.

    The caller asserts from its emulator's log that nothing was submitted twice.
    """
    first = start(config, env)
    first.wait_started()
    for i in range(5):
        (layout.inbox / f"f{i}.txt").write_bytes(b"file %d" % i)
    (layout.inbox / "e.com").write_bytes(EICAR)
    first.wait_for(lambda: len(first.named("scan.submitted")) >= 6, what="six submissions")
    first.proc.kill()
    first.proc.wait()
    before_restart()
    second = start(config, env)
    second.wait_for(lambda: len(second.named("file.moved")) >= 6, timeout=30, what="six files moved")
    assert second.stop() == 0
    assert len(layout.placed("clean")) == 5 and layout.placed("quarantine") == ["e.com"]
    assert second.named("scan.submitted") == []  # resumed by polling, not by submitting again


def kill_9_inside_submission(layout: Layout, start: Callable[..., Daemon], config: Path,
                             env: dict[str, str], emulator: Any, submit_prefix: str) -> str:
    """kill -9 while the engine holds the answer to an accepted submission, restart: the
    file is placed once. Returns the second daemon's /metrics; the caller counts submissions.
    """
    from clamd_server import free_port
    from emulators._server import Fault

    port = free_port()
    text = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**text, "metrics": {"listen": f"127.0.0.1:{port}"}}))
    held = threading.Event()
    first = start(config, env)
    first.wait_started()  # probed: the next request under `submit_prefix` is the submission
    emulator.inject(Fault(hold=held), path_prefix=submit_prefix)
    (layout.inbox / "a.txt").write_bytes(b"submitted, answer in flight")
    first.wait_for(lambda: len(emulator.submissions()) == 1, what="the submission")
    first.proc.kill()  # the engine took the file; its answer never reached the journal
    first.proc.wait()
    held.set()
    assert not first.named("scan.submitted")
    second = start(config, env)
    second.wait_for(lambda: second.named("file.moved"), timeout=30, what="the file moved")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert second.stop() == 0
    assert layout.placed("clean") == ["a.txt"]
    return body


def write_random(path: Path, megabytes: int) -> None:
    """`megabytes` MB of random bytes, written one MB at a time."""
    with open(path, "wb") as f:
        for _ in range(megabytes):
            f.write(os.urandom(1_000_000))


def big_upload_peak_rss_kb(layout: Layout, daemon: Daemon) -> int:
    """Drop 100 MB into a started daemon's inbox, stop once it is in clean: the peak RSS in kB."""
    write_random(layout.inbox / "big.bin", 100)
    daemon.wait_for(lambda: daemon.named("file.moved"), timeout=60, what="big file moved")
    peak_kb = daemon.peak_rss_kb()
    assert daemon.stop() == 0
    assert layout.placed("clean") == ["big.bin"]
    return peak_kb


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(config_path: Path, env: dict[str, str] | None = None,
              wrapper: tuple[str, ...] = ()) -> Daemon:
        daemon = Daemon(config_path, env, wrapper)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


from clamd_server import clamd  # noqa: E402,F401  (a session fixture: a real clamd)
