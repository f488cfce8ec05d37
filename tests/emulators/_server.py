"""What every vendor emulator shares: a threaded HTTP server on 127.0.0.1, a request log,
and fault injection (queued answers, connection resets, a down switch)."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass
class Logged:
    """One request as the emulator received it (never the file bytes)."""

    method: str
    path: str
    headers: dict[str, str]
    body_bytes: int
    fields: dict[str, str] = field(default_factory=dict)
    status: int = 0


@dataclass
class Fault:
    """An injected answer: a status with headers and JSON, a connection reset, or a delay."""

    status: int = 503
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    reset: bool = False  # close the connection without an answer
    after: bool = False  # ...after the request was handled (the answer is lost, the work done)
    delay_s: float = 0.0
    # Handle the request (the work is done), then hold its answer until this is set: a test
    # kills the client while the submission is in flight.
    hold: threading.Event | None = None


class _Discard:
    """A response stream that goes nowhere: the answer is lost on the way."""

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass


class Emulator:
    """Base of the emulators: `start()`/`stop()`, `url`, `log`, `inject()`.

    `port` 0 takes a free one; a given port lets a test start the server where an
    engine already failed to connect (down, then back).
    """

    def __init__(self, port: int = 0) -> None:
        self.log: list[Logged] = []
        self.faults: list[tuple[str, Fault]] = []
        self.rules: list[Callable[[int], Fault | None]] = []
        self._requests = 0
        self.lock = threading.RLock()
        self._timers: list[threading.Timer] = []
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                emulator._dispatch(self)

            do_GET = do_POST = do_PUT = do_DELETE = _handle  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def later(self, delay_s: float, action: Callable[..., None], *args: Any) -> None:
        """Run `action(*args)` after `delay_s` (a webhook, say); cancelled by `stop()`."""
        timer = threading.Timer(delay_s, action, args)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def inject(self, fault: Fault, *, count: int = 1, path_prefix: str = "") -> None:
        """Answer the next `count` requests whose path starts with `path_prefix` with `fault`."""
        with self.lock:
            self.faults.extend([(path_prefix, fault)] * count)

    def add_rule(self, rule: Callable[[int], Fault | None]) -> None:
        """Answer request number n (counted from 1 at start) with `rule(n)`, when that is a fault
        (queued faults of `inject` come first): a 503 every fifth request, a storm of 429s."""
        with self.lock:
            self.rules.append(rule)

    def _take_fault(self, path: str) -> Fault | None:
        with self.lock:
            self._requests += 1
            for i, (prefix, _) in enumerate(self.faults):
                if path.startswith(prefix):
                    return self.faults.pop(i)[1]
            return next((f for rule in self.rules if (f := rule(self._requests)) is not None), None)

    def _dispatch(self, handler: BaseHTTPRequestHandler) -> None:
        entry = Logged(handler.command, handler.path, {k.lower(): v for k, v in handler.headers.items()}, 0)
        with self.lock:
            self.log.append(entry)
        fault = self._take_fault(handler.path)
        if fault is not None and fault.after:
            handler.wfile = _Discard()  # type: ignore[assignment]
            self.handle(handler, entry)
            handler.connection.shutdown(socket.SHUT_RDWR)
            handler.close_connection = True
            return
        if fault is not None and fault.hold is not None:
            self._held(handler, entry, fault.hold)
            return
        if fault is not None:
            time.sleep(fault.delay_s)
            if fault.reset:
                handler.connection.shutdown(socket.SHUT_RDWR)
                handler.close_connection = True
                return
            if fault.status:
                self.drain(handler)
                self.reply(handler, entry, fault.status, fault.body, fault.headers)
                return
        self.handle(handler, entry)

    def _held(self, handler: BaseHTTPRequestHandler, entry: Logged, hold: threading.Event) -> None:
        real, answer = handler.wfile, io.BytesIO()
        handler.wfile = answer  # type: ignore[assignment]
        self.handle(handler, entry)
        hold.wait(60)
        handler.wfile = real
        try:
            real.write(answer.getvalue())
            real.flush()
        except OSError:  # the client is gone
            handler.close_connection = True

    def handle(self, handler: BaseHTTPRequestHandler, entry: Logged) -> None:
        raise NotImplementedError

    @staticmethod
    def drain(handler: BaseHTTPRequestHandler) -> bytes:
        length = int(handler.headers.get("Content-Length") or 0)
        return handler.rfile.read(length) if length else b""

    @staticmethod
    def reply(handler: BaseHTTPRequestHandler, entry: Logged, status: int, body: Any,
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        entry.status = status
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(data)


def post_json(url: str, body: bytes, headers: dict[str, str], timeout_s: float = 5.0) -> int:
    """POST a vendor's notification (webhook, callback); the status, or 0 when unreachable."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0
