"""`workers: N`: worker processes share the journal and the engines' concurrency; a dead one is replaced."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from conftest import EICAR, ROOT, Daemon, Layout
from structlog.testing import capture_logs

from daemon.journal import Journal
from daemon.model import FileState, VerdictKind
from daemon.slots import EngineSlots
from daemon.workers.pool import _relay_lines

# One process of the test below: `threads` holders, each logging "+" and "-" inside its slot.
_HOLDERS = """
import os, sys, threading, time
from pathlib import Path
from daemon.slots import EngineSlots
from daemon.workers.pool import _relay_lines
slots = EngineSlots(Path(sys.argv[1]), "default", int(sys.argv[2]))
log = os.open(sys.argv[3], os.O_WRONLY | os.O_APPEND)
def hold():
    for _ in range(5):
        with slots:
            os.write(log, b"+")
            time.sleep(0.02)  # the engine at work
            os.write(log, b"-")
threads = [threading.Thread(target=hold) for _ in range(int(sys.argv[4]))]
for t in threads: t.start()
for t in threads: t.join()
"""


def test_engine_slots_hold_the_limit_across_processes(tmp_path: Path) -> None:
    log = tmp_path / "holders.log"
    log.write_bytes(b"")
    procs = [subprocess.Popen([sys.executable, "-c", _HOLDERS, str(tmp_path / "slots"), "3",
                               str(log), "4"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
             for _ in range(3)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    running, most = 0, 0
    for mark in log.read_bytes():
        running += 1 if mark == ord("+") else -1
        most = max(most, running)
    assert log.read_bytes().count(b"+") == 3 * 4 * 5
    assert most == 3  # never more than the limit, and all of it used


def test_a_killed_holder_frees_its_slot(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from daemon.slots import EngineSlots; s = EngineSlots(Path(sys.argv[1]), 'e', 1); "
         "s.__enter__(); print('held', flush=True); time.sleep(60)", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    slots = EngineSlots(tmp_path, "e", 1)
    taken = threading.Event()

    def take() -> None:
        with slots:
            taken.set()

    waiter = threading.Thread(target=take, daemon=True)
    waiter.start()
    assert not taken.wait(0.2)  # held by the other process
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert taken.wait(30)
    waiter.join(5)  # out of its slot before the slots are closed under it
    slots.close()


def test_a_thread_takes_the_slot_it_held_last_first(tmp_path: Path, monkeypatch) -> None:
    other = EngineSlots(tmp_path, "e", 4)  # another process's holders: flock is per open file
    other.__enter__()  # slot 0
    ours = EngineSlots(tmp_path, "e", 4)
    with ours:  # slot 1
        more = threading.Thread(target=other.__enter__)
        more.start()
        more.join()  # slot 2: the other process holds 0 and 2
    flocks: list[int] = []
    real = fcntl.flock
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (flocks.append(op), real(fd, op))[1])
    with ours:
        assert flocks == [fcntl.LOCK_EX | fcntl.LOCK_NB]  # its own slot at once, no failed tries
    monkeypatch.undo()
    ours.close()
    other.close()  # closing its files frees its slots


def test_a_killed_worker_is_replaced_and_nothing_is_lost_or_doubled(
        layout: Layout, daemon_factory: Callable[..., Daemon]) -> None:
    names = [f"f{i:03d}.{'com' if i % 50 == 0 else 'txt'}" for i in range(300)]
    daemon = daemon_factory(layout.write_config(watch={"settle_seconds": 0}, workers=2))
    daemon.wait_started()
    pids = [e["pid"] for e in daemon.wait_for(lambda: len(daemon.named("worker.spawned")) == 2
                                              and daemon.named("worker.spawned"))]
    for name in names:
        (layout.inbox / name).write_bytes(EICAR if name.endswith(".com") else name.encode())
    daemon.wait_for(lambda: len(daemon.named("file.moved")) >= 60, what="some files moved")
    os.kill(pids[0], signal.SIGKILL)
    daemon.wait_for(lambda: daemon.named("worker.died"), what="the worker's death noticed")
    daemon.wait_for(lambda: len(daemon.named("worker.spawned")) == 3, what="a new worker")
    daemon.wait_for(lambda: not any(layout.inbox.iterdir()), timeout=60, what="inbox emptied")
    assert daemon.stop() == 0
    clean, quarantined = layout.placed("clean"), layout.placed("quarantine")
    assert sorted(clean + quarantined) == sorted(names)  # each exactly once, none renamed .1
    assert quarantined == sorted(n for n in names if n.endswith(".com"))
    rows = Journal(layout.state / "journal.sqlite3").rows(limit=10_000)
    assert sorted(r.rel_path for r in rows if r.state is FileState.DONE) == sorted(names)
    assert daemon.named("daemon.stopped")[0]["drained"] is True, daemon.named("worker.undrained")


def test_arrivals_go_straight_to_a_worker_and_those_of_one_killed_holding_them_are_swept(
        layout: Layout, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    """daemon/handoff.py: an event's settled file goes to a worker (which pauses here once it
    has it); a worker killed after taking arrivals, before it recorded them, leaves them
    nowhere but in the source, and the daemon sweeps at once, not at the next periodic sweep
    (an hour away here)."""
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    env = {"SCANWATCH_PAUSE_AT": "arrivals.taken", "SCANWATCH_PAUSE_DIR": str(pauses)}
    daemon = daemon_factory(layout.write_config(
        watch={"settle_seconds": 0, "rescan_interval": 3600}, workers=2), env)
    daemon.wait_started()
    pids = [e["pid"] for e in daemon.wait_for(lambda: len(daemon.named("worker.spawned")) == 2
                                              and daemon.named("worker.spawned"))]
    (layout.inbox / "a.txt").write_bytes(b"a")
    daemon.wait_for(lambda: (pauses / "arrivals.taken.reached").exists(), what="a.txt taken")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    (pauses / "arrivals.taken.go").touch()  # the new workers take theirs without waiting
    daemon.wait_for(lambda: layout.placed("clean") == ["a.txt"], timeout=30, what="a.txt placed")
    assert [e["by"] for e in daemon.named("file.discovered")] == ["sweep"]
    (layout.inbox / "b.txt").write_bytes(b"b")
    daemon.wait_for(lambda: layout.placed("clean") == ["a.txt", "b.txt"], what="b.txt placed")
    assert [e["by"] for e in daemon.named("file.discovered") if e["rel_path"] == "b.txt"] == ["event"]
    assert daemon.stop() == 0


def test_the_handoff_carries_long_names_whole_and_leaves_a_message_too_long_to_the_journal() -> None:
    """daemon/handoff.py: a message is taken whole, its names however odd; one past 64 KiB
    (16 very deep paths) is not sent, its arrivals left for the journal."""
    from daemon.fsutil import Identity
    from daemon.handoff import Handoff

    handoff = Handoff()
    odd = "/".join(["é " * 100 + "..x"] * 20) + b"\xff.bin".decode("utf-8", "surrogateescape")
    one = [(odd, Identity(1, 2, 3, 4, 5), 6.0)]
    assert handoff.offer("w", one, settled=False) == []
    assert handoff.take() == ("w", False, one)
    deep = [(f"{'d' * 250}/" * 20 + f"f{i}", Identity(1, i, 3, 4, 5), 6.0) for i in range(16)]
    assert handoff.offer("w", deep, settled=True) == deep
    assert handoff.take() is None
    handoff.close()


def test_the_handoff_counts_what_no_worker_has_taken_yet() -> None:
    """`on_way`: per watch, the arrivals still in the socket and the earliest found; a
    message taken whole (by any process) leaves the count whole."""
    import os

    from daemon.fsutil import Identity
    from daemon.handoff import Handoff

    handoff = Handoff()
    assert handoff.on_way() == {}
    arrivals = [(f"f{i}", Identity(1, i, 3, 4, 5), 100.0 + i) for i in range(20)]
    assert handoff.offer("a", arrivals, settled=True) == []  # two messages: 16 and 4
    assert handoff.offer("b", arrivals[5:6], settled=False) == []
    assert handoff.on_way() == {"a": (20, 100.0), "b": (1, 105.0)}
    if (pid := os.fork()) == 0:  # a worker process takes the first message
        os._exit(0 if handoff.take() is not None else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert handoff.on_way() == {"a": (4, 116.0), "b": (1, 105.0)}
    handoff.take()
    handoff.take()
    assert handoff.on_way() == {}
    handoff.close()


def _long_rel(i: int) -> str:
    """A nested name of 1 to 12 components of 242 bytes; "é" is 6 characters in a JSON line,
    so a `file.moved` record (its name three times) runs from ~2 to ~27 KiB."""
    return "/".join([f"{'é' * 120}{d:02d}" for d in range(i % 12 + 1)] + [f"long{i:03d}.txt"])


def test_every_log_line_is_one_whole_record_with_three_workers(
        layout: Layout, daemon_factory: Callable[..., Daemon]) -> None:
    names = [f"f{i:03d}.{'com' if i % 40 == 0 else 'txt'}" for i in range(360)]
    names += [_long_rel(i) for i in range(60)]
    for name in names:
        (layout.inbox / name).parent.mkdir(parents=True, exist_ok=True)
        (layout.inbox / name).write_bytes(EICAR if name.endswith(".com") else name.encode())
    daemon = daemon_factory(layout.write_config(watch={"settle_seconds": 0}, workers=3))
    daemon.wait_for(lambda: len(layout.placed("clean")) + len(layout.placed("quarantine"))
                    == len(names), timeout=120, what="every file placed")
    time.sleep(0.5)  # the last records on their way through the pipes
    assert daemon.stop() == 0
    assert [e["line"][:200] for e in daemon.events if e["event"] == "raw"] == []
    assert Counter(e["rel_path"] for e in daemon.named("file.moved")) == Counter(names)
    assert Counter(e["rel_path"] for e in daemon.named("file.discovered")) == Counter(names)
    assert max(len(json.dumps(e)) for e in daemon.named("file.moved")) > 16_384


def test_the_cut_record_of_a_killed_worker_is_left_out(capsys) -> None:
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b'{"event": "a"}\n{"event": "b"}\n{"event": "c", "rel_')  # then killed
    os.close(write_fd)
    with capture_logs() as logs:
        _relay_lines(os.fdopen(read_fd, "rb"), 1)
    assert capsys.readouterr().out == '{"event": "a"}\n{"event": "b"}\n'
    assert logs == [{"event": "worker.record_cut", "log_level": "warning", "worker": 1, "size_bytes": 20}]


def test_a_daemon_of_local_watches_imports_no_boto3() -> None:
    """Start-up is mostly imports (bench/RESULTS.md, "Issue 21"): boto3 and botocore, a tenth
    of a second of CPU in each process, are loaded only by an S3 call."""
    script = ("import sys, daemon.cli, daemon.service, daemon.workers.process; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


def test_a_workers_frame_carries_its_batchs_counts_summed_and_whole_rows_only_where_an_alert_may_follow(
        tmp_path: Path) -> None:
    """The daemon adds a batch's sums: unpickling and counting each step of every file was its
    own work (bench/RESULTS.md, "Issue 21")."""
    from daemon.fsutil import Identity
    from daemon.pipeline.outcome import Outcome, Outcomes, Tally
    from daemon.retry import RetryPolicy
    from daemon.workers.process import _Events, read_frame

    journal = Journal(tmp_path / "journal.sqlite3")
    journal.discover("w", [("ok.txt", 1), ("bad.com", 2)], 1.0,
                     {"ok.txt": Identity(1, 1, 10, 1, 1), "bad.com": Identity(1, 2, 68, 1, 1)})
    ok, bad = journal.claim(["w"], "1:1", 2.0, 16)
    ok, bad = ok.updated({"verdict": "clean"}), bad.updated({"verdict": "infected", "sha256": "ab"})
    outcomes = Outcomes(lambda: 3.0, RetryPolicy())
    verdict = Outcome({"verdict": "clean"}, "scan.verdict", {"verdict": "clean", "cache": "miss"})
    batch = [(ok, "yara", verdict), (ok, "yara", outcomes.placed(ok, "/c/ok.txt", VerdictKind.CLEAN)),
             (bad, "yara", verdict), (bad, "yara", outcomes.placed(bad, "/q/bad.com", VerdictKind.INFECTED))]
    read_fd, write_fd = os.pipe()
    _Events(write_fd).send(batch)
    with os.fdopen(read_fd, "rb") as stream:
        frame = read_frame(stream)
    assert isinstance(frame, Tally)
    assert frame.counts == {("cache", ("yara", "miss")): 2, ("files", ("w", "clean", "")): 1,
                            ("files", ("w", "infected", "")): 1, ("bytes_scanned", ("yara",)): 78}
    assert [engine for engine, _ in frame.durations] == ["yara", "yara"]
    assert [(row, event) for row, event, _ in frame.notable] == [(bad, "file.moved")]  # an alert reads it
    assert frame.notable[0][2]["destination"] == "/q/bad.com"


def test_frames_are_read_whole_however_the_reads_cut_them() -> None:
    """The daemon reads a worker's outcomes a pipe's worth at a time (`read_frames`): frames
    several to a read, or one across many, come out whole and in order, up to the end."""
    from daemon.workers.process import read_frames, write_frame

    frames = [{"n": i, "pad": "x" * size} for i, size in enumerate((0, 10, 200_000, 3, 70_000, 0))]
    read_fd, write_fd = os.pipe()

    def write_all() -> None:
        with os.fdopen(write_fd, "wb") as out:
            for frame in frames:
                write_frame(out, frame)

    writer = threading.Thread(target=write_all)
    writer.start()
    assert list(read_frames(read_fd, 0.001)) == frames
    writer.join()
    os.close(read_fd)


def _processes_running(config_path: Path) -> list[int]:
    """Processes whose command line names `config_path`: the daemon and its forked workers."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(config_path).encode() in cmdline.split(b"\0"):
                found.append(int(entry.name))
    return found


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def test_the_first_workers_are_forked_from_the_daemon_and_a_replacement_is_a_new_process(
        layout: Layout, daemon_factory: Callable[..., Daemon]) -> None:
    """Forked before the journal opens, the first workers start with every module already
    imported (bench/RESULTS.md, "A backlog present at start"): they run the daemon's own
    command line, never `python -m daemon.workers.process`, which only a replacement runs."""
    daemon = daemon_factory(layout.write_config(watch={"settle_seconds": 0}, workers=2))
    daemon.wait_started()
    spawned = daemon.wait_for(lambda: len(daemon.named("worker.spawned")) == 2
                              and daemon.named("worker.spawned"), what="two workers")
    cmdline = Path(f"/proc/{daemon.proc.pid}/cmdline").read_bytes()
    for event in spawned:
        assert event["forked"] is True
        assert Path(f"/proc/{event['pid']}/cmdline").read_bytes() == cmdline
        assert _parent_of(event["pid"]) == daemon.proc.pid
    (layout.inbox / "a.txt").write_bytes(b"before")
    daemon.wait_for(lambda: layout.placed("clean") == ["a.txt"], what="a.txt placed by a forked worker")
    os.kill(spawned[0]["pid"], signal.SIGKILL)
    replaced = daemon.wait_for(lambda: len(daemon.named("worker.spawned")) == 3
                               and daemon.named("worker.spawned")[2], what="a new worker")
    assert replaced["forked"] is False
    assert b"daemon.workers.process" in Path(f"/proc/{replaced['pid']}/cmdline").read_bytes()
    (layout.inbox / "b.txt").write_bytes(b"after")
    daemon.wait_for(lambda: layout.placed("clean") == ["a.txt", "b.txt"], what="b.txt placed")
    assert daemon.stop() == 0
    assert _processes_running(layout.config_path) == []


def test_a_daemon_that_fails_after_forking_its_workers_exits_2_and_leaves_none_behind(
        layout: Layout, tmp_path: Path) -> None:
    """A problem found once the workers are forked (rules that do not compile: the engines
    are built after the fork) still exits 2 naming the file and the YAML path."""
    rules = tmp_path / "broken.yar"
    rules.write_text("rule Broken { condition: }")
    config = layout.write_config(engine={"rules": [str(rules)]}, workers=2)
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"{config} is not valid" in done.stderr and "engines.default.rules" in done.stderr
    assert "Traceback" not in done.stderr
    assert _processes_running(config) == []
