"""One engine's request pacing (docs/engines.md#rate-limits): an AIMD rate, shared by every process.

The rate starts at the engine's `rate_limit` (requests a minute). A throttling answer
(429, 503, or a vendor's own "busy") halves it at once, at most once per request
interval, down to 1/16 of `rate_limit`; every successful answer adds back 1/32 of it.
`Retry-After`, and `X-RateLimit-Remaining: 0` with `X-RateLimit-Reset`, hold every request
of the engine until then. Requests are spread evenly at the current rate.

With `workers: N` every worker process paces the same engine through one state file
under state_dir (`pacing/<engine>.json`), read and written under an exclusive `flock`
(as daemon/slots.py shares `concurrency`): the rate, the next free slot and the hold
are the engine's, not one process's. `scanwatch status` and the metrics read the rate
from the same file. Without a file (an engine built outside the daemon), the state
lives in memory.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from daemon.errors import EngineThrottledError

__all__ = ["Pacer", "pacing_path", "read_rates"]

_FLOOR_SHARE = 1 / 16  # of rate_limit: the slowest the rate goes
_STEP_SHARE = 1 / 32  # of rate_limit: added back per successful answer
_CUT = 0.5


@dataclass
class _State:
    rate_per_minute: float
    next_at: float = 0.0  # the next free request slot (wall clock, shared by processes)
    hold_until: float = 0.0  # nothing is sent before this (Retry-After, an exhausted window)
    cut_at: float = 0.0  # when the rate was last lowered


def pacing_path(state_dir: Path, engine: str) -> Path:
    """The engine's pacing state file under state_dir."""
    return state_dir / "pacing" / f"{engine}.json"


def read_rates(state_dir: Path) -> dict[str, float]:
    """Each engine's current rate (requests a minute), as its pacing file has it."""
    rates: dict[str, float] = {}
    directory = state_dir / "pacing"
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else ():
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            state = _parse(os.pread(fd, 4096, 0))
        finally:
            os.close(fd)
        if state is not None:
            rates[path.stem] = state.rate_per_minute
    return rates


def _parse(data: bytes) -> _State | None:
    try:
        fields = json.loads(data)
        return _State(**{k: float(fields[k]) for k in _State.__dataclass_fields__})
    except (ValueError, TypeError, KeyError):
        return None  # not written yet, or cut short by a crash: start afresh


class Pacer:
    """The request pacing of engine `engine`: `acquire` before each request, `answered` after it.

    Thread-safe; with `state_path`, also shared by every process that uses that file.
    """

    def __init__(self, engine: str, rate_limit_per_minute: float, state_path: Path | None = None,
                 clock: Callable[[], float] = time.time, max_wait_s: float = 2.0) -> None:
        self.engine = engine
        self._max = rate_limit_per_minute
        self._floor = rate_limit_per_minute * _FLOOR_SHARE
        self._clock = clock
        self._max_wait_s = max_wait_s
        self._lock = threading.Lock()
        self._state = _State(rate_limit_per_minute)
        self._fd: int | None = None
        if state_path is not None:
            try:  # state_dir is the daemon's; a CLI run without it (check-config) paces alone
                # Readable like the journal's directory: `status` may run as a group member.
                state_path.parent.mkdir(mode=0o750, exist_ok=True)
                self._fd = os.open(state_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
            except OSError:
                self._fd = None
            with self._locked():
                pass  # written once: `status` shows the rate before the first request

    @property
    def rate_per_minute(self) -> float:
        """The current rate."""
        with self._locked() as state:
            return state.rate_per_minute

    def acquire(self) -> None:
        """Take the next request slot, sleeping up to `max_wait_s` for it.

        Raises `EngineThrottledError` (with the wait as `retry_after_s`) when the slot is
        further off: the file waits in the journal, not in a thread.
        """
        with self._locked() as state:
            now = self._clock()
            at = max(now, state.next_at, state.hold_until)
            if at - now > self._max_wait_s:
                raise EngineThrottledError(f"engine {self.engine!r}: paced at "
                                           f"{state.rate_per_minute:.4g} requests a minute; next "
                                           f"request in {at - now:.1f}s", retry_after_s=at - now)
            state.next_at = at + 60.0 / state.rate_per_minute
        if at > now:
            time.sleep(at - now)

    def throttled(self, retry_after_s: float | None) -> float:
        """The engine said "slow down": lower the rate, hold for `retry_after_s`; the wait now."""
        with self._locked() as state:
            now = self._clock()
            if now - state.cut_at >= 60.0 / state.rate_per_minute:  # one cut per interval
                state.rate_per_minute = max(self._floor, state.rate_per_minute * _CUT)
                state.cut_at = now
            pause_s = max(retry_after_s or 0.0, 60.0 / state.rate_per_minute)
            state.hold_until = max(state.hold_until, now + pause_s)
            return max(state.hold_until, state.next_at) - now

    def succeeded(self) -> None:
        """An answer that was not throttled: raise the rate a little."""
        with self._locked() as state:
            state.rate_per_minute = min(self._max, state.rate_per_minute + self._max * _STEP_SHARE)

    def hold(self, seconds: float) -> None:
        """Send nothing for `seconds` (an exhausted X-RateLimit window)."""
        with self._locked() as state:
            state.hold_until = max(state.hold_until, self._clock() + seconds)

    def close(self) -> None:
        """Close the state file."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    @contextmanager
    def _locked(self) -> Iterator[_State]:
        with self._lock:
            if self._fd is None:
                yield self._state
                return
            fd = self._fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                state = _parse(os.pread(fd, 4096, 0)) or _State(self._max)
                # A changed rate_limit applies at once; a lowered rate is kept across restarts.
                state.rate_per_minute = min(self._max, max(self._floor, state.rate_per_minute))
                yield state
                data = json.dumps(asdict(state)).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
