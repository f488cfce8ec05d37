"""A real clamd from Debian's clamav-daemon, started for the test session on loopback."""

from __future__ import annotations

import os
import pwd
import selectors
import shutil
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

EICAR = (Path(__file__).resolve().parent.parent / "samples" / "eicar.com").read_bytes()

STREAM_MAX_BYTES = 1_000_000


@dataclass(frozen=True)
class Clamd:
    """Where the test clamd listens, and what it calls the EICAR file."""

    socket: Path
    address: str
    signature: str
    conf: Path
    user: str | None
    pid: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(str(path))
            s.sendall(b"zPING\0")
            return s.recv(16).startswith(b"PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def clamd() -> Iterator[Clamd]:
    try:
        with running_clamd() as server:
            yield server
    except ClamdError as exc:
        pytest.fail(str(exc))


class ClamdError(Exception):
    """clamd is missing or did not start."""


@contextmanager
def running_clamd(max_threads: int = 4, populate: Callable[[Path], None] | None = None,
                  start_timeout_s: float = 60, options: dict[str, str] | None = None) -> Iterator[Clamd]:
    """Start clamd with its own config and a one-signature database; stop it after.

    `populate`, if given, writes more signature files into the database directory first;
    `options` are clamd.conf settings over ours (`{"MaxFileSize": "1M"}`).
    """
    binary = shutil.which("clamd") or "/usr/sbin/clamd"
    if not os.path.exists(binary) or not shutil.which("sigtool"):
        raise ClamdError("clamd and sigtool are not installed: run scripts/install-test-deps.sh")
    base = Path(tempfile.mkdtemp(prefix="scanwatch-clamd-"))
    base.chmod(0o755)
    db = base / "db"
    db.mkdir()
    (base / "eicar.com").write_bytes(EICAR)
    signature = subprocess.run(["sigtool", "--md5", str(base / "eicar.com")], capture_output=True,
                               text=True, check=True).stdout.strip()
    name = "Scanwatch-Test-EICAR"
    (db / "scanwatch.hdb").write_text(":".join([*signature.split(":")[:2], name]) + "\n")
    if populate is not None:
        populate(db)
    # As root, clamd runs as clamav: it then cannot read files private to root, like a real host.
    user = "clamav" if os.geteuid() == 0 and _has_user("clamav") else None
    port = free_port()
    conf = base / "clamd.conf"
    settings = {
        "Foreground": "yes", "LocalSocket": str(base / "clamd.sock"), "LocalSocketMode": "666",
        "TCPAddr": "127.0.0.1", "TCPSocket": str(port), "DatabaseDirectory": str(db),
        "StreamMaxLength": str(STREAM_MAX_BYTES), "MaxThreads": str(max_threads), "IdleTimeout": "30",
        "LogFile": str(base / "clamd.log"), "PidFile": str(base / "clamd.pid"),
        **({"User": user} if user else {}), **(options or {})}
    conf.write_text("".join(f"{key} {value}\n" for key, value in settings.items()))
    if user:
        shutil.chown(base, user)
    proc = subprocess.Popen([binary, "--config-file", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + start_timeout_s
    while not _ping(base / "clamd.sock"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log = (base / "clamd.log").read_text() if (base / "clamd.log").exists() else ""
            stderr = proc.stderr.read().decode() if proc.stderr else ""
            raise ClamdError(f"clamd did not start: {stderr} {log}")
        time.sleep(0.1)
    try:
        # clamd marks signatures from unsigned databases as such.
        yield Clamd(base / "clamd.sock", f"127.0.0.1:{port}", f"{name}.UNOFFICIAL", conf, user,
                    proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(base, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class _Relay(socketserver.BaseRequestHandler):
    """Copies bytes between a unix client and clamd's TCP port: passed fds are dropped on the way."""

    server: _RelayServer

    def handle(self) -> None:
        upstream = socket.create_connection(self.server.target)
        with upstream, selectors.DefaultSelector() as sel, suppress(OSError):
            sel.register(self.request, selectors.EVENT_READ, upstream)
            sel.register(upstream, selectors.EVENT_READ, self.request)
            while True:
                for key, _ in sel.select():
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    if key.fileobj is self.request:
                        self.server.received.append(data)
                    key.data.sendall(data)


class _RelayServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, target: tuple[str, int]) -> None:
        self.target = target
        self.received: list[bytes] = []
        super().__init__(str(path), _Relay)


@contextmanager
def unix_relay(path: Path, address: str) -> Iterator[list[bytes]]:
    """A unix socket at `path` in front of clamd's TCP `address`, as an old clamd that cannot
    take descriptors; yields what clients sent through it."""
    host, _, port = address.rpartition(":")
    server = _RelayServer(path, (host, int(port)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.received
    finally:
        server.shutdown()
        server.server_close()
