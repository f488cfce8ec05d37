"""The systemd notify protocol: datagrams to $NOTIFY_SOCKET, no dependency needed."""

from __future__ import annotations

import os
import socket
import time

__all__ = ["Notifier"]


class Notifier:
    """Sends READY/STATUS/WATCHDOG/RELOADING/STOPPING to systemd; a no-op outside it."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address

    def send(self, *fields: str) -> bool:
        """Send one message; False when there is no socket or it failed."""
        if not self._address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never wait on a reader that is behind: the main loop sends these every tick.
                sock.sendto("\n".join(fields).encode(), socket.MSG_DONTWAIT, self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={now_us}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def failing(self, reason: str) -> bool:
        """Stopping because of a fault: `systemctl status` shows why until the restart."""
        return self.send("STOPPING=1", f"STATUS=failed: {reason}")

    def extend_timeout(self, seconds: float) -> bool:
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")
