"""Webhook receivers: Blazelock's signed events and Perception Point's callbacks make polls due."""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import EICAR, Layout, wait_until
from emulators.blazelock import BlazelockEmulator, sign
from emulators.perception_point import PerceptionPointEmulator
from structlog.testing import capture_logs

from daemon import cli
from daemon.config import Config
from daemon.engines import Engine, build_engines
from daemon.engines._webhook import WebhookHealth
from daemon.journal import Journal
from daemon.model import FileState
from daemon.webhooks import WebhookReceivers

BLZ_SECRET = "whsec_blazelock-0123456789"
PP_SECRET = "cb-secret-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Receiving:
    """Receivers for a Blazelock (`blz`) and a Perception Point (`pp`) engine on one port."""

    url: str
    journal: Journal
    wake: threading.Event
    engines: dict[str, Engine]
    receivers: WebhookReceivers

    def waiting_row(self, rel: str, engine: str, scan_id: str) -> int:
        """A row submitted to `engine` as `scan_id`, next polled in an hour."""
        self.journal.discover("w", [(rel, 1)], time.time())
        row = self.journal.active("w", rel)
        assert row is not None
        self.journal.apply([(row.id, {"state": FileState.SCANNING, "engine": engine,
                                      "engine_scan_id": scan_id, "next_attempt_at": time.time() + 3600})])
        return row.id

    def is_due(self, file_id: int) -> bool:
        row = self.journal.get(file_id)
        return row is not None and row.next_attempt_at <= time.time()

    def blazelock(self, event: str, scan_id: str, *, secret: str = BLZ_SECRET, timestamp: int | None = None,
                  headers: dict[str, str] | None = None, ref: str = "w:a#1") -> httpx.Response:
        body = json.dumps({"event": event, "integration_id": "int_1", "occurred_at": "2026-11-22T10:00:00Z",
                           "data": {"id": scan_id, "status": "completed",
                                    "attributes": {"external_reference_id": ref}}}).encode()
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        signed = {"X-Blazelock-Webhook-Timestamp": stamp,
                  "X-Blazelock-Webhook-Signature": sign(secret, stamp, body)}
        return httpx.post(f"{self.url}/webhooks/blz", content=body,
                          headers=signed if headers is None else headers)

    def callback(self, scan_id: int, secret: str | None = PP_SECRET) -> httpx.Response:
        headers = {} if secret is None else {"X-Scanwatch-Callback-Secret": secret}
        body = {"scan_id": scan_id, "status": "done", "verdict": "CLN", "threats": [],
                "callback_params": {"engine": "pp"}}
        return httpx.post(f"{self.url}/webhooks/pp", json=body, headers=headers)


def _config(tmp_path: Path, port: int) -> Config:
    (tmp_path / "inbox").mkdir(exist_ok=True)
    return Config.model_validate({
        "state_dir": str(tmp_path / "state"),
        "engines": {
            "blz": {"type": "blazelock", "url": "http://127.0.0.1:9", "api_key": "k",
                    "webhook": {"listen": f"127.0.0.1:{port}", "secret": BLZ_SECRET}},
            "pp": {"type": "perception_point", "url": "http://127.0.0.1:9", "token": "t",
                   "callback": {"listen": f"127.0.0.1:{port}", "secret": PP_SECRET}}},
        "watches": [{"name": "w", "source": str(tmp_path / "inbox"), "engine": "blz",
                     "clean": str(tmp_path / "clean"), "quarantine": str(tmp_path / "q"),
                     "failed": str(tmp_path / "failed")}]})


@pytest.fixture
def receiving(tmp_path: Path) -> Iterator[Receiving]:
    port = _free_port()
    config = _config(tmp_path, port)
    journal = Journal(tmp_path / "journal.sqlite3")
    engines = build_engines(config)
    wake = threading.Event()
    receivers = WebhookReceivers(engines, journal, wake)
    receivers.start()
    yield Receiving(f"http://127.0.0.1:{port}", journal, wake, engines, receivers)
    receivers.stop()
    for engine in engines.values():
        engine.close()
    journal.close()


def _health(receiving: Receiving, engine: str) -> WebhookHealth:
    health = receiving.engines[engine].webhook_health
    assert isinstance(health, WebhookHealth)
    return health


# -- Blazelock signatures -------------------------------------------------------------------

def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    # Computed with: printf '%s' '1700000000.{...}' | openssl dgst -sha256 -hmac whsec_test
    assert sign("whsec_test", "1700000000", b'{"event":"file_scan.completed"}') == \
        "c32071280841a5a6c77dd706ebd943d8ca507389f2c4a1ec444e209d16844fa6"


def test_signed_completion_makes_the_waiting_scan_due_and_wakes_the_pipeline(receiving: Receiving) -> None:
    file_id = receiving.waiting_row("a.txt", "blz", "fs_000001")
    other = receiving.waiting_row("b.txt", "blz", "fs_000002")
    assert receiving.blazelock("file_scan.completed", "fs_000001").status_code == 204
    wait_until(lambda: receiving.is_due(file_id))
    assert receiving.wake.is_set()
    assert not receiving.is_due(other)
    assert receiving.journal.get(file_id).state is FileState.SCANNING  # the verdict comes from a poll


def test_a_scan_known_only_by_reference_is_found_by_its_reference(receiving: Receiving) -> None:
    file_id = receiving.waiting_row("a.txt", "blz", "ref:w:a.txt#abc")
    assert receiving.blazelock("file_scan.failed", "fs_000009", ref="w:a.txt#abc").status_code == 204
    wait_until(lambda: receiving.is_due(file_id))


@pytest.mark.parametrize(("tamper", "status", "reason"), [
    ("secret", 401, "bad_signature"),
    ("stale", 401, "stale_timestamp"),
    ("future", 401, "stale_timestamp"),
    ("no_signature", 401, "missing_headers"),
    ("no_timestamp", 401, "missing_headers"),
    ("bad_timestamp", 400, "bad_timestamp"),
])
def test_forged_stale_or_unsigned_events_are_refused(receiving: Receiving, tamper: str, status: int,
                                                     reason: str) -> None:
    refused = receiving.waiting_row("a.txt", "blz", "fs_000001")
    accepted = receiving.waiting_row("b.txt", "blz", "fs_000002")
    now = int(time.time())
    stamp = str(now)
    good = {"X-Blazelock-Webhook-Timestamp": stamp, "X-Blazelock-Webhook-Signature": "0" * 64}
    kwargs: dict[str, Any] = {
        "secret": {"secret": "not-the-secret"},
        "stale": {"timestamp": now - 301},
        "future": {"timestamp": math.ceil(time.time()) + 301},  # `now` rounds down a second
        "no_signature": {"headers": {"X-Blazelock-Webhook-Timestamp": stamp}},
        "no_timestamp": {"headers": {"X-Blazelock-Webhook-Signature": good["X-Blazelock-Webhook-Signature"]}},
        "bad_timestamp": {"headers": {**good, "X-Blazelock-Webhook-Timestamp": "yesterday"}},
    }[tamper]
    with capture_logs() as logs:
        assert receiving.blazelock("file_scan.completed", "fs_000001", **kwargs).status_code == status
        # Deliveries are journaled in order: once a later good one is, the refused one was not.
        assert receiving.blazelock("file_scan.completed", "fs_000002").status_code == 204
        wait_until(lambda: receiving.is_due(accepted))
    assert not receiving.is_due(refused)
    rejected = [e for e in logs if e["event"] == "webhook.rejected"]
    assert [(e["engine"], e["reason"], e["log_level"]) for e in rejected] == [("blz", reason, "warning")]
    assert BLZ_SECRET not in repr(logs)


def test_a_fresh_timestamp_within_five_minutes_is_accepted(receiving: Receiving) -> None:
    file_id = receiving.waiting_row("a.txt", "blz", "fs_000001")
    assert receiving.blazelock("file_scan.completed", "fs_000001",
                               timestamp=int(time.time()) - 280).status_code == 204
    wait_until(lambda: receiving.is_due(file_id))


def test_repeated_deliveries_are_no_ops(receiving: Receiving) -> None:
    file_id = receiving.waiting_row("a.txt", "blz", "fs_000001")
    with capture_logs() as logs:
        for _ in range(3):
            assert receiving.blazelock("file_scan.completed", "fs_000001").status_code == 204
        wait_until(lambda: len([e for e in logs if e["event"].startswith("webhook.")
                           and e["event"] != "webhook.received"]) == 3)
    row = receiving.journal.get(file_id)
    assert [e["event"] for e in logs if e["event"] in ("webhook.scan_due", "webhook.unmatched")] == [
        "webhook.scan_due", "webhook.unmatched", "webhook.unmatched"]
    assert row.next_attempt_at <= time.time() and row.state is FileState.SCANNING


def test_submitted_events_are_acknowledged_and_ignored(receiving: Receiving) -> None:
    file_id = receiving.waiting_row("a.txt", "blz", "fs_000001")
    with capture_logs() as logs:
        assert receiving.blazelock("file_scan.submitted", "fs_000001").status_code == 204
        assert receiving.blazelock("file_scan.completed", "fs_000002").status_code == 204  # unknown
        wait_until(lambda: any(e["event"] == "webhook.unmatched" for e in logs))
    assert not receiving.is_due(file_id)
    assert [e["engine_scan_ids"] for e in logs if e["event"] == "webhook.unmatched"] == [
        ["fs_000002", "ref:w:a#1"]]
    assert [e["log_level"] for e in logs if e["event"] == "webhook.unmatched"] == ["debug"]


def test_a_scan_announced_before_its_id_was_journaled_is_made_due_once_it_is(receiving: Receiving) -> None:
    assert _health(receiving, "blz").is_healthy  # the receiver has just started
    with capture_logs() as logs:
        receiving.blazelock("file_scan.completed", "fs_000007")
        wait_until(lambda: any(e["event"] == "webhook.unmatched" for e in logs))
        # The pipeline journals the scan id after the event came (a batch commits late).
        file_id = receiving.waiting_row("a.txt", "blz", "fs_000007")
        wait_until(lambda: receiving.is_due(file_id))
    assert [e["event"] for e in logs if e["event"].startswith("webhook.")] == [
        "webhook.received", "webhook.unmatched", "webhook.scan_due"]


# -- Perception Point callbacks --------------------------------------------------------------

def test_callback_with_the_secret_header_makes_the_scan_due(receiving: Receiving) -> None:
    file_id = receiving.waiting_row("a.txt", "pp", "123456")
    blz_row = receiving.waiting_row("b.txt", "blz", "123456")  # another engine's id space
    with capture_logs() as logs:
        assert receiving.callback(123456, secret="wrong").status_code == 401
        assert receiving.callback(123456, secret=None).status_code == 401
        assert not receiving.is_due(file_id)
        assert receiving.callback(123456).status_code == 204
        wait_until(lambda: receiving.is_due(file_id))
    assert not receiving.is_due(blz_row)
    assert [e["reason"] for e in logs if e["event"] == "webhook.rejected"] == [
        "bad_secret", "missing_headers"]
    assert PP_SECRET not in repr(logs)


@pytest.mark.parametrize(("method", "path", "body", "headers", "status"), [
    ("POST", "/webhooks/nobody", b"{}", {}, 404),
    ("GET", "/webhooks/pp", b"", {}, 405),
    ("POST", "/webhooks/pp", b"not json", {"X-Scanwatch-Callback-Secret": PP_SECRET}, 400),
    ("POST", "/webhooks/pp", b"[1]", {"X-Scanwatch-Callback-Secret": PP_SECRET}, 400),
])
def test_other_requests_are_refused(receiving: Receiving, method: str, path: str, body: bytes,
                                    headers: dict[str, str], status: int) -> None:
    response = httpx.request(method, receiving.url + path, content=body, headers=headers)
    assert response.status_code == status


def _raw(receiving: Receiving, request: bytes) -> bytes:
    """Send `request` as it is; the answer up to the server's close."""
    port = int(receiving.url.rpartition(":")[2])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    return answer


@pytest.mark.parametrize(("length", "status"), [(None, 411), (str((1 << 20) + 1), 413)])
def test_bodies_without_length_or_too_long_are_refused_unread(receiving: Receiving, length: str | None,
                                                              status: int) -> None:
    header = "" if length is None else f"Content-Length: {length}\r\n"
    answer = _raw(receiving, f"POST /webhooks/pp HTTP/1.1\r\nHost: x\r\n{header}\r\n".encode())
    assert answer.startswith(f"HTTP/1.0 {status} ".encode())


@pytest.mark.parametrize(("head", "status"), [
    ("Content-Length: \u00b2", 400),  # a digit to str.isdigit(), not to int()
    ("Content-Length: \u0663", 400),  # Arabic-Indic three: int() would take it
    ("Content-Length: -1", 400),
    ("Content-Length: +2", 400),
    ("Content-Length: 0x10", 400),
    ("Content-Length: 99999999999999999999999999", 400),
    ("Content-Length: 2\r\nContent-Length: 3", 400),
    ("Transfer-Encoding: chunked", 411),
    ("Transfer-Encoding: chunked\r\nContent-Length: 2", 400),
])
def test_malformed_lengths_are_refused_and_the_receiver_goes_on(receiving: Receiving, head: str,
                                                                status: int) -> None:
    request = f"POST /webhooks/pp HTTP/1.1\r\nHost: x\r\n{head}\r\n\r\n{{}}".encode()
    assert _raw(receiving, request).startswith(f"HTTP/1.0 {status} ".encode())
    assert receiving.callback(1, secret="wrong").status_code == 401  # still serving


@pytest.mark.parametrize("request_line", [b"GARBAGE", b"", b"POST /webhooks/pp HTTP/9", b"\xff\xfe \x00 x"])
def test_a_garbled_request_line_is_answered_400(receiving: Receiving, request_line: bytes) -> None:
    assert _raw(receiving, request_line + b"\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.0 400 ")
    assert receiving.callback(1, secret="wrong").status_code == 401


def test_a_flood_of_forged_deliveries_is_logged_once_with_a_count(receiving: Receiving) -> None:
    with capture_logs() as logs, httpx.Client() as client:
        for i in range(300):
            response = client.post(f"{receiving.url}/webhooks/pp", json={"scan_id": i},
                                   headers={"X-Scanwatch-Callback-Secret": "forged"})
            assert response.status_code == 401
        receiving.receivers.stop()  # logs what the interval (a minute) has not yet
    rejected = [e for e in logs if e["event"] == "webhook.rejected"]
    assert [(e["reason"], e["count"]) for e in rejected] == [("bad_secret", 1), ("bad_secret", 299)]
    assert {e["log_level"] for e in rejected} == {"warning"}


def test_refusal_counts_are_logged_each_interval_without_a_stop(tmp_path: Path) -> None:
    config = _config(tmp_path, _free_port())
    journal = Journal(tmp_path / "journal.sqlite3")
    receivers = WebhookReceivers(build_engines(config), journal, threading.Event(),
                                 log_rejections_every_s=0.2)
    receivers.start()
    try:
        url = f"http://127.0.0.1:{config.engines['pp'].callback.listen.rpartition(':')[2]}"
        with capture_logs() as logs:
            for _ in range(20):
                httpx.post(f"{url}/webhooks/pp", json={}, headers={"X-Scanwatch-Callback-Secret": "x"})
            wait_until(lambda: sum(e.get("count", 0) for e in logs if e["event"] == "webhook.rejected") == 20,
                       what="every refusal counted in a log line")
    finally:
        receivers.stop()
        journal.close()


# -- health and lifecycle ---------------------------------------------------------------------

def test_health_slows_polls_while_deliveries_arrive() -> None:
    now = [1000.0]
    health = WebhookHealth(clock=lambda: now[0])
    assert health.poll_after_s(2.0) == 2.0  # no receiver: the normal pace
    health.receiving()
    assert health.poll_after_s(2.0) == 20.0 and health.poll_after_s(30.0) == 60.0
    assert health.poll_after_s(120.0) == 120.0  # never faster than configured
    now[0] += 599
    assert health.is_healthy
    now[0] += 2
    assert not health.is_healthy and health.poll_after_s(2.0) == 2.0
    health.receiving()
    health.stopped()
    assert health.poll_after_s(2.0) == 2.0


def test_engines_take_webhooks_without_importing_the_receiver_or_the_journal() -> None:
    # Data flows one way: the vendors' wire formats live in the engines, which the receiver uses.
    code = "import sys, daemon.engines; print(sorted(m for m in sys.modules if m.startswith('daemon.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "daemon.engines.blazelock" in loaded and "daemon.engines.perception_point" in loaded
    assert "daemon.webhooks" not in loaded and "daemon.journal" not in loaded


def test_an_address_in_use_is_logged_and_left_to_polling(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = _config(tmp_path, taken.getsockname()[1])
        engines = build_engines(config)
        receivers = WebhookReceivers(engines, Journal(tmp_path / "j.sqlite3"), threading.Event())
        with capture_logs() as logs:
            receivers.start()
        receivers.stop()
    assert [(e["event"], e["engines"]) for e in logs] == [("webhook.listen_failed", ["blz", "pp"])]
    assert not engines["blz"].webhook_health.is_healthy


def test_check_config_probe_and_scan_start_no_receiver(layout: Layout, capsys) -> None:
    port = _free_port()
    with BlazelockEmulator() as emulator:
        config = layout.config(engine={"type": "blazelock", "url": emulator.url, "api_key": "test-key",
                                       "webhook": {"listen": f"127.0.0.1:{port}", "secret": BLZ_SECRET}})
        layout.config_path.write_text(yaml.safe_dump(config))
        (layout.base / "a.txt").write_bytes(b"a")
        assert cli.main(["check-config", "--probe", "--config", str(layout.config_path)]) == 0
        assert cli.main(["scan", "--config", str(layout.config_path), str(layout.base / "a.txt")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nobody holds the address
    assert not [t for t in threading.enumerate() if t.name.startswith("webhooks")]
    assert BLZ_SECRET not in capsys.readouterr().out


# -- the daemon -------------------------------------------------------------------------------

def _blazelock_daemon(layout: Layout, emulator: BlazelockEmulator, port: int, poll_interval: float,
                      workers: int = 1) -> Path:
    config = layout.config(engine={"type": "blazelock", "url": emulator.url, "api_key": "test-key",
                                   "poll_interval": poll_interval,
                                   "webhook": {"listen": f"127.0.0.1:{port}", "secret": "${WEBHOOK_SECRET}"}},
                           workers=workers)
    layout.config_path.write_text(yaml.safe_dump(config))
    return layout.config_path


def _polls_per_scan(emulator: BlazelockEmulator) -> dict[str, int]:
    counts = {scan_id: 0 for scan_id in emulator.scans}
    for entry in emulator.log:
        if entry.method == "GET" and entry.path.startswith("/file-scans/fs_"):
            counts[entry.path.removeprefix("/file-scans/")] += 1
    return counts


@pytest.mark.parametrize("workers", [1, 2])  # receivers in the daemon, polls in its workers
def test_webhooks_finish_files_long_before_the_slowed_polls(layout: Layout, daemon_factory,
                                                            workers: int) -> None:
    port = _free_port()
    # Scans take 1.5 s. Polls every 2 s would take one per scan, but at the slowed pace, one
    # every 20 s, a file would wait 20 s. The webhook asks for the one poll needed, at once
    # (or at its announcement's next try, 0.5 - 7.5 s later, if the scan id was not journaled
    # yet: a loaded machine).
    with BlazelockEmulator(scan_delay_s=1.5, webhook_url=f"http://127.0.0.1:{port}/webhooks/default",
                           webhook_secret=BLZ_SECRET) as emulator:
        emulator.webhook_repeats = 2
        daemon = daemon_factory(_blazelock_daemon(layout, emulator, port, poll_interval=2, workers=workers),
                                {"WEBHOOK_SECRET": BLZ_SECRET})
        daemon.wait_started()
        daemon.signal(signal.SIGHUP)  # a reload binds the address again
        daemon.wait_for(lambda: daemon.named("config.reloaded"), what="reloaded")
        for i in range(3):
            (layout.inbox / f"f{i}.txt").write_bytes(b"file %d" % i)
        (layout.inbox / "e.com").write_bytes(EICAR)
        daemon.wait_for(lambda: len(daemon.named("file.moved")) >= 4, timeout=30, what="four files moved")
        assert daemon.stop() == 0
        polls = _polls_per_scan(emulator)
        deliveries = list(emulator.deliveries)
    assert len(layout.placed("clean")) == 3 and layout.placed("quarantine") == ["e.com"]
    assert polls == {scan_id: 1 for scan_id in polls} and len(polls) == 4  # the poll a webhook asked for
    # Left to the slowed polls (one every 20 s) a file would take 21.5 s or more.
    assert max(e["duration_s"] for e in daemon.named("file.moved")) < 15
    assert {status for _, _, status in deliveries} == {204}
    assert len(daemon.named("webhook.scan_due")) == 4
    assert not daemon.leaked(BLZ_SECRET)


@pytest.mark.parametrize("workers", [1, 2])
def test_refused_webhooks_leave_the_files_to_polling(layout: Layout, daemon_factory, workers: int) -> None:
    port = _free_port()
    with BlazelockEmulator(scan_delay_s=0.5, webhook_url=f"http://127.0.0.1:{port}/webhooks/default",
                           webhook_secret=BLZ_SECRET) as emulator:
        emulator.webhook_bad_signature = True
        daemon = daemon_factory(_blazelock_daemon(layout, emulator, port, poll_interval=0.1, workers=workers),
                                {"WEBHOOK_SECRET": BLZ_SECRET})
        daemon.wait_started()
        (layout.inbox / "a.txt").write_bytes(b"a")
        (layout.inbox / "e.com").write_bytes(EICAR)
        daemon.wait_for(lambda: len(daemon.named("file.moved")) >= 2, timeout=30, what="two files moved")
        assert daemon.stop() == 0
        deliveries = list(emulator.deliveries)
    assert layout.placed("clean") == ["a.txt"] and layout.placed("quarantine") == ["e.com"]
    assert deliveries and {status for _, _, status in deliveries} == {401}
    assert {e["reason"] for e in daemon.named("webhook.rejected")} == {"bad_signature"}
    assert daemon.named("webhook.scan_due") == []


@pytest.mark.parametrize("workers", [1, 2])
def test_perception_point_callbacks_finish_files_long_before_the_slowed_polls(
        layout: Layout, daemon_factory, workers: int) -> None:
    port = _free_port()
    with PerceptionPointEmulator(polls_to_done=0, scan_delay_s=1.5) as emulator:  # as above
        emulator.callback_repeats = 2
        config = layout.config(engine={
            "type": "perception_point", "url": emulator.url, "token": "test-token", "poll_interval": 2,
            "callback": {"listen": f"127.0.0.1:{port}", "secret": "${CALLBACK_SECRET}"}}, workers=workers)
        layout.config_path.write_text(yaml.safe_dump(config))
        daemon = daemon_factory(layout.config_path, {"CALLBACK_SECRET": PP_SECRET})
        daemon.wait_started()
        (layout.inbox / "a.txt").write_bytes(b"a")
        (layout.inbox / "e.com").write_bytes(EICAR)
        daemon.wait_for(lambda: len(daemon.named("file.moved")) >= 2, timeout=30, what="two files moved")
        assert daemon.stop() == 0
        polls = [e.path for e in emulator.polls()]
        callbacks = list(emulator.callbacks)
        fields = emulator.submissions()[0].fields
    assert layout.placed("clean") == ["a.txt"] and layout.placed("quarantine") == ["e.com"]
    assert len(polls) == len(set(polls)) == 2  # one poll per scan
    # Left to the slowed polls (one every 20 s) a file would take 21.5 s or more.
    assert max(e["duration_s"] for e in daemon.named("file.moved")) < 15
    assert {status for _, status in callbacks} == {204} and len(callbacks) == 4
    assert fields["callback_url"] == f"http://127.0.0.1:{port}/webhooks/default"
    assert not daemon.leaked(PP_SECRET)


def test_signed_deliveries_are_answered_while_50_connections_stall(layout: Layout, daemon_factory) -> None:
    port = _free_port()
    with BlazelockEmulator() as emulator:
        daemon = daemon_factory(_blazelock_daemon(layout, emulator, port, poll_interval=1),
                                {"WEBHOOK_SECRET": BLZ_SECRET})
        daemon.wait_started()
        stalled = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(50)]
        for i, sock in enumerate(stalled):  # half stop inside the head, half inside the body
            sock.sendall(b"POST /webhooks/default HTTP/1.1\r\nHost: x\r\n" if i % 2 else
                         b"POST /webhooks/default HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{")
        time.sleep(0.5)
        try:
            for n in range(3):
                body = json.dumps({"event": "file_scan.completed", "data": {"id": f"fs_{n:06d}"}}).encode()
                stamp = str(int(time.time()))
                signed = {"X-Blazelock-Webhook-Timestamp": stamp,
                          "X-Blazelock-Webhook-Signature": sign(BLZ_SECRET, stamp, body)}
                started_at = time.monotonic()
                response = httpx.post(f"http://127.0.0.1:{port}/webhooks/default", content=body, timeout=5,
                                      headers=signed)
                assert response.status_code == 204 and time.monotonic() - started_at < 5
        finally:
            for sock in stalled:
                sock.close()
        assert daemon.stop() == 0
