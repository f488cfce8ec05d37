"""The webhook and metrics listeners under hostile clients: bounded threads, timeouts, clear errors."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import ROOT, Layout, wait_until

from daemon.config import Config
from daemon.engines import build_engines
from daemon.journal import Journal
from daemon.listener import HTTPListener, ListenerLimits
from daemon.metrics import Metrics
from daemon.webhooks import WebhookReceivers

SECRET = "cb-secret-0123456789"
# Short timeouts keep the tests quick; the defaults are the same code with larger numbers.
QUICK = ListenerLimits(workers=2, idle_timeout_s=1.0, header_timeout_s=2.0, body_timeout_s=2.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _connect(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]


def _is_cut_off(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (after a 408, or at once); False while it is open."""
    sock.settimeout(0.01)
    try:
        sock.recv(4096)  # a 408, or the end
        return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def _slowloris(port: int, count: int, served: Callable[[], object]) -> None:
    """`count` clients send a request head a byte every 0.2 s; meanwhile `served()` is answered,
    the threads stay bounded, and every slow client is cut off after the header timeout."""
    threads_before = threading.active_count()
    slow = _connect(port, count)
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 100
    started_at = time.monotonic()
    for i in range(len(head)):
        for sock in slow:
            with contextlib.suppress(OSError):  # already cut off
                sock.send(head[i:i + 1])
        if i == 2:
            served()  # a normal request gets through while the slow ones trickle
            assert threading.active_count() <= threads_before
        if all(_is_cut_off(sock) for sock in slow):
            break
        time.sleep(0.2)
    elapsed_s = time.monotonic() - started_at
    assert all(_is_cut_off(sock) for sock in slow)
    # Not cut off by the idle timeout (a byte every 0.2 s), but by the header timeout.
    assert QUICK.header_timeout_s - 0.5 <= elapsed_s < QUICK.header_timeout_s + 3
    assert threading.active_count() <= threads_before
    for sock in slow:
        sock.close()


@pytest.fixture
def receivers(tmp_path: Path) -> Iterator[tuple[int, WebhookReceivers]]:
    port = _free_port()
    (tmp_path / "inbox").mkdir()
    config = Config.model_validate({
        "state_dir": str(tmp_path / "state"),
        "engines": {"pp": {"type": "perception_point", "url": "http://127.0.0.1:9", "token": "t",
                           "callback": {"listen": f"127.0.0.1:{port}", "secret": SECRET}}},
        "watches": [{"name": "w", "source": str(tmp_path / "inbox"), "engine": "pp",
                     "clean": str(tmp_path / "clean"), "quarantine": str(tmp_path / "q"),
                     "failed": str(tmp_path / "failed")}]})
    journal = Journal(tmp_path / "journal.sqlite3")
    engines = build_engines(config)
    receivers = WebhookReceivers(engines, journal, threading.Event(), limits=QUICK)
    receivers.start()
    yield port, receivers
    receivers.stop()
    for engine in engines.values():
        engine.close()
    journal.close()


def test_slowloris_on_the_webhook_receiver_is_cut_off_without_a_thread_each(
        receivers: tuple[int, WebhookReceivers]) -> None:
    port, _ = receivers

    def served() -> None:
        response = httpx.post(f"http://127.0.0.1:{port}/webhooks/pp", json={"scan_id": 1},
                              headers={"X-Scanwatch-Callback-Secret": SECRET}, timeout=5)
        assert response.status_code == 204

    _slowloris(port, 30, served)


def test_slowloris_on_metrics_is_cut_off_without_a_thread_each(tmp_path: Path) -> None:
    port = _free_port()
    journal = Journal(tmp_path / "journal.sqlite3")
    listener = Metrics(journal).serve(f"127.0.0.1:{port}", lambda: [], QUICK)
    try:
        def served() -> None:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read()
            assert body == b'{"ready": true, "reasons": []}'

        _slowloris(port, 30, served)
    finally:
        listener.stop()
        journal.close()


def test_a_stalled_or_trickling_body_holds_no_worker_and_is_cut_off_by_its_deadline(
        receivers: tuple[int, WebhookReceivers]) -> None:
    port, _ = receivers
    stalled = _connect(port, 4 * QUICK.workers)  # more than every worker, waiting for bodies
    for sock in stalled:
        sock.sendall(b"POST /webhooks/pp HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    started_at = time.monotonic()
    response = httpx.post(f"http://127.0.0.1:{port}/webhooks/pp", json={}, timeout=5,
                          headers={"X-Scanwatch-Callback-Secret": "forged"})
    assert response.status_code == 401  # served at once: the bodies are read without a worker
    assert time.monotonic() - started_at < 1
    trickling = stalled[:2]
    while not all(_is_cut_off(sock) for sock in trickling):  # a byte well within the idle timeout
        for sock in trickling:
            with contextlib.suppress(OSError):
                sock.send(b"x")
        time.sleep(QUICK.idle_timeout_s / 4)
        assert time.monotonic() - started_at < QUICK.body_timeout_s + 2
    assert time.monotonic() - started_at >= QUICK.body_timeout_s - 0.5  # the body's deadline
    assert all(_is_cut_off(sock) for sock in stalled[2:])  # the silent ones, after the idle timeout
    for sock in stalled:
        sock.close()


def test_silent_connections_are_closed_after_the_idle_timeout(
        receivers: tuple[int, WebhookReceivers]) -> None:
    port, _ = receivers
    silent = _connect(port, 10)
    started_at = time.monotonic()
    wait_until(lambda: all(_is_cut_off(sock) for sock in silent), timeout_s=5, what="silent clients cut off")
    assert time.monotonic() - started_at >= QUICK.idle_timeout_s - 0.3
    for sock in silent:
        sock.close()


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_past_the_connection_limit_the_longest_waiting_makes_room() -> None:
    port = _free_port()
    limits = ListenerLimits(max_connections=5, idle_timeout_s=30)
    listener = HTTPListener("metrics.listen", f"127.0.0.1:{port}", _Ok, name="test", limits=limits)
    listener.start()
    try:
        held = _connect(port, 5)  # accepted in order, so these five fill the table
        answer = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert answer.status_code == 200
        held[0].settimeout(5)
        assert held[0].recv(100).startswith(b"HTTP/1.0 503 ")
        assert not any(_is_cut_off(sock) for sock in held[1:])
        for sock in held:
            sock.close()
    finally:
        listener.stop()


def test_the_listen_backlog_takes_a_burst_of_connections_before_any_accept() -> None:
    port = _free_port()
    listener = HTTPListener("metrics.listen", f"127.0.0.1:{port}", _Ok, name="test")
    try:
        # Not started: only the kernel's backlog holds them. With socketserver's default of 5,
        # the 7th connect waits for a SYN retransmit (1 s) and times out here.
        burst = [socket.create_connection(("127.0.0.1", port), timeout=0.5) for _ in range(50)]
        for sock in burst:
            sock.close()
    finally:
        listener.stop()


# -- the daemon -------------------------------------------------------------------------------

def _tasks(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def test_the_daemon_keeps_its_threads_bounded_under_400_idle_connections(layout: Layout,
                                                                         daemon_factory) -> None:
    metrics_port, webhook_port = _free_port(), _free_port()
    config = layout.config(
        engine={"type": "perception_point", "url": "http://127.0.0.1:9", "token": "t",
                "callback": {"listen": f"127.0.0.1:{webhook_port}", "secret": SECRET}},
        metrics={"listen": f"127.0.0.1:{metrics_port}"})
    layout.config_path.write_text(yaml.safe_dump(config))
    daemon = daemon_factory(layout.config_path)
    daemon.wait_started()
    tasks_before = _tasks(daemon.proc.pid)
    idle = _connect(metrics_port, 200) + _connect(webhook_port, 200)
    try:
        assert urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).status == 200
        answer = httpx.post(f"http://127.0.0.1:{webhook_port}/webhooks/default", json={"scan_id": 1},
                            headers={"X-Scanwatch-Callback-Secret": "forged"}, timeout=5)
        assert answer.status_code == 401
        assert _tasks(daemon.proc.pid) <= tasks_before + 2  # engine clients may start a thread
    finally:
        for sock in idle:
            sock.close()
    assert daemon.stop() == 0


@pytest.mark.parametrize("taken", ["metrics", "callback"])
def test_an_address_in_use_at_start_is_one_line_and_exit_2(layout: Layout, taken: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        other = _free_port()
        config = layout.config(
            engine={"type": "perception_point", "url": "http://127.0.0.1:9", "token": "t",
                    "callback": {"listen": f"127.0.0.1:{port if taken == 'callback' else other}",
                                 "secret": SECRET}},
            metrics={"listen": f"127.0.0.1:{port if taken == 'metrics' else other}"})
        layout.config_path.write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "daemon.cli", "run", "--config", str(layout.config_path)]
        done = subprocess.run(command, capture_output=True, cwd=ROOT, timeout=30)
    key = "metrics.listen" if taken == "metrics" else "engines.default.callback.listen"
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        f"scanwatch: {key}: cannot listen on 127.0.0.1:{port}: address already in use; "
        "choose another address or port, or stop the other process"]
