"""The daemon as a real subprocess on a real filesystem: arrivals, safety, signals, crashes."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import EICAR, Daemon, Layout

from daemon.journal import Journal
from daemon.model import FileState


def _moved(daemon: Daemon, count: int) -> bool:
    return len(daemon.named("file.moved")) >= count


def test_clean_and_eicar_end_to_end_with_sidecar(layout: Layout, daemon_factory) -> None:
    daemon = daemon_factory(layout.write_config())
    daemon.wait_started()
    (layout.inbox / "hello.txt").write_bytes(b"hello")
    (layout.inbox / "eicar.com").write_bytes(EICAR)
    daemon.wait_for(lambda: _moved(daemon, 2), what="two files moved")
    assert layout.placed("clean") == ["hello.txt"]
    assert layout.placed("quarantine") == ["eicar.com"]
    sidecar = json.loads((layout.quarantine / "eicar.com.scanwatch.json").read_text())
    assert sidecar["verdict"] == "infected"
    assert sidecar["threats"] == ["EICAR_Test_File"]
    assert sidecar["source"] == str(layout.inbox / "eicar.com")
    assert sidecar["destination"] == str(layout.quarantine / "eicar.com")
    assert sidecar["external_reference_id"].startswith("inbox:eicar.com#")
    assert sidecar["size"] == len(EICAR) and len(sidecar["sha256"]) == 64
    assert sidecar["detected_at"].endswith("Z") and sidecar["scanned_at"].endswith("Z")
    assert set(sidecar) == {"source", "destination", "verdict", "reason", "threats", "engine",
                            "engine_scan_id", "external_reference_id", "sha256", "size",
                            "detected_at", "scanned_at"}
    assert (layout.quarantine / "eicar.com").stat().st_mode & 0o777 == 0o600
    moved = {e["rel_path"]: e for e in daemon.named("file.moved")}
    assert moved["eicar.com"]["outcome"] == "infected"
    # Each file's arrival is one record of its own (docs/contract.md, "Log events").
    assert sorted((e["watch"], e["rel_path"], e["by"]) for e in daemon.named("file.discovered")) \
        == [("inbox", "eicar.com", "event"), ("inbox", "hello.txt", "event")]
    assert moved["hello.txt"]["ref_id"].startswith("inbox:hello.txt#")
    assert daemon.stop() == 0


@pytest.mark.parametrize("rel", [
    "nested/deeper/still/file.txt",
    "ünïcødé/日本語 ファイル.txt",
    "with spaces/and #hash.txt",
    "/".join(["d" * 60] * 4) + "/" + "f" * 50 + ".txt",  # a 300-character relative path
])
def test_awkward_names_keep_their_relative_path(layout: Layout, daemon_factory, rel: str) -> None:
    daemon = daemon_factory(layout.write_config())
    daemon.wait_started()
    target = layout.inbox / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"content of " + rel.encode())
    daemon.wait_for(lambda: _moved(daemon, 1), what="file moved")
    assert (layout.clean / rel).read_bytes() == b"content of " + rel.encode()
    assert [e["rel_path"] for e in daemon.named("file.discovered")] == [rel]
    assert not target.exists()
    assert daemon.stop() == 0


def test_slow_writer_is_scanned_once_and_complete(layout: Layout, daemon_factory) -> None:
    daemon = daemon_factory(layout.write_config(watch={"settle_seconds": 1}))
    daemon.wait_started()
    with open(layout.inbox / "slow.bin", "wb") as f:
        for i in range(15):  # 3 s of writing, 0.2 s apart
            f.write(bytes([i]) * 1000)
            f.flush()
            time.sleep(0.2)
        f.write(EICAR)  # the dangerous part comes last
    daemon.wait_for(lambda: _moved(daemon, 1), what="slow file moved")
    verdicts = daemon.named("scan.verdict")
    assert len(verdicts) == 1 and verdicts[0]["verdict"] == "infected"
    assert layout.placed("quarantine") == ["slow.bin"]
    assert (layout.quarantine / "slow.bin").stat().st_size == 15000 + len(EICAR)
    assert daemon.stop() == 0


def test_part_file_waits_and_is_scanned_after_rename(layout: Layout, daemon_factory) -> None:
    daemon = daemon_factory(layout.write_config())
    daemon.wait_started()
    (layout.inbox / "upload.pdf.part").write_bytes(b"half")
    time.sleep(1.5)
    assert daemon.named("file.moved") == []
    assert (layout.inbox / "upload.pdf.part").exists()
    (layout.inbox / "upload.pdf.part").rename(layout.inbox / "upload.pdf")
    daemon.wait_for(lambda: _moved(daemon, 1), what="renamed file moved")
    assert layout.placed("clean") == ["upload.pdf"]
    assert [e["rel_path"] for e in daemon.named("scan.verdict")] == ["upload.pdf"]
    assert daemon.stop() == 0


def test_default_ignore_globs_wait_in_place_and_a_given_list_replaces_them(
        layout: Layout, daemon_factory) -> None:
    """Dot-files, `*.part`, `*.tmp`, `*.crdownload`, `*.swp` wait unrecorded (docs/contract.md,
    "Ignored names"), also in subfolders; `ignore:` given replaces the whole list."""
    waiting = [".hidden", "sub/.~lock.odt#", "a.pdf.part", "b.tmp", "c.zip.crdownload", "sub/.d.txt.swp",
               "e.swp"]
    for rel in [*waiting, "ok.txt", "sub/ok.txt"]:
        (layout.inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (layout.inbox / rel).write_bytes(b"x")
    daemon = daemon_factory(layout.write_config())
    daemon.wait_for(lambda: _moved(daemon, 2), what="the two plain files moved")
    time.sleep(2.5)  # a rescan (rescan_interval 2) leaves them too
    assert daemon.stop() == 0
    assert layout.placed("clean") == ["ok.txt", "sub/ok.txt"]
    assert all((layout.inbox / rel).exists() for rel in waiting)
    assert {r.rel_path for r in Journal(layout.state / "journal.sqlite3").rows()} == {"ok.txt", "sub/ok.txt"}
    assert daemon.named("file.skipped") == []
    daemon = daemon_factory(layout.write_config(watch={"ignore": ["*.part"]}))
    daemon.wait_for(lambda: _moved(daemon, len(waiting) - 1), what="the others moved")
    assert daemon.stop() == 0
    assert [str(p.relative_to(layout.inbox)) for p in layout.inbox.rglob("*") if p.is_file()] == [
        "a.pdf.part"]


def test_files_present_before_start_are_swept(layout: Layout, daemon_factory) -> None:
    for i in range(20):
        (layout.inbox / f"early-{i}.txt").write_bytes(b"x%d" % i)
    (layout.inbox / "early.com").write_bytes(EICAR)
    daemon = daemon_factory(layout.write_config())
    daemon.wait_for(lambda: _moved(daemon, 21), what="21 early files moved")
    assert len(layout.placed("clean")) == 20 and layout.placed("quarantine") == ["early.com"]
    assert daemon.stop() == 0


def test_directory_moved_in_is_swept(layout: Layout, daemon_factory, tmp_path: Path) -> None:
    daemon = daemon_factory(layout.write_config())
    daemon.wait_started()
    staging = tmp_path / "staging"
    (staging / "inner").mkdir(parents=True)
    (staging / "inner" / "a.txt").write_bytes(b"a")
    (staging / "b.txt").write_bytes(b"b")
    staging.rename(layout.inbox / "batch")
    daemon.wait_for(lambda: _moved(daemon, 2), what="moved-in directory handled")
    assert layout.placed("clean") == ["batch/b.txt", "batch/inner/a.txt"]
    assert daemon.stop() == 0


def test_symlink_to_outside_is_never_read_or_moved(layout: Layout, daemon_factory, tmp_path: Path) -> None:
    secret = tmp_path / "secret.com"
    secret.write_bytes(EICAR)  # if it were ever read, it would be quarantined
    (layout.inbox / "passwd").symlink_to("/etc/passwd")
    (layout.inbox / "secret.com").symlink_to(secret)
    (layout.inbox / "linked-dir").symlink_to(tmp_path)
    daemon = daemon_factory(layout.write_config())
    daemon.wait_for(lambda: len(daemon.named("file.skipped")) >= 3, what="three skips")
    time.sleep(2.5)  # a rescan must not report them again
    skipped = daemon.named("file.skipped")
    assert sorted((e["rel_path"], e["reason"]) for e in skipped) == [
        ("linked-dir", "symlink"), ("passwd", "symlink"), ("secret.com", "symlink")]
    assert daemon.named("scan.verdict") == []
    assert (layout.inbox / "passwd").is_symlink() and secret.read_bytes() == EICAR
    assert not layout.quarantine.exists() and not layout.clean.exists()
    assert daemon.stop() == 0


def test_hardlinks_and_fifos_are_refused_and_left_in_place(layout: Layout, daemon_factory,
                                                          tmp_path: Path) -> None:
    original = tmp_path / "original.txt"
    original.write_bytes(b"shared inode")
    os.link(original, layout.inbox / "hard.txt")
    os.mkfifo(layout.inbox / "pipe")
    daemon = daemon_factory(layout.write_config())
    daemon.wait_for(lambda: len(daemon.named("file.skipped")) >= 2, what="two skips")
    reasons = {e["rel_path"]: e["reason"] for e in daemon.named("file.skipped")}
    assert reasons == {"hard.txt": "hardlink", "pipe": "special_file"}
    assert (layout.inbox / "hard.txt").exists() and (layout.inbox / "pipe").exists()
    assert daemon.named("scan.verdict") == []
    status = Journal(layout.state / "journal.sqlite3").counts()
    assert ("inbox", "held", None, "hardlink", 1) in status
    swept = len(daemon.named("watch.swept"))
    daemon.wait_for(lambda: len(daemon.named("watch.swept")) > swept, what="a sweep past the skips")
    assert len(daemon.named("file.skipped")) == 2  # reported once
    original.unlink()  # one link left: the next sweep finds a plain file, scanned and placed
    daemon.wait_for(lambda: daemon.named("file.moved"), what="the file with one link left placed")
    assert layout.placed("clean") == ["hard.txt"] and (layout.inbox / "pipe").exists()
    assert daemon.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_exits_zero_promptly(layout: Layout, daemon_factory, workers: int) -> None:
    daemon = daemon_factory(layout.write_config(workers=workers))
    daemon.wait_started()
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 10
    assert daemon.named("daemon.stopped")


@pytest.mark.parametrize("workers", [1, 2])
def test_sigint_of_the_whole_process_group_exits_zero(layout: Layout, daemon_factory, workers: int) -> None:
    """Ctrl-C reaches the daemon and its workers alike: in-flight work handed back, exit 0
    (docs/contract.md, "Signals"), not 130 or a traceback."""
    daemon = daemon_factory(layout.write_config(workers=workers), wrapper=("setsid",))
    daemon.wait_started()
    (layout.inbox / "a.txt").write_bytes(b"before the interrupt")
    daemon.wait_for(lambda: _moved(daemon, 1), what="file moved")
    os.killpg(daemon.proc.pid, signal.SIGINT)
    assert daemon.proc.wait(15) == 0
    assert daemon.stop() == 0
    assert daemon.named("daemon.stopped") and b"Traceback" not in daemon.stderr
    assert layout.placed("clean") == ["a.txt"]


def test_a_daemon_without_s3_leaves_no_s3_state_behind(layout: Layout, daemon_factory) -> None:
    """`node-id` names this state_dir in S3 snapshot keys (docs/integrity.md): made only for S3."""
    daemon = daemon_factory(layout.write_config())
    daemon.wait_started()
    (layout.inbox / "a.txt").write_bytes(b"hello")
    daemon.wait_for(lambda: _moved(daemon, 1), what="file moved")
    assert daemon.stop() == 0
    assert not (layout.state / "node-id").exists()
    assert not (layout.state / "staging" / "s3").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_with_broken_config_keeps_running_the_old_one(layout: Layout, daemon_factory,
                                                             workers: int) -> None:
    config = layout.write_config(workers=workers)
    daemon = daemon_factory(config)
    daemon.wait_started()
    config.write_text("engines: [this is: not valid")
    daemon.signal(signal.SIGHUP)
    daemon.wait_for(lambda: daemon.named("config.reload_failed"), what="reload_failed")
    (layout.inbox / "after.txt").write_bytes(b"still working")
    daemon.wait_for(lambda: _moved(daemon, 1), what="file moved after a failed reload")
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_with_new_config_applies_it(layout: Layout, daemon_factory, tmp_path: Path,
                                           workers: int) -> None:
    config = layout.write_config(workers=workers)
    daemon = daemon_factory(config)
    daemon.wait_started()
    rules = tmp_path / "extra.yar"
    rules.write_text('rule Custom_Marker { strings: $a = "CUSTOM-MARKER" condition: $a }')
    layout.write_config(engine={"rules": [str(rules)]}, workers=workers)
    daemon.signal(signal.SIGHUP)
    daemon.wait_for(lambda: daemon.named("config.reloaded"), what="reloaded")
    (layout.inbox / "marked.txt").write_bytes(b"xx CUSTOM-MARKER xx")
    daemon.wait_for(lambda: _moved(daemon, 1), what="marked file moved")
    assert layout.placed("quarantine") == ["marked.txt"]
    assert daemon.stop() == 0


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_mid_run_then_restart_loses_and_duplicates_nothing(layout: Layout, daemon_factory,
                                                                  workers: int) -> None:
    names = [f"f{i:03d}.{'com' if i % 50 == 0 else 'txt'}" for i in range(500)]
    config = layout.write_config(watch={"settle_seconds": 0}, workers=workers)
    first = daemon_factory(config)
    first.wait_started()

    def drop() -> None:
        for name in names:
            (layout.inbox / name).write_bytes(EICAR if name.endswith(".com") else name.encode())

    writer = threading.Thread(target=drop)
    writer.start()
    first.wait_for(lambda: _moved(first, 120), what="some files moved")
    first.proc.kill()
    first.proc.wait()
    writer.join()
    assert 0 < len(first.named("file.moved")) < 500
    second = daemon_factory(config)
    second.wait_for(lambda: not any(layout.inbox.iterdir()), timeout=60, what="inbox emptied")
    assert second.stop() == 0
    clean, quarantined = layout.placed("clean"), layout.placed("quarantine")
    assert sorted(clean + quarantined) == sorted(names)  # each exactly once, none renamed .1
    assert quarantined == sorted(n for n in names if n.endswith(".com"))
    for name in clean:
        assert (layout.clean / name).read_bytes() == name.encode()
    rows = Journal(layout.state / "journal.sqlite3").rows(limit=10_000)
    done = [r.rel_path for r in rows if r.state is FileState.DONE]
    assert sorted(done) == sorted(names)  # one done row per file
    # A late event for a file already moved may leave a `gone` row, never anything else.
    assert all(r.state in (FileState.DONE, FileState.GONE) for r in rows)
    assert {r.rel_path for r in rows if r.state is FileState.GONE} <= set(done)
