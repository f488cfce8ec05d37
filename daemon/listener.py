"""Bounded HTTP listeners for the webhook receiver and /metrics (docs/operations.md).

One selector thread accepts connections and collects each request, head and body, without
a thread of its own; only a complete request goes to one of a few worker threads, which
never wait for a client. So a client that connects and says nothing, sends its headers a
byte at a time (slowloris) or stalls inside its body, costs a socket, not a thread, and is
cut off after `idle_timeout_s` of silence, a head not complete `header_timeout_s` after
the connection, or a body not complete `body_timeout_s` after its head: a total deadline
from the request's first byte. Past `max_connections` the longest-waiting connection is
answered 503 and closed to make room, as is a request that finds every worker busy and the
queue full.
Every response closes its connection (HTTP/1.0, no keep-alive), so nothing idles in a
worker either.
"""

from __future__ import annotations

import contextlib
import queue
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

import structlog

from daemon.errors import ListenError

__all__ = ["HTTPListener", "ListenerLimits"]

log = structlog.get_logger("scanwatch.listener")

_TICK_S = 0.1  # how often silent and slow connections are looked at (and `stop()` noticed)
_RECV_BYTES = 4096
_ACCEPT_PAUSE_S = 1.0
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_CONTENT_LENGTH = re.compile(rb"^content-length:[ \t]*([0-9]{1,16})[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
_TRANSFER_ENCODING = re.compile(rb"^transfer-encoding:", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class ListenerLimits:
    """How much one listener lets its clients hold."""

    workers: int = 4
    max_connections: int = 256
    queue_size: int = 64
    backlog: int = 128
    idle_timeout_s: float = 5.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 1 << 20  # a longer body goes to the handler at once, to be refused


@dataclass
class _Pending:
    """A connection whose request head is still arriving."""

    sock: socket.socket
    address: tuple[str, int]
    accepted_at: float
    last_at: float
    head: bytearray = field(default_factory=bytearray)  # the request as received so far
    deadline: float = 0.0  # the head's, then the body's: the request is cut off past it
    needed: int | None = None  # the request's whole length, once its head is in


class _Reader:
    """`rfile` for a handler: the bytes read with the head, then the socket, by a deadline."""

    def __init__(self, buffered: bytes, sock: socket.socket, deadline: float, write_timeout_s: float) -> None:
        self._buf = bytearray(buffered)
        self._sock = sock
        self._deadline = deadline
        self._write_timeout_s = write_timeout_s

    def _fill(self) -> bool:
        """Read more from the socket; False at its end. Raises TimeoutError past the deadline."""
        remaining_s = self._deadline - time.monotonic()
        if remaining_s <= 0:
            raise TimeoutError("request body too slow")
        self._sock.settimeout(remaining_s)
        try:
            chunk = self._sock.recv(_RECV_BYTES)
        finally:
            self._sock.settimeout(self._write_timeout_s)
        self._buf += chunk
        return bool(chunk)

    def readline(self, limit: int = -1) -> bytes:
        while True:
            end = self._buf.find(b"\n") + 1
            if end == 0 and 0 <= limit <= len(self._buf):
                end = limit
            if end or not self._fill():
                end = end or len(self._buf)
                if 0 <= limit < end:
                    end = limit
                line = bytes(self._buf[:end])
                del self._buf[:end]
                return line

    def read(self, size: int = -1) -> bytes:
        while (size < 0 or len(self._buf) < size) and self._fill():
            pass
        end = len(self._buf) if size < 0 else min(size, len(self._buf))
        data = bytes(self._buf[:end])
        del self._buf[:end]
        return data

    def close(self) -> None:
        """Nothing to release: the listener closes the socket."""


@dataclass(frozen=True)
class _Request:
    sock: socket.socket
    address: tuple[str, int]
    reader: _Reader


class _OneRequest(BaseHTTPRequestHandler):
    """Serves exactly one request from a `_Request` whose head is already read."""

    request: _Request
    raw_requestline: bytes
    default_request_version = "HTTP/1.0"  # so that even a garbled request line gets a status line

    def setup(self) -> None:
        self.connection = self.request.sock
        self.rfile = self.request.reader  # type: ignore[assignment]
        self.wfile = self.request.sock.makefile("wb")

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def parse_request(self) -> bool:
        if not self.raw_requestline.strip():  # the base class would close without an answer
            self.command, self.requestline, self.request_version = "", "", "HTTP/1.0"
            self.send_error(400, "Empty request line")
            return False
        return super().parse_request()

    def finish(self) -> None:
        with contextlib.suppress(OSError):  # the client left; nothing to tell it
            self.wfile.flush()
        self.wfile.close()


def _answer_and_close(sock: socket.socket, status: int, phrase: str) -> None:
    """Best effort, never blocking: a short answer, then the connection closed."""
    try:
        sock.setblocking(False)
        sock.send(f"HTTP/1.0 {status} {phrase}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
    except OSError:
        pass
    sock.close()


def _close(sock: socket.socket) -> None:
    """Close after our answer has gone out (not a reset that could overtake it)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    sock.close()


class HTTPListener:
    """An HTTP server with a bounded number of threads; `start()` serves, `stop()` closes.

    The constructor binds, so an address in use raises `ListenError` (naming `key`) before
    any thread starts. `handler` serves one request per connection and must not log
    (override `log_message`).
    """

    def __init__(self, key: str, listen: str, handler: type[BaseHTTPRequestHandler], *, name: str,
                 limits: ListenerLimits = ListenerLimits()) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        try:
            self._sock = socket.create_server(
                (host, int(port)), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                backlog=limits.backlog)
        except OSError as exc:
            raise ListenError(key, listen, exc) from exc
        self._sock.setblocking(False)
        self.port: int = self._sock.getsockname()[1]
        self._handler = type(handler.__name__, (_OneRequest, handler), {})
        self._name = name
        self._limits = limits
        self._ready: queue.Queue[_Request | None] = queue.Queue(limits.queue_size)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept_paused_until = 0.0

    def start(self) -> None:
        """Start the selector thread and the workers."""
        self._spawn(self._select, self._name)
        for i in range(self._limits.workers):
            self._spawn(self._work, f"{self._name}-worker-{i}")

    def stop(self) -> None:
        """Close the listening socket and every connection; waits for requests being served."""
        self._stopping.set()
        if self._threads:
            self._threads[0].join()  # the selector: it hands over nothing more
        while True:
            try:
                request = self._ready.get_nowait()
            except queue.Empty:
                break
            if request is not None:
                request.sock.close()
        for _ in range(self._limits.workers):
            self._ready.put(None)
        for thread in self._threads[1:]:
            thread.join(self._limits.body_timeout_s)
        self._threads.clear()
        self._sock.close()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _select(self) -> None:
        pending: dict[socket.socket, _Pending] = {}
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            while not self._stopping.is_set():
                if self._accept_paused_until and time.monotonic() >= self._accept_paused_until:
                    self._accept_paused_until = 0.0
                    selector.register(self._sock, selectors.EVENT_READ)
                for key, _ in selector.select(_TICK_S):
                    if key.fileobj is self._sock:
                        self._accept(selector, pending)
                    else:
                        self._receive(selector, pending, key.data)
                self._expire(selector, pending)
        for conn in pending.values():
            conn.sock.close()
        self._sock.close()

    def _accept(self, selector: selectors.BaseSelector, pending: dict[socket.socket, _Pending]) -> None:
        while True:
            try:
                sock, address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: free a descriptor, or wait a while
                if pending:
                    self._evict_oldest(selector, pending)
                    continue
                log.warning("listener.accept_failed", listener=self._name, error=str(exc),
                            paused_s=_ACCEPT_PAUSE_S)
                selector.unregister(self._sock)  # no busy loop; the clients wait in the backlog
                self._accept_paused_until = time.monotonic() + _ACCEPT_PAUSE_S
                return
            if len(pending) >= self._limits.max_connections:
                self._evict_oldest(selector, pending)
            sock.setblocking(False)
            now = time.monotonic()
            conn = _Pending(sock, address, now, now, deadline=now + self._limits.header_timeout_s)
            pending[sock] = conn
            selector.register(sock, selectors.EVENT_READ, conn)

    def _evict_oldest(self, selector: selectors.BaseSelector, pending: dict[socket.socket, _Pending]) -> None:
        """The connection that has waited longest makes room (503): a client that sends its
        request at once still gets in under a flood of silent connections."""
        oldest = next(iter(pending.values()))  # dicts keep the order of accepts
        self._drop(selector, pending, oldest)
        _answer_and_close(oldest.sock, 503, "Service Unavailable")

    def _receive(self, selector: selectors.BaseSelector, pending: dict[socket.socket, _Pending],
                 conn: _Pending) -> None:
        try:
            chunk = conn.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(selector, pending, conn)
            conn.sock.close()
            return
        conn.head += chunk
        conn.last_at = time.monotonic()
        if conn.needed is None and (end := _END_OF_HEAD.search(conn.head)) is not None:
            conn.needed = end.end() + self._body_length(bytes(conn.head[:end.end()]))
            conn.deadline = conn.last_at + self._limits.body_timeout_s
        if conn.needed is not None and len(conn.head) >= conn.needed:
            self._drop(selector, pending, conn)
            self._hand_over(conn)
        elif conn.needed is None and len(conn.head) > self._limits.max_header_bytes:
            self._drop(selector, pending, conn)
            _answer_and_close(conn.sock, 431, "Request Header Fields Too Large")

    def _body_length(self, head: bytes) -> int:
        """How many body bytes to wait for: one plain Content-Length up to `max_body_bytes`;
        0 for anything else (chunked, several lengths, too long), which the handler refuses."""
        lengths = set(_CONTENT_LENGTH.findall(head))
        if len(lengths) != 1 or _TRANSFER_ENCODING.search(head):
            return 0
        length = int(lengths.pop())
        return length if length <= self._limits.max_body_bytes else 0

    def _hand_over(self, conn: _Pending) -> None:
        conn.sock.setblocking(True)
        conn.sock.settimeout(self._limits.body_timeout_s)
        deadline = time.monotonic() + self._limits.body_timeout_s
        reader = _Reader(bytes(conn.head), conn.sock, deadline, self._limits.body_timeout_s)
        try:
            self._ready.put_nowait(_Request(conn.sock, conn.address, reader))
        except queue.Full:
            _answer_and_close(conn.sock, 503, "Service Unavailable")

    def _expire(self, selector: selectors.BaseSelector, pending: dict[socket.socket, _Pending]) -> None:
        now = time.monotonic()
        limits = self._limits
        for conn in list(pending.values()):
            if now > conn.deadline or now - conn.last_at > limits.idle_timeout_s:
                self._drop(selector, pending, conn)
                _answer_and_close(conn.sock, 408, "Request Timeout")

    @staticmethod
    def _drop(selector: selectors.BaseSelector, pending: dict[socket.socket, _Pending],
              conn: _Pending) -> None:
        selector.unregister(conn.sock)
        del pending[conn.sock]

    def _work(self) -> None:
        while (request := self._ready.get()) is not None:
            try:
                self._handler(request, request.address, self)
            except ConnectionError:
                pass  # the client left mid-request: nothing to answer, nothing to log
            except Exception:  # one bad request never takes a worker down
                log.exception("listener.request_failed", listener=self._name)
            finally:
                _close(request.sock)
