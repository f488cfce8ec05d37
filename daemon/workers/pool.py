"""`workers: N`: the pool of worker processes (daemon/workers/process.py), seen by the service as its
pipeline.

The parent keeps the watchers, listeners, metrics, alerts and systemd's watchdog; each
worker claims batches from the journal under its own owner token. Outcomes come back
over a pipe per worker, so the metrics and alerts count exactly what they count with
one process (a journal-derived count would miss retries and engine errors, which leave
no row behind). A worker that dies is reaped, its rows are handed back
(`Journal.reclaim`) and it is started again on the service's next tick: from the main
thread, because `PR_SET_PDEATHSIG` fires when the thread that started a child ends.

The first workers are forked (`forked_workers`) first thing in `scanwatch run`, while the
daemon has one thread and no journal, sockets or engines yet: they start with every module
already imported and wait on their stdin for the config, sent once the daemon has started
(`WorkerPool.start`). A worker started later (one that died, a reload) is a new
`python -m daemon.workers.process`: forking a process that runs threads could copy a lock
another thread holds.

A worker's stdout is a pipe to the daemon, which copies it to its own stdout a whole
line at a time: the daemon is the only process that writes the log, so a record is
never cut by another process's, whatever its size (a pipe's writes are atomic only up to
`PIPE_BUF`, a stream socket's not at all).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO

import structlog

from daemon.config import Config
from daemon.handoff import Handoff
from daemon.journal import Journal
from daemon.log import write_lines
from daemon.pipeline.outcome import Tally
from daemon.s3client import S3Clients
from daemon.workers.process import main_forked, read_frames, write_frame

__all__ = ["Forked", "WorkerPool", "forked_workers"]

log = structlog.get_logger("scanwatch.workers")

_WAKE_WAIT_S = 1.0
_RELAY_CHUNK_BYTES = 1 << 16
# After a read that emptied the pipe: the records (or outcomes) of the next 20 ms are read
# at once, not a few at a time (each wake-up of the thread costs the daemon's process tens
# of µs: bench/RESULTS.md, "Issue 21"). The pipe (`_PIPE_BYTES`) holds far more than a busy
# worker writes meanwhile.
_RELAY_PAUSE_S = 0.02
_PIPE_BYTES = 1 << 20


class Forked:
    """A worker forked from this process (`forked_workers`): what the pool uses of a `Popen`."""

    def __init__(self, pid: int, stdin: IO[bytes], stdout: IO[bytes], events_fd: int) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.events_fd = events_fd
        self.returncode: int | None = None
        self._reaping = threading.Lock()  # polled by the main thread and /healthz's

    def poll(self) -> int | None:
        with self._reaping:
            if self.returncode is None:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            time.sleep(0.01)
        return code

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


@contextlib.contextmanager
def forked_workers(config: Config, s3: S3Clients, handoff: Handoff) -> Iterator[list[Forked]]:
    """`config`'s worker processes (none for `workers: 1`), forked now, each with a copy of
    `s3` (clients not used yet) and the receiving end of `handoff`: call it before the
    journal opens and any thread starts.
    Those still running on leaving are killed and reaped, so a daemon that fails to start
    leaves none behind (the pool stops them otherwise)."""
    count = config.worker_count()
    is_safe = count > 1 and threading.active_count() == 1
    forked = [_fork(i, s3, handoff.receiving_fd()) for i in range(count)] if is_safe else []
    try:
        yield forked
    finally:
        for worker in forked:
            worker.kill()
            worker.wait()


def _fork(index: int, s3: S3Clients, handoff_fd: int) -> Forked:
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = _roomy_pipe()
    events_r, events_w = _roomy_pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        main_forked(parent, index, (stdin_r, stdout_w, events_w, handoff_fd), s3)
    for fd in (stdin_r, stdout_w, events_w):
        os.close(fd)
    return Forked(pid, os.fdopen(stdin_w, "wb"), os.fdopen(stdout_r, "rb"), events_r)


def _exec(index: int, handoff_fd: int) -> tuple[subprocess.Popen[bytes], int]:
    """A new worker process and the read end of its events pipe."""
    events_r, events_w = _roomy_pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.workers.process", "--parent", str(os.getpid()),
         "--events-fd", str(events_w), "--handoff-fd", str(handoff_fd), "--index", str(index)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(events_w, handoff_fd))
    os.close(events_w)
    assert proc.stdout is not None
    _make_roomy(proc.stdout.fileno())
    return proc, events_r


def _roomy_pipe() -> tuple[int, int]:
    read_fd, write_fd = os.pipe()
    _make_roomy(write_fd)
    return read_fd, write_fd


def _make_roomy(fd: int) -> None:
    """Room for many batches' outcomes or log records: a busy daemon stalls no worker."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | Forked
    wake_fd: int
    reader: threading.Thread
    relay: threading.Thread

    def join(self) -> None:
        """Wait for its outcomes and log lines, which end with the process."""
        self.reader.join(timeout=5.0)
        self.relay.join(timeout=5.0)


class WorkerPool:
    """`config.workers` worker processes, started again when one dies."""

    def __init__(self, config: Config, journal: Journal, wake: threading.Event,
                 on_outcomes: Callable[[Tally], None], handoff: Handoff,
                 forked: Sequence[Forked] = ()) -> None:
        self.config = config
        self.handoff = handoff
        self._forked = list(forked)  # waiting for their config: the first ones
        self.journal = journal
        self.wake = wake
        self._on_outcomes = on_outcomes
        self._workers: list[_Worker] = []
        self._stopping = threading.Event()
        self._pipes = threading.Lock()  # a wake pipe is not written while it is closed
        self._waker = threading.Thread(target=self._wake_all, name="workers-wake", daemon=True)
        self.heartbeat_at = time.time()

    def start(self) -> None:
        """Start the workers (from the main thread) and the thread that wakes them."""
        self._workers = [self._spawn(i) for i in range(self.config.worker_count())]
        self._waker.start()

    def _spawn(self, index: int) -> _Worker:
        """A worker given the config: a forked one still waiting for it, else a new process."""
        proc: subprocess.Popen[bytes] | Forked
        forked = self._forked.pop(0) if self._forked else None
        if forked is not None and forked.poll() is None:
            proc, events_r = forked, forked.events_fd
        else:
            proc, events_r = _exec(index, self.handoff.receiving_fd())
        assert proc.stdin is not None and proc.stdout is not None
        write_frame(proc.stdin, self.config)
        wake_fd = proc.stdin.fileno()
        os.set_blocking(wake_fd, False)
        reader = threading.Thread(target=self._read_events, args=(events_r,),
                                  name=f"worker-{index}-events", daemon=True)
        reader.start()
        relay = threading.Thread(target=_relay_lines, args=(proc.stdout, index),
                                 name=f"worker-{index}-log", daemon=True)
        relay.start()
        log.info("worker.spawned", worker=index, pid=proc.pid, forked=isinstance(proc, Forked))
        return _Worker(index, proc, wake_fd, reader, relay)

    def _read_events(self, fd: int) -> None:
        try:
            for tally in read_frames(fd, _RELAY_PAUSE_S):  # a batch's outcomes each
                self._on_outcomes(tally)
        finally:
            os.close(fd)

    def _wake_all(self) -> None:
        while not self._stopping.is_set():
            if not self.wake.wait(_WAKE_WAIT_S):
                continue
            self.wake.clear()
            with self._pipes:
                for worker in self._workers:
                    # A full pipe already wakes it; a dead one is started again.
                    with contextlib.suppress(OSError):
                        os.write(worker.wake_fd, b".")

    def tick(self) -> bool:
        """Start again each worker that died, once its rows are handed back; whether one did
        (the arrivals handed to it and not recorded yet are then nowhere: daemon/handoff.py)."""
        self.heartbeat_at = time.time()
        died = False
        if self._stopping.is_set():
            return died
        for i, worker in enumerate(self._workers):
            code = worker.proc.poll()
            if code is None:
                continue
            log.error("worker.died", worker=worker.index, pid=worker.proc.pid, code=code)
            self._close_pipe(worker)
            worker.join()
            self.journal.reclaim()
            self._workers[i] = self._spawn(worker.index)
            self.wake.set()
            died = True
        return died

    def is_alive(self) -> bool:
        """Every worker process runs (each one exits when its own pipeline stalls)."""
        return all(w.proc.poll() is None for w in self._workers)

    def stop(self, timeout_s: float) -> bool:
        """Each worker drains, told by the end of its stdin (a SIGTERM could come before it
        handles one); what is still running at the deadline is killed, its rows handed back."""
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        for worker in self._workers:
            self._close_pipe(worker)
        drained = True
        for worker in self._workers:
            try:
                code = worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                code = worker.proc.wait()
            if code != 0:
                log.warning("worker.undrained", worker=worker.index, pid=worker.proc.pid, code=code)
            drained = drained and code == 0
            worker.join()
        if self._waker.is_alive():
            self._waker.join()
        self.journal.reclaim()  # rows of workers killed at the deadline
        return drained

    def _close_pipe(self, worker: _Worker) -> None:
        assert worker.proc.stdin is not None
        with self._pipes:
            worker.wake_fd = -1
            with contextlib.suppress(OSError):
                worker.proc.stdin.close()


def _relay_lines(stream: IO[bytes], index: int) -> None:
    """Copy a worker's stdout to ours, whole lines only, until the worker ends."""
    partial = b""
    with stream:
        while chunk := os.read(stream.fileno(), _RELAY_CHUNK_BYTES):
            lines, newline, partial = (partial + chunk).rpartition(b"\n")
            if newline:
                write_lines((lines + newline).decode(errors="replace"))
            if len(chunk) < _RELAY_CHUNK_BYTES:
                time.sleep(_RELAY_PAUSE_S)
    if partial:  # killed in the middle of a record: its start is not a line
        log.warning("worker.record_cut", worker=index, size_bytes=len(partial))
