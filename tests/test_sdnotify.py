"""The systemd notify protocol, received on a real AF_UNIX datagram socket."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Layout

from daemon.sdnotify import Notifier


class Listener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address if not address.startswith("@") else "\0" + address[1:])
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                return self.messages

    def wait_for(self, prefix: str, timeout_s: float = 15.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for message in self.drain():
                if message.startswith(prefix):
                    return message
        raise AssertionError(f"no {prefix!r} among {self.messages}")


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    address = str(tmp_path / "notify.sock")
    server = Listener(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    yield server
    server.sock.close()


def test_messages_arrive_as_systemd_expects(listener: Listener) -> None:
    notifier = Notifier()
    assert notifier.ready("2 watches, 0 files pending")
    assert notifier.reloading()
    assert notifier.extend_timeout(12.5)
    ready, reloading_text, extend = listener.drain()
    assert ready == "READY=1\nSTATUS=2 watches, 0 files pending"
    reloading = reloading_text.split("\n")
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
    assert abs(int(reloading[1].split("=")[1]) - time.monotonic_ns() // 1000) < 5_000_000
    assert extend == "EXTEND_TIMEOUT_USEC=12500000"


def test_abstract_socket_and_no_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"@scanwatch-test-{time.monotonic_ns()}"
    server = Listener(name)
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    assert Notifier().stopping()
    assert server.drain() == ["STOPPING=1"]
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not Notifier().watchdog()


def test_daemon_notifies_ready_watchdog_reloading_stopping(listener: Listener, layout: Layout,
                                                          daemon_factory) -> None:
    daemon = daemon_factory(layout.write_config(), env={"WATCHDOG_USEC": "2000000"})
    listener.wait_for("READY=1")
    listener.wait_for("WATCHDOG=1")
    daemon.signal(signal.SIGHUP)
    listener.wait_for("RELOADING=1")
    listener.wait_for("READY=1")
    assert daemon.stop() == 0
    listener.wait_for("STOPPING=1")
