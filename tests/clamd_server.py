"""A real clamd from Debian's clamav-daemon, started for the test session on loopback."""

from __future__ import annotations

import array
import os
import pwd
import selectors
import shutil
import socket
import socketserver
import struct
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
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
    with _serving(server):
        yield server.received


@contextmanager
def _serving(server: socketserver.BaseServer) -> Iterator[None]:
    """`server` served from a thread of its own until the block ends."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


# A file whose bytes start with one of these is not scanned by the `counting_relay`'s clamd:
# its command is never answered (the client's `timeout`), or answered with an error.
SILENT = b"RELAY-SILENT"
FAILING = b"RELAY-FAILING"
_COMMANDS = (b"zFILDES", b"zINSTREAM", b"zSCAN ", b"zPING", b"zVERSION", b"zSTATS")


@dataclass
class Traffic:
    """What a `counting_relay` saw: commands at clamd not answered yet, the most at once,
    overall and from each client process (its pid)."""

    now: int = 0
    peak: int = 0
    peak_by_pid: dict[int, int] = field(default_factory=dict)
    scans: int = 0
    _by_pid: Counter[int] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sent(self, pid: int, data: bytes) -> None:
        count = sum(data.count(command) for command in _COMMANDS)
        with self._lock:
            self.scans += data.count(b"zFILDES")
            self.now += count
            self._by_pid[pid] += count
            self.peak = max(self.peak, self.now)
            self.peak_by_pid[pid] = max(self.peak_by_pid.get(pid, 0), self._by_pid[pid])

    def answered(self, pid: int, data: bytes) -> None:
        with self._lock:
            self.now -= data.count(b"\0")
            self._by_pid[pid] -= data.count(b"\0")


class _CountingRelay(socketserver.BaseRequestHandler):
    """Passes a client's commands, with the descriptors they carry, to clamd's unix socket,
    and clamd's replies back; counts them (`Traffic`); fails the files marked so."""

    server: _CountingRelayServer

    def handle(self) -> None:
        pid = struct.unpack("3i", self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))[0]
        upstream = socket.socket(socket.AF_UNIX)
        upstream.connect(str(self.server.target))
        with upstream, selectors.DefaultSelector() as sel, suppress(OSError):
            sel.register(self.request, selectors.EVENT_READ)
            sel.register(upstream, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj is upstream:
                        data = upstream.recv(65536)
                        if not data:
                            return
                        self.server.traffic.answered(pid, data)
                        self.request.sendall(data)
                    elif not self._relay(pid, upstream):
                        return

    def _relay(self, pid: int, upstream: socket.socket) -> bool:
        data, ancillary, _, _ = self.request.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
        if not data:
            return False
        fds = array.array("i")
        for level, kind, payload in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        try:
            head = os.pread(fds[0], 16, 0) if fds else b""
            if head.startswith((FAILING, SILENT)):  # clamd gets the rest (a session's IDSESSION)
                if rest := data.replace(b"zFILDES\0\0", b""):
                    upstream.sendall(rest)
                if head.startswith(FAILING):
                    self.request.sendall(b"1: relay: Can't allocate memory ERROR\0")
            else:
                self.server.traffic.sent(pid, data)
                upstream.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)] if fds else [])
        finally:
            for fd in fds:
                os.close(fd)
        return True


class _CountingRelayServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, target: Path) -> None:
        self.target = target
        self.traffic = Traffic()
        super().__init__(str(path), _CountingRelay)


@contextmanager
def counting_relay(path: Path, clamd_socket: Path) -> Iterator[Traffic]:
    """A unix socket at `path` in front of clamd's, passing descriptors (FILDES) on: yields
    what it counts of the commands clamd has at once (`Traffic`)."""
    server = _CountingRelayServer(path, clamd_socket)
    path.chmod(0o666)
    with _serving(server):
        yield server.traffic
