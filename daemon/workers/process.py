"""One worker process of `workers: N`: a `Pipeline` with its own owner token and engines.

Forked by the daemon at its start, before its journal opens and any thread runs
(`main_forked`: it starts with every module already imported), or, to replace one that died
and after a reload, started as `python -m daemon.workers.process --parent PID --events-fd FD
--handoff-fd H` (`main`): daemon/workers/pool.py. Its stdin carries the config (one frame, so a
reload that the parent refused never reaches a worker), then one byte per wake-up; FD carries
each outcome back to the parent for the metrics and alerts; H, a socket every worker shares,
brings arrivals (daemon/handoff.py); its stdout, the log lines, goes to the parent too
(daemon/workers/pool.py). It dies with the parent (`PR_SET_PDEATHSIG`), drains at the end of its
stdin or on SIGTERM, ignores SIGHUP: the parent reloads by starting new workers. Webhook
receivers run in the parent; whether their deliveries arrive, which slows the workers'
polls, is shared through a file per engine under state_dir (`share_webhook_health`).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import pickle
import signal
import struct
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, NoReturn

import structlog

from daemon.config import Config
from daemon.engines import Engine, build_engines
from daemon.engines._webhook import WebhookHealth
from daemon.engines.base import WebhookSource
from daemon.handoff import Handoff
from daemon.journal import open_journal, owner_token
from daemon.log import configure_logging
from daemon.pipeline import Pipeline, Reported
from daemon.pipeline.outcome import Tally
from daemon.s3client import S3Clients

__all__ = ["main", "main_forked", "read_frame", "read_frames", "share_webhook_health", "write_frame"]

log = structlog.get_logger("scanwatch.worker")

_PR_SET_PDEATHSIG = 1
_HEADER = struct.Struct("!I")
_READ_BYTES = 1 << 16
_TICK_S = 1.0
_DRAIN_SHARE = 0.8  # of shutdown_timeout: the parent waits all of it


def write_frame(stream: IO[bytes], value: Any) -> None:
    """Write one length-prefixed pickle."""
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def read_frame(stream: IO[bytes]) -> Any:
    """Read one length-prefixed pickle (EOFError at the end of the stream)."""
    header = _read_exactly(stream, _HEADER.size)
    return pickle.loads(_read_exactly(stream, _HEADER.unpack(header)[0]))


def read_frames(fd: int, pause_s: float) -> Iterator[Any]:
    """The frames `write_frame` wrote to `fd`, until its end. After a read that emptied it,
    the next `pause_s` of frames are left to gather, to be read at once: each wake-up of the
    reading thread costs the daemon's process tens of µs (bench/RESULTS.md, "Issue 21")."""
    pending = b""
    while chunk := os.read(fd, _READ_BYTES):
        pending += chunk
        start = 0
        while len(pending) - start >= _HEADER.size:
            end = start + _HEADER.size + _HEADER.unpack_from(pending, start)[0]
            if end > len(pending):
                break
            yield pickle.loads(pending[start + _HEADER.size:end])
            start = end
        pending = pending[start:]
        if len(chunk) < _READ_BYTES:
            time.sleep(pause_s)


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


class _SharedWebhookHealth(WebhookHealth):
    """An engine's `WebhookHealth` seen by every process of the daemon: the time of the last
    verified delivery is the mtime of a file, touched by the receiver, read by the polls."""

    def __init__(self, path: Path) -> None:
        super().__init__(clock=time.time)
        self._path = path
        path.parent.mkdir(exist_ok=True)

    def receiving(self) -> None:
        self._path.touch()

    def stopped(self) -> None:
        self._path.unlink(missing_ok=True)

    @property
    def is_healthy(self) -> bool:
        try:
            return self._clock() - self._path.stat().st_mtime < self._healthy_for_s
        except FileNotFoundError:
            return False


def share_webhook_health(engines: Mapping[str, Engine], state_dir: Path) -> None:
    """Give each engine that takes webhooks a health shared with the other processes."""
    for name, engine in engines.items():
        if isinstance(engine, WebhookSource) and engine.webhook_address is not None:
            engine.webhook_health = _SharedWebhookHealth(state_dir / "webhooks" / name)


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


class _Events:
    """Outcomes to the parent, one frame per batch, from any pipeline thread."""

    def __init__(self, fd: int) -> None:
        self._stream = os.fdopen(fd, "wb", buffering=0)
        self._lock = threading.Lock()

    def send(self, batch: list[Reported]) -> None:
        # What the daemon's metrics and alerts read, summed here (`Tally`): never the row
        # changes (which the journal has), the whole row only where a notification may follow.
        frame = Tally.of(batch)
        try:
            with self._lock:
                write_frame(self._stream, frame)
        except (OSError, pickle.PicklingError) as exc:
            log.warning("worker.event_lost", events=[o.event for _, _, o in batch], error=str(exc))


def _read_wakes(stream: IO[bytes], wake: threading.Event, stop: threading.Event) -> None:
    while stream.read(1):
        wake.set()
    stop.set()  # the parent closed our stdin: it stops us (daemon/workers/pool.py)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.workers.process")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--events-fd", type=int, required=True)
    parser.add_argument("--handoff-fd", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    return _serve(args.parent, args.events_fd, args.handoff_fd, args.index, S3Clients())


def main_forked(parent: int, index: int, fds: tuple[int, int, int, int], s3: S3Clients) -> NoReturn:
    """A worker forked from the daemon: its pipes and handoff socket `fds` become stdin, stdout,
    fd 3 and fd 4, the daemon's other descriptors are closed, and it exits without returning
    into the daemon's code. `s3`: the daemon's S3 clients as they were before the fork (none
    used yet)."""
    code = 1
    try:
        # Each one above fd 4 first: none is overwritten before it is in its place.
        for fd, to in zip([fcntl.fcntl(fd, fcntl.F_DUPFD, 5) for fd in fds], (0, 1, 3, 4), strict=True):
            os.dup2(fd, to)
        os.closerange(5, os.sysconf("SC_OPEN_MAX"))
        code = _serve(parent, 3, 4, index, s3)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _serve(parent: int, events_fd: int, handoff_fd: int, index: int, s3: S3Clients) -> int:
    _die_with_parent(parent)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stdin = os.fdopen(0, "rb", buffering=0, closefd=False)
    try:
        config: Config = read_frame(stdin)
    except EOFError:  # the daemon stopped before it started its pipeline: nothing to do
        return 0
    configure_logging(config.log.format, config.log.level)
    structlog.contextvars.bind_contextvars(worker=index)
    return _run(config, stdin, events_fd, Handoff.inherited(handoff_fd), stop, s3)


def _run(config: Config, stdin: IO[bytes], events_fd: int, handoff: Handoff,
         stop: threading.Event, s3: S3Clients) -> int:
    journal = open_journal(config.state_dir)
    engines = build_engines(config)
    share_webhook_health(engines, config.state_dir)
    wake = threading.Event()
    pipeline = Pipeline(config, journal, engines, owner=owner_token(), wake=wake,
                        on_outcomes=_Events(events_fd).send, s3=s3, handoff=handoff)
    threading.Thread(target=_read_wakes, args=(stdin, wake, stop), name="wakes",
                     daemon=True).start()
    pipeline.start()
    log.info("worker.started", pid=os.getpid())
    code = 0
    while not stop.wait(_TICK_S):
        if journal.damage or not pipeline.is_alive():
            log.error("worker.stalled", damage=journal.damage, since=pipeline.heartbeat_at)
            code = 1
            break
    drained = pipeline.stop(config.shutdown_timeout * _DRAIN_SHARE if code == 0 else 0.0)
    for engine in engines.values():
        engine.close()
    journal.close()
    handoff.close()
    log.info("worker.stopped", drained=drained)
    return code


if __name__ == "__main__":
    sys.exit(main())
