"""ClamAV's clamd over a unix socket or TCP: `FILDES` (the held descriptor), `INSTREAM` or `SCAN`.

`mode: auto` hands clamd the descriptor the pipeline opened and hashed (`FILDES`, the
fd passed with SCM_RIGHTS), so clamd judges exactly the hashed bytes: a rename or a
swapped symlink after the hash cannot change what it reads, and clamd needs no right
to the path (docs/systemd.md, "clamd"). Over TCP, or if clamd refuses `FILDES`, auto streams
the same descriptor's bytes (`INSTREAM`); only `mode: path` lets clamd open the name.

Connections stay open in `IDSESSION` mode and are pooled, so a scan costs one
round trip, not a connect. A session clamd closed (idle timeout, a restart) empties the
pool, whose other sessions are as old, and the command is sent again once on a new
connection; scanning is idempotent, so that retry is always safe. Each session carries
one command at a time: an `ERROR` (which ends the session) would drop every other command
in flight on it. A scan is sent (`send`) and its reply read later (`reply`), so that a
worker thread can have several in flight, each on a session of its own, and sleep once for
several replies instead of once per file (the pipeline's window, docs/engines.md,
"Concurrency"; what a wait costs: bench/RESULTS.md, "Issue 21"). A `FILDES` scan is one
`sendmsg` and one `recv`; a scan whose reply will not be read closes its session.

Unless `concurrency` is set, an engine scans as many files at once as clamd has scanning
threads (`MaxThreads`, from `STATS`): `follow_clamd_threads` (docs/engines.md).
"""

from __future__ import annotations

import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress

import structlog

from daemon.config import ClamavEngineConfig, Config
from daemon.engines.base import ScanHandle, ScanRequest, Signatures, refuse_too_large
from daemon.errors import EnginePermanentError, EngineRetryableError, EngineUnavailableError, ScanwatchError
from daemon.model import Pending, Reason, Verdict, VerdictKind

__all__ = ["ClamavEngine", "follow_clamd_threads"]

log = structlog.get_logger("scanwatch.engines.clamav")

_CHUNK = 256 * 1024
# clamd answers these when it cannot open the path itself (`mode: path`).
_ACCESS_ERRORS = ("Access denied", "Permission denied", "lstat() failed", "Can't open file")
# clamd's answers when it cannot take a descriptor: a clamd without FILDES (inside a
# session or not), or a socket that lost the fd on the way (a relay, TCP).
_FILDES_REFUSED = ("UNKNOWN COMMAND", "Command invalid inside IDSESSION", "No file descriptor received")
# How long a `VERSION` answer stands for clamd's database (docs/engines.md, "Verdict cache"):
# a reload of clamd's database is seen within this, a SIGHUP of scanwatch at once.
_VERSION_MAX_AGE_S = 60.0
# With `AlertExceedsMax yes`, clamd names what it did not read whole as a "threat":
# `Heuristics.Limits.Exceeded.MaxFileSize FOUND`. Not infected, and not clean either.
_LIMITS_EXCEEDED = "Heuristics.Limits.Exceeded."
# `STATS` names clamd's thread pool: `THREADS: live 1  idle 0 max 12 idle-timeout 30`.
_MAX_THREADS = re.compile(r"THREADS: .*\bmax (\d+)")
# How long start-up waits for clamd's `STATS` before it keeps the default `concurrency`.
_STATS_TIMEOUT_S = 5.0


class _Session:
    """One clamd connection in IDSESSION mode: `z`-commands, replies `<id>: ...\\0`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.is_open = True
        self._buffer = b""
        self.sock.sendall(b"zIDSESSION\0")

    def send(self, line: bytes, body: Iterator[bytes], fd: int | None = None) -> None:
        """Send one command (and INSTREAM chunks, or FILDES's fd); `receive` reads its reply."""
        message = b"z" + line + b"\0"
        if fd is None:
            self.sock.sendall(message)
        else:  # FILDES: the command and the byte that carries the fd in one message (_send_fd)
            _send_fd(self.sock, message, fd)
        try:
            for chunk in body:
                self.sock.sendall(struct.pack(">I", len(chunk)) + chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # clamd stops reading when it refuses a stream; its reply says why

    def receive(self) -> str:
        """The reply to the command sent, without its id."""
        while b"\0" not in self._buffer:
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionResetError("clamd closed the session")
            self._buffer += data
        reply, _, self._buffer = self._buffer.partition(b"\0")
        text = reply.decode("utf-8", "surrogateescape")
        self.is_open = not text.endswith(" ERROR")  # clamd ends a session after an error
        return text.partition(": ")[2] if text[:1].isdigit() else text

    def close(self) -> None:
        with suppress(OSError):
            self.sock.sendall(b"zEND\0")
        self.sock.close()


class _Exchange:
    """One command on a session of its own, sent at once; `reply` reads its answer.

    The session is the exchange's alone until its reply is read (then pooled) or it is
    cancelled (then closed), so it never carries another command's answer, and an `ERROR`
    (which ends a session) ends no other command. A session clamd had closed (idle
    timeout, a restart: seen at the send or at the reply) empties the pool, whose other
    sessions are as old, and the command is sent once more on a new connection; scanning
    is idempotent, so that is always safe.
    """

    def __init__(self, engine: ClamavEngine, line: bytes,
                 body: Callable[[], Iterator[bytes]] = lambda: iter(()), fd: int | None = None) -> None:
        self._engine = engine
        self._command = (line, body, fd)
        self._pooled = True
        self._session: _Session | None = self._send()

    def _send(self) -> _Session:
        line, body, fd = self._command
        session = None
        try:
            session = self._engine._take(self._pooled)
            session.send(line, body(), fd)
        except BaseException as exc:
            return self._again(session, exc)
        return session

    def reply(self) -> str:
        """The command's reply; raises `EngineRetryableError` (a timeout, sessions lost twice)."""
        session, self._session = self._session, None
        if session is None:
            raise RuntimeError("clamd: a reply read twice, or after cancel")
        try:
            text = session.receive()
        except BaseException as exc:
            self._session = self._again(session, exc)
            return self.reply()
        self._engine._pool(session)
        return text

    def cancel(self) -> None:
        """The reply will not be read: the session is closed, never pooled."""
        if self._session is not None:
            self._session.close()
            self._session = None

    def _again(self, session: _Session | None, exc: BaseException) -> _Session:
        """After `exc` on `session`: the command sent again on a new connection, or the error."""
        if session is not None:
            session.close()
        if isinstance(exc, ConnectionError) and self._pooled:
            self._engine.close()
            self._pooled = False
            return self._send()
        error = self._engine._error(exc)
        if error is exc:
            raise exc
        raise error from exc


class _Scan:
    """A scan sent (`ClamavEngine.send`), its reply not read yet."""

    def __init__(self, engine: ClamavEngine, request: ScanRequest, how: str, exchange: _Exchange) -> None:
        self._engine = engine
        self._request = request
        self._how = how
        self._exchange = exchange

    def reply(self) -> Verdict:
        """clamd's verdict (raises the engine errors `ClamavEngine.scan` raises)."""
        reply = self._exchange.reply()
        if self._how == "fd" and reply.endswith(" ERROR") and any(e in reply for e in _FILDES_REFUSED):
            self._engine._refused_fildes(reply)
            return self._engine.scan(self._request)  # streamed now
        return self._engine._verdict(reply, self._how)

    def cancel(self) -> None:
        self._exchange.cancel()


class ClamavEngine:
    """clamd, reached by `socket:` or `address:`, with `mode: auto | path | stream`."""

    remote = False
    reads_s3 = False

    def __init__(self, name: str, config: ClamavEngineConfig, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self._version: tuple[float, Signatures] | None = None  # (asked at, what clamd said)
        self._config = config
        self._where = str(config.socket) if config.socket else str(config.address)
        self._idle: list[_Session] = []
        self._lock = threading.Lock()
        self._can_pass_fd = config.socket is not None  # until clamd refuses a FILDES

    # -- connections ----------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        timeout_s = self._config.timeout
        try:
            if self._config.socket is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout_s)
                sock.connect(str(self._config.socket))
            else:
                host, _, port = str(self._config.address).rpartition(":")
                sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
        except OSError as exc:
            raise EngineUnavailableError(
                f"engine {self.name!r} cannot reach clamd at {self._where} ({exc.strerror or exc}); "
                f"check that clamd is running or set engines.{self.name}.socket/address") from exc
        _kernel_timeouts(sock, timeout_s)
        return sock

    def _take(self, pooled: bool) -> _Session:
        """A pooled session (`pooled`), else a new one."""
        with self._lock:
            session = self._idle.pop() if self._idle and pooled else None
        return session if session is not None else _Session(self._connect())

    def _pool(self, session: _Session) -> None:
        """A session whose reply was read: pooled while clamd keeps it open."""
        if not session.is_open:
            session.close()
            return
        with self._lock:
            self._idle.append(session)

    def _ask(self, line: bytes, body: Callable[[], Iterator[bytes]] = lambda: iter(()),
             fd: int | None = None) -> str:
        """One command through a pooled session, and its reply (`_Exchange`)."""
        return _Exchange(self, line, body, fd).reply()

    def _error(self, exc: BaseException) -> BaseException:
        """What a session's failure is to the pipeline: a timeout or a lost session is retryable."""
        if isinstance(exc, TimeoutError | BlockingIOError):
            return EngineRetryableError(f"clamd at {self._where} did not answer within "
                                        f"{self._config.timeout:g}s", reason=Reason.TIMEOUT)
        if isinstance(exc, ConnectionError):
            return EngineRetryableError(f"clamd at {self._where}: {exc}")
        return exc

    # -- Engine ------------------------------------------------------------------------------

    def scan(self, request: ScanRequest) -> Verdict:
        """The verdict on `request`'s bytes: `send`, then the reply read."""
        return self.send(request).reply()

    def send(self, request: ScanRequest) -> _Scan:
        """Send the scan on a session of its own, FILDES (auto on a unix socket), INSTREAM
        (auto over TCP or refused, stream) or SCAN (path); `reply()` reads its verdict.

        A file over `max_size` is not sent: clamd would answer OK for the part past its
        own limits (docs/engines.md#clamav-clamd).
        """
        refuse_too_large(self.name, self._config.max_size, request)
        if self._config.mode == "path":
            return _Scan(self, request, "path", _Exchange(self, b"SCAN " + os.fsencode(request.path)))
        if self._config.mode == "auto" and self._can_pass_fd:
            return _Scan(self, request, "fd", _Exchange(self, b"FILDES", fd=request.bytes_fd))
        return _Scan(self, request, "stream", _Exchange(self, b"INSTREAM", lambda: _chunks(request.bytes_fd)))

    def _refused_fildes(self, reply: str) -> None:
        """clamd cannot take descriptors: stream the held bytes from now on, never SCAN by name."""
        self._can_pass_fd = False
        log.warning("engine.fildes_refused", engine=self.name, clamd=self._where, reply=reply)

    def _verdict(self, reply: str, how: str) -> Verdict:
        raw: dict[str, object] = {"reply": reply, "mode": how}
        if reply.endswith(" OK"):
            return Verdict(VerdictKind.CLEAN, raw=raw)
        if reply.endswith(" FOUND"):
            threat = reply[: -len(" FOUND")].rpartition(": ")[2]
            if threat.startswith(_LIMITS_EXCEEDED):
                raise EnginePermanentError(f"clamd did not read the file whole: {reply}; raise clamd's "
                                           f"limits or lower engines.{self.name}.max_size",
                                           reason=Reason.TOO_LARGE)
            return Verdict(VerdictKind.INFECTED, threats=(threat,), raw=raw)
        if "size limit exceeded" in reply:
            raise EnginePermanentError(f"clamd: {reply}", reason=Reason.TOO_LARGE)
        if any(e in reply for e in _ACCESS_ERRORS):
            raise EnginePermanentError(f"clamd cannot read the file: {reply}", reason=Reason.UNREADABLE)
        raise EnginePermanentError(f"clamd: {reply}", reason=Reason.ENGINE_FAILED)

    def poll(self, scan: ScanHandle) -> Verdict | Pending:
        """clamd answers at once, so there is never a scan to poll."""
        raise EnginePermanentError("clamd has no submitted scans to poll")

    def signatures(self) -> Signatures:
        """clamd's `VERSION`: `ClamAV <version>/<database version>/<database date>`, asked again
        after `_VERSION_MAX_AGE_S`. Without an official (daily) database clamd names no database
        version: the verdicts are then unversioned."""
        now = self._clock()
        known = self._version
        if known is None or now - known[0] >= _VERSION_MAX_AGE_S:
            reply = self._ask(b"VERSION")
            known = (now, Signatures(f"clamav:{reply}", is_versioned="/" in reply))
            self._version = known
        return known[1]

    def probe(self) -> str:
        """PING must answer PONG; returns clamd's VERSION."""
        if (pong := self._ask(b"PING")) != "PONG":
            raise EngineUnavailableError(f"clamd at {self._where} answered {pong!r} to PING")
        return self._ask(b"VERSION")

    def max_threads(self) -> int:
        """clamd's `MaxThreads`: the `max` of the `THREADS:` line of its `STATS` reply."""
        reply = self._ask(b"STATS")
        if (found := _MAX_THREADS.search(reply)) is None:
            raise EnginePermanentError(f"clamd at {self._where} names no thread pool in STATS: {reply!r}")
        return int(found.group(1))

    def close(self) -> None:
        """Close pooled sessions."""
        with self._lock:
            sessions, self._idle = self._idle, []
        for session in sessions:
            session.close()


def _kernel_timeouts(sock: socket.socket, timeout_s: float) -> None:
    """Each send and receive of a connected session bounded by `timeout_s` in the kernel
    (`SO_SNDTIMEO`, `SO_RCVTIMEO`) instead of by Python, which polls the socket before every
    call on a socket with a timeout: two system calls fewer per scan. A call that times out
    raises `BlockingIOError`, which `_Session.command` reports as a `TimeoutError`."""
    seconds, micros = divmod(max(1, round(timeout_s * 1_000_000)), 1_000_000)  # 0 would be no limit
    timeval = struct.pack("ll", seconds, micros)
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _send_fd(sock: socket.socket, command: bytes, fd: int) -> None:
    """`command` (FILDES), then the one byte that carries `fd` as SCM_RIGHTS, in one `sendmsg`
    as clamd's own tests send them: clamd reads both with one wake-up, where a command sent
    alone and then its byte cost it two, and this process one system call more. The byte must
    follow the command in the same message: an fd that arrives with the command alone is
    refused (`PROTOCOL ERROR: ancillary data sent without FILDES`)."""
    message = command + b"\0"
    sent = sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
    if sent < len(message):  # the fd went with the first bytes
        sock.sendall(message[sent:])


def _chunks(fd: int) -> Iterator[bytes]:
    """The file's bytes for INSTREAM, read with pread (never the whole file in memory)."""
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        yield chunk
        offset += len(chunk)
    yield b""  # the zero-length chunk ends the stream


def follow_clamd_threads(config: Config) -> Config:
    """`config` with each clamav engine's unset `concurrency` at clamd's `MaxThreads`
    (at most 256), asked with `STATS`; an explicit `concurrency` stays. A clamd that does
    not answer within a few seconds keeps the default (docs/engines.md, "ClamAV clamd")."""
    engines = dict(config.engines)
    for name, cfg in config.engines.items():
        if not isinstance(cfg, ClamavEngineConfig) or "concurrency" in cfg.model_fields_set:
            continue
        engine = ClamavEngine(name, cfg.model_copy(update={"timeout": min(cfg.timeout, _STATS_TIMEOUT_S)}))
        try:
            threads = min(engine.max_threads(), 256)
        except ScanwatchError as exc:
            log.warning("engine.concurrency_default", engine=name, concurrency=cfg.concurrency,
                        error=str(exc))
            continue
        finally:
            engine.close()
        log.info("engine.concurrency", engine=name, concurrency=threads, source="clamd MaxThreads")
        engines[name] = cfg.model_copy(update={"concurrency": threads})
    return config.model_copy(update={"engines": engines})
