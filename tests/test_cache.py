"""The verdict cache (docs/engines.md, "Verdict cache") with real engines: the Blazelock emulator,
a clamd whose database is reloaded, YARA rules reloaded by SIGHUP (fleets: test_cache_fleet.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clamd_server import Clamd, free_port, running_clamd
from conftest import EICAR, ROOT, Daemon, Harness, Layout, wait_until
from emulators.blazelock import BlazelockEmulator
from structlog.testing import capture_logs

from daemon.config import BlazelockEngineConfig, ClamavEngineConfig, YaraEngineConfig
from daemon.engines.blazelock import BlazelockEngine
from daemon.engines.clamav import ClamavEngine
from daemon.engines.yara import YaraEngine
from daemon.journal import open_journal
from daemon.model import FileState

COPIES = 10


@pytest.fixture
def emulator() -> Iterator[BlazelockEmulator]:
    with BlazelockEmulator(scan_delay_s=0.5) as server:
        yield server  # type: ignore[misc]


def _blazelock(layout: Layout, emulator: BlazelockEmulator, **cfg: object) -> Harness:
    engine_cfg = {"type": "blazelock", "url": emulator.url, "api_key": "test-key",
                  "poll_interval": 0.1, "timeout": 5, **cfg}
    config = BlazelockEngineConfig.model_validate(engine_cfg)
    return Harness(layout, BlazelockEngine("default", config), engine_cfg=engine_cfg)


def _copies(harness: Harness, data: bytes, suffix: str = ".txt") -> list[str]:
    names = [f"copy{i}{suffix}" for i in range(COPIES)]
    for name in names:
        harness.drop(name, data)
    return names


def _verdicts(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "scan.verdict"]


def test_ten_copies_arriving_at_once_cost_one_submission(layout: Layout,
                                                         emulator: BlazelockEmulator) -> None:
    harness = _blazelock(layout, emulator)
    names = _copies(harness, b"one attachment mailed to the whole team")
    with capture_logs() as logs:
        harness.run()
    assert harness.layout.placed("clean") == sorted(names)
    assert len(emulator.submissions()) == 1
    waited = [e for e in logs if e["event"] == "scan.waiting"]
    assert waited and all(e["sha256"] == harness.row(names[0]).sha256 for e in waited)
    verdicts = _verdicts(logs)
    assert sorted(e.get("cached", False) for e in verdicts) == [False] + [True] * (COPIES - 1)
    first = next(e for e in verdicts if not e.get("cached"))
    scan = next(iter(emulator.scans.values()))
    for event in verdicts:
        if event.get("cached"):
            assert event["cached_from"]["engine_scan_id"] == scan["id"]
            assert event["cached_from"]["external_reference_id"] == first["ref_id"]
    assert harness.journal.verdicts.stats() == {"default": (COPIES - 1, 1)}


def test_ten_infected_copies_cost_one_submission_and_say_so_in_their_sidecars(
        layout: Layout, emulator: BlazelockEmulator) -> None:
    harness = _blazelock(layout, emulator)
    names = _copies(harness, EICAR, ".com")
    harness.run()
    assert harness.layout.placed("quarantine") == sorted(names)
    assert len(emulator.submissions()) == 1
    scan_id, scan = next(iter(emulator.scans.items()))
    sidecars = [json.loads((layout.quarantine / f"{n}.scanwatch.json").read_text()) for n in names]
    original = [s for s in sidecars if not s.get("cached")]
    assert len(original) == 1 and original[0]["engine_scan_id"] == scan_id
    for sidecar in sidecars:
        assert sidecar["verdict"] == "infected" and sidecar["threats"] == ["EICAR-Test-File"]
        if sidecar.get("cached"):
            assert sidecar["cached_from"] == {
                "external_reference_id": scan["attributes"]["external_reference_id"],
                "engine_scan_id": scan_id, "scanned_at": original[0]["scanned_at"]}
            assert sidecar["engine_scan_id"] is None
            assert sidecar["external_reference_id"].startswith(f"inbox:{Path(sidecar['source']).name}#")


def _yara(layout: Layout) -> Harness:
    return Harness(layout, YaraEngine("default", YaraEngineConfig.model_validate({"type": "yara"})))


def test_small_copies_for_yara_take_no_flight_and_large_ones_do(layout: Layout) -> None:
    """YARA scans a small file in the daemon's process for less than a flight's journal write
    (docs/engines.md, "Verdict cache"): copies arriving together are each scanned, none waits;
    the verdict is still kept for the next copy. Above 1 MiB the copies wait for one scan."""
    harness = _yara(layout)
    small = _copies(harness, b"a small attachment mailed to the whole team")
    with capture_logs() as logs:
        harness.run()
    assert harness.layout.placed("clean") == sorted(small)
    assert not [e for e in logs if e["event"] == "scan.waiting"]
    assert harness.journal.verdicts.stats() == {"default": (0, COPIES)}
    harness.drop("later.txt", b"a small attachment mailed to the whole team")
    with capture_logs() as logs:
        harness.run()
    assert [e.get("cached") for e in _verdicts(logs)] == [True]
    large = [f"large{i}.bin" for i in range(3)]
    for name in large:
        harness.drop(name, b"x" * (2 << 20))
    with capture_logs() as logs:
        # The sweep finds the three at once (inotify's events may still be gathering); no time
        # passes after it: the first copy's answer wakes the copies waiting for it.
        harness.step(advance_s=3)
    assert len([e for e in logs if e["event"] == "scan.waiting"]) == len(large) - 1
    assert sorted(e.get("cached", False) for e in _verdicts(logs)) == [False, True, True]
    assert all(harness.row(name).state is FileState.DONE for name in large)


def test_cache_switched_off_scans_every_copy(layout: Layout, emulator: BlazelockEmulator) -> None:
    harness = _blazelock(layout, emulator, cache={"enabled": False})
    names = _copies(harness, b"the same build artefact, uploaded per branch")
    with capture_logs() as logs:
        harness.run()
    assert harness.layout.placed("clean") == sorted(names)
    assert len(emulator.submissions()) == COPIES
    assert not any(e.get("cached") for e in _verdicts(logs))
    assert harness.journal.verdicts.stats() == {}


def test_a_failed_first_scan_lets_the_waiting_copies_ask_for_themselves(
        layout: Layout, emulator: BlazelockEmulator) -> None:
    harness = _blazelock(layout, emulator)
    names = _copies(harness, b"xx BLZ-FAIL xx")
    harness.run(steps=80)
    assert harness.layout.placed("failed") == sorted(names)  # none left waiting
    assert len(emulator.submissions()) == COPIES  # a failed verdict is never reused


def test_a_clean_vendor_verdict_older_than_clean_ttl_is_not_reused(
        layout: Layout, emulator: BlazelockEmulator) -> None:
    harness = _blazelock(layout, emulator, cache={"clean_ttl": "1h"})
    harness.drop("a.txt", b"reused within the hour only")
    harness.run()
    harness.drop("b.txt", b"reused within the hour only")
    harness.run()
    assert len(emulator.submissions()) == 1
    harness.clock.now += 3600
    harness.drop("c.txt", b"reused within the hour only")
    harness.run()
    assert len(emulator.submissions()) == 2
    assert harness.layout.placed("clean") == ["a.txt", "b.txt", "c.txt"]


# -- clamd: a database reload changes the fingerprint ---------------------------------------------

def _daily(version: int, db: Path, hashes: list[str]) -> None:
    """A `daily.cud` (unsigned) of `version` with these `.hdb` lines: clamd's VERSION then
    names the database version, as it does with the official daily database."""
    build = db.parent / f"build{version}"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir()
    (build / "daily.hdb").write_text("".join(f"{line}\n" for line in hashes))
    (build / "COPYING").write_text("test signatures\n")
    subprocess.run(["sigtool", "--build=daily.cud", "--unsigned", f"--cvd-version={version}",
                    "--no-cdiff", f"--datadir={build}"], cwd=build, input=b"scanwatch-tests\n",
                   check=True, capture_output=True)
    shutil.copy(build / "daily.cud", db / "daily.cud.new")
    (db / "daily.cud.new").chmod(0o644)
    (db / "daily.cud.new").rename(db / "daily.cud")


def _hdb(data: bytes, name: str) -> str:
    return f"{hashlib.md5(data).hexdigest()}:{len(data)}:{name}"


def _clamd_command(clamd: Clamd, command: bytes) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(clamd.socket))
        sock.sendall(b"z" + command + b"\0")
        reply = b""
        while not reply.endswith(b"\0"):
            if not (chunk := sock.recv(4096)):
                break
            reply += chunk
    return reply.rstrip(b"\0").decode()


def _clamd_finds(engine: ClamavEngine, path: Path, data: bytes) -> bool:
    """Whether clamd (reloading in the background) judges `data` infected now."""
    import os

    from daemon.engines.base import ScanRequest
    from daemon.model import VerdictKind

    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        request = ScanRequest("inbox", path.name, str(path), fd, len(data),
                              hashlib.sha256(data).hexdigest(), "probe")
        return engine.scan(request).kind is VerdictKind.INFECTED
    finally:
        os.close(fd)


def test_a_clamd_database_reload_makes_the_next_copy_scanned_again(layout: Layout,
                                                                   tmp_path: Path) -> None:
    data = b"a document clamd learns about later"
    eicar = _hdb(EICAR, "Scanwatch-Test-EICAR")
    with running_clamd(populate=lambda db: _daily(7, db, [eicar])) as clamd:
        clock = [1000.0]
        engine_cfg = {"type": "clamav", "socket": str(clamd.socket)}
        engine = ClamavEngine("default", ClamavEngineConfig.model_validate(engine_cfg),
                              clock=lambda: clock[0])
        harness = Harness(layout, engine, engine_cfg=engine_cfg)
        assert "/7/" in engine.signatures().fingerprint
        with capture_logs() as logs:
            harness.drop("a.txt", data)
            harness.run()
            harness.drop("b.txt", data)
            harness.run()
        assert [e.get("cached", False) for e in _verdicts(logs)] == [False, True]
        _daily(8, Path(clamd.conf).parent / "db", [eicar, _hdb(data, "Scanwatch-Test-Later")])
        assert _clamd_command(clamd, b"RELOAD") == "RELOADING"
        wait_until(lambda: "/8/" in _clamd_command(clamd, b"VERSION"), what="the new database")
        clock[0] += 61  # the engine asks VERSION again
        with capture_logs() as logs:
            harness.drop("c.txt", data)
            harness.run()
        assert [e.get("cached", False) for e in _verdicts(logs)] == [False]
        assert harness.layout.placed("clean") == ["a.txt", "b.txt"]
        assert harness.layout.placed("quarantine") == ["c.txt"]
        assert harness.row("c.txt").threats == ["Scanwatch-Test-Later.UNOFFICIAL"]


# -- YARA: other rules on SIGHUP, and what status and metrics show ------------------------------

def _status(config: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--config", str(config),
                           "--json"], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def _moved(daemon: Daemon, count: int) -> None:
    daemon.wait_for(lambda: len(daemon.named("file.moved")) >= count, what=f"{count} files moved")


def test_yara_rules_reloaded_by_sighup_bypass_the_cache(layout: Layout, daemon_factory) -> None:
    rules = layout.base / "rules.yar"
    rules.write_text('rule Nothing_Yet { strings: $a = "no such text anywhere" condition: $a }\n')
    port = free_port()
    config = layout.write_config(engine={"rules": [str(rules)]},
                                 metrics={"listen": f"127.0.0.1:{port}"})
    daemon = daemon_factory(config)
    daemon.wait_started()
    data = b"a macro only tomorrow's rules know"
    (layout.inbox / "a.txt").write_bytes(data)
    _moved(daemon, 1)
    (layout.inbox / "b.txt").write_bytes(data)
    _moved(daemon, 2)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'scanwatch_cache_lookups_total{engine="default",result="hit"} 1.0' in body
    assert 'scanwatch_cache_lookups_total{engine="default",result="miss"} 1.0' in body
    rules.write_text('rule Tomorrows_Macro { strings: $a = "tomorrow\'s rules" condition: $a }\n')
    daemon.signal(signal.SIGHUP)
    daemon.wait_for(lambda: daemon.named("config.reloaded"), what="the reload")
    (layout.inbox / "c.txt").write_bytes(data)
    _moved(daemon, 3)
    assert daemon.stop() == 0
    verdicts = daemon.named("scan.verdict")
    assert [(e["rel_path"], e.get("cached", False)) for e in verdicts] == [
        ("a.txt", False), ("b.txt", True), ("c.txt", False)]
    assert layout.placed("clean") == ["a.txt", "b.txt"] and layout.placed("quarantine") == ["c.txt"]
    engine = _status(config)["engines"]["default"]
    assert engine["cache"] == {"enabled": True, "hits": 1, "misses": 2, "hit_rate": 0.3333}
    text = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "33% (1 of 3)" in text


def test_journal_keeps_at_most_max_entries_per_engine(tmp_path: Path) -> None:
    from daemon.journal import CachedVerdict, Journal
    from daemon.model import VerdictKind

    journal = Journal(tmp_path / "journal.sqlite3")
    for i in range(500):
        for engine in ("a", "b"):
            journal.cache_verdict(CachedVerdict(engine, "fp", f"{i:064x}", VerdictKind.CLEAN, None,
                                                (), None, None, time.time()), 100, time.time())
    assert 100 <= journal.verdicts.size("a") < 100 + 64 and 100 <= journal.verdicts.size("b") < 100 + 64
    assert journal.verdicts.get("a", "fp", f"{499:064x}") is not None  # the newest stay
    assert journal.verdicts.get("a", "fp", f"{0:064x}") is None  # the oldest went first


def test_a_landing_flight_makes_its_waiting_rows_due_at_once_and_no_other(tmp_path: Path) -> None:
    """Rows that found the flight of their bytes wait until it lands, not `_WAIT_S`: the
    flight's answer (or its failure) makes them due; rows waiting for other bytes, or for the
    same bytes with another engine, keep waiting."""
    from daemon.journal import CachedVerdict, Journal
    from daemon.model import VerdictKind

    journal = Journal(tmp_path / "journal.sqlite3")
    journal.discover("w", [(f"f{i}", i) for i in range(5)], 1.0)
    flyer, waiter, other_bytes, other_engine, failing = (r.id for r in journal.claim(["w"], "1:1", 2.0, 5))
    assert journal.take_flight("e", "aa", flyer, 2.0, 7.0) is None
    assert journal.take_flight("e", "aa", waiter, 2.0, 7.0) == flyer
    assert journal.take_flight("e", "bb", other_bytes, 2.0, 7.0) is None
    assert journal.take_flight("f", "aa", other_engine, 2.0, 7.0) is None
    assert journal.take_flight("e", "bb", failing, 2.0, 7.0) == other_bytes
    journal.apply([(i, {"state": FileState.STABLE, "owner": None}) for i in (waiter, failing)])

    journal.cache_verdict(CachedVerdict("e", "fp", "aa", VerdictKind.CLEAN, None, (), None, None, 3.0),
                          100, 3.0, flyer)
    due = {r.id: r.next_attempt_at for r in journal.rows()}
    assert due[waiter] == 3.0 and due[failing] == 7.0
    journal.end_flight("e", "bb", other_bytes, 4.0)
    assert journal.get(failing).next_attempt_at == 4.0  # type: ignore[union-attr]
    assert journal._conn().execute("SELECT count(*) FROM cache_waiters").fetchone()[0] == 0


def test_a_large_cache_is_evicted_once_per_sixteenth_of_its_size(tmp_path: Path) -> None:
    from daemon.journal import CachedVerdict, Journal
    from daemon.model import VerdictKind

    journal = Journal(tmp_path / "journal.sqlite3")
    evictions: list[str] = []
    journal.verdicts.size("a")  # this thread's connection exists: trace it
    next(iter(journal.verdicts._connections.values())).set_trace_callback(
        lambda sql: evictions.append(sql) if sql.startswith("DELETE FROM verdict_cache") else None)
    for i in range(1600 + 300):
        journal.cache_verdict(CachedVerdict("a", "fp", f"{i:064x}", VerdictKind.CLEAN, None, (), None,
                                            None, time.time()), 1600, time.time())
    # Each eviction reads 1 600 index entries: once per 100 stores, not once per 64.
    assert len(evictions) == 19
    assert 1600 <= journal.verdicts.size("a") < 1600 + 100


def test_several_engines_on_one_watch_cache_per_engine(layout: Layout, daemon_factory) -> None:
    # A mark only Blazelock's emulator detects: YARA says clean, Blazelock infected.
    data = b"junk EICAR-STANDARD-ANTIVIRUS-TEST-FILE junk"
    with BlazelockEmulator(scan_delay_s=0.5) as emulator:
        raw = layout.config(watch={"engine": ["default", "blz"]})
        raw["engines"]["blz"] = {"type": "blazelock", "url": emulator.url, "api_key": "test-key",
                                 "poll_interval": 0.1}
        layout.config_path.write_text(json.dumps(raw))
        daemon = daemon_factory(layout.config_path)
        daemon.wait_started()
        for i in range(5):
            (layout.inbox / f"copy{i}.bin").write_bytes(data)
        _moved(daemon, 5)
        assert daemon.stop() == 0
        assert len(emulator.submissions()) == 1
    assert layout.placed("quarantine") == [f"copy{i}.bin" for i in range(5)]
    sidecars = [json.loads((layout.quarantine / f"copy{i}.bin.scanwatch.json").read_text())
                for i in range(5)]
    assert sorted(bool(s.get("cached")) for s in sidecars) == [False] + [True] * 4
    for sidecar in sidecars:
        by_engine = {scan["engine"]: scan for scan in sidecar["scans"]}
        assert by_engine["blz"]["verdict"] == "infected"
        if sidecar.get("cached"):
            assert by_engine["blz"]["cached"] is True
            assert sidecar["cached_from"] == by_engine["blz"]["cached_from"]
    stats = open_journal(layout.state).verdicts.stats()
    assert stats["blz"] == (4, 1)
    assert sum(stats["default"]) == 5  # YARA answers at once: its copies may race past the flight


def test_cache_clear_makes_the_next_copy_scanned_again(layout: Layout, emulator: BlazelockEmulator) -> None:
    harness = _blazelock(layout, emulator)
    harness.drop("a.com", EICAR)
    harness.run()
    config = layout.write_config()
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "cache", "clear", "--engine", "default",
                           "--config", str(config)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "1 cached verdicts dropped"
    harness.drop("b.com", EICAR)
    harness.run()
    assert len(emulator.submissions()) == 2
    assert harness.layout.placed("quarantine") == ["a.com", "b.com"]


def test_rescan_clean_drops_a_verdict_the_new_signatures_overturn(layout: Layout) -> None:
    """A clamd with no official database names no database version: its clean verdicts are
    reused for `clean_ttl` whatever signatures it loads; a rescan that finds the bytes infected
    makes the next copy asked again."""
    import io

    from daemon.rescan import rescan_clean

    data = b"clean until the next signature update"
    with running_clamd() as clamd:
        engine_cfg = {"type": "clamav", "socket": str(clamd.socket)}
        engine = ClamavEngine("default", ClamavEngineConfig.model_validate(engine_cfg))
        harness = Harness(layout, engine, engine_cfg=engine_cfg)
        assert not engine.signatures().is_versioned
        harness.drop("a.txt", data)
        harness.run()
        db = Path(clamd.conf).parent / "db"
        (db / "later.hdb").write_text(_hdb(data, "Scanwatch-Test-Later") + "\n")
        assert _clamd_command(clamd, b"RELOAD") == "RELOADING"
        wait_until(lambda: _clamd_finds(engine, layout.base / "probe.txt", data), what="new signature")
        harness.drop("b.txt", data)
        harness.run()
        assert harness.layout.placed("clean") == ["a.txt", "b.txt"]  # the kept clean verdict
        summary = rescan_clean(harness.config, {"default": engine}, harness.journal, "inbox",
                               stream=io.StringIO())
        assert summary.counts["infected"] == 2
        harness.drop("c.txt", data)
        harness.run()
        assert harness.layout.placed("quarantine") == ["a.txt", "b.txt", "c.txt"]


def _old_journal(path: Path, entries: int) -> None:
    """A journal as made before the kept verdicts had a file of their own: its own tables."""
    from daemon.journal.migrations import SCHEMA

    conn = sqlite3.connect(path)
    for script in SCHEMA:
        conn.executescript(script)
    conn.execute(f"PRAGMA user_version = {len(SCHEMA)}")
    conn.executemany("INSERT INTO verdict_cache VALUES ('a', 'fp', ?, 'clean', NULL, '[]', ?, NULL, ?)",
                     [(f"{i:064x}", f"ref{i}", float(i)) for i in range(entries)])
    conn.execute("INSERT INTO cache_stats VALUES ('a', 7, ?, ?)", (entries, entries))
    conn.commit()
    conn.close()


def test_verdicts_kept_in_an_older_journal_are_copied_to_their_own_file_once(tmp_path: Path) -> None:
    from daemon.journal import VERDICTS_FILE, CachedVerdict, Journal
    from daemon.model import VerdictKind

    _old_journal(tmp_path / "journal.sqlite3", 300)
    for again in (False, True):  # opened again: nothing is copied twice, counts not added twice
        journal = Journal(tmp_path / "journal.sqlite3")
        assert journal.verdicts.stats() == {"a": (7, 300)}
        assert journal.verdicts.size("a") == 300
        entry = journal.verdicts.get("a", "fp", f"{5:064x}")
        assert entry is not None and (entry.verdict, entry.ref_id) == (VerdictKind.CLEAN, "ref5")
        assert journal.verdicts.get("a", "fp", f"{1000:064x}") is None
        journal.close()
        if not again:  # a daemon of the older version, still running, keeps verdicts in its tables
            with sqlite3.connect(tmp_path / "journal.sqlite3") as old:
                old.execute("INSERT INTO verdict_cache VALUES ('a', 'fp', ?, 'clean', NULL, '[]', "
                            "'late', NULL, 1.0)", (f"{1000:064x}",))
                old.execute("UPDATE cache_stats SET hits = hits + 1")
    assert (tmp_path / VERDICTS_FILE).exists()
    journal = Journal(tmp_path / "journal.sqlite3")
    # Their order came along: the oldest go first.
    for i in range(300, 400):
        journal.cache_verdict(CachedVerdict("a", "fp", f"{i:064x}", VerdictKind.CLEAN, None, (), None,
                                            None, float(i)), 200, float(i))
    assert journal.verdicts.get("a", "fp", f"{399:064x}") is not None
    assert journal.verdicts.get("a", "fp", f"{0:064x}") is None


def test_a_verdict_is_kept_while_another_process_holds_the_journals_lock(tmp_path: Path) -> None:
    """The kept verdicts are written under their own writers' lock, never the journal's
    (bench/RESULTS.md: they were a quarter of what the journal's lock serialised)."""
    from daemon.journal import CachedVerdict, Journal, KeptVerdict
    from daemon.model import VerdictKind

    journal = Journal(tmp_path / "journal.sqlite3")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from daemon.journal import Journal\n"
         f"j = Journal({str(tmp_path / 'journal.sqlite3')!r})\n"
         "with j._tx():\n    print('held', flush=True); time.sleep(30)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        entry = CachedVerdict("a", "fp", "ab" * 32, VerdictKind.INFECTED, None, ("T",), "r", None, 1.0)
        started = time.monotonic()
        journal.verdicts.keep([KeptVerdict(entry, 100, 1.0, None)], is_miss=True)
        assert time.monotonic() - started < 5
        assert journal.verdicts.get("a", "fp", "ab" * 32) == entry
        assert journal.verdicts.stats() == {"a": (0, 1)}
    finally:
        holder.kill()
        holder.wait()


def test_kept_verdicts_count_in_the_journals_size(tmp_path: Path) -> None:
    """`scanwatch_journal_bytes` watches the disk the journal takes, its kept verdicts too."""
    from daemon.journal import CachedVerdict, Journal, KeptVerdict
    from daemon.model import VerdictKind

    journal = Journal(tmp_path / "journal.sqlite3")
    before = journal.size_bytes()
    journal.verdicts.keep([KeptVerdict(CachedVerdict("a", "fp", f"{i:064x}", VerdictKind.CLEAN, None, (),
                                                     "ref", None, 1.0), 100_000, 1.0, None)
                           for i in range(2000)], is_miss=True)
    assert journal.size_bytes() > before + 2000 * 128  # two 64-character hex keys an entry
