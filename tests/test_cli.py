"""The one-shot and operator commands: scan, status, quarantine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EICAR, ROOT, Layout

from daemon.cli import main
from daemon.journal import open_journal


def _scan(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "scan", "--config", str(config), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_scan_exit_codes_clean_infected_failed(layout: Layout, tmp_path: Path) -> None:
    config = layout.write_config()
    clean = tmp_path / "clean.txt"
    clean.write_bytes(b"fine")
    infected = tmp_path / "eicar.com"
    infected.write_bytes(EICAR)
    link = tmp_path / "link"
    link.symlink_to(clean)
    assert _scan(config, str(clean)).returncode == 0
    result = _scan(config, str(clean), str(infected))
    assert result.returncode == 1
    assert f"{infected}: infected (EICAR_Test_File)" in result.stdout
    result = _scan(config, str(clean), str(infected), str(link), str(tmp_path / "missing"))
    assert result.returncode == 3
    assert f"{link}: failed (symlink)" in result.stdout
    assert f"{tmp_path / 'missing'}: failed (unreadable)" in result.stdout
    assert clean.exists() and infected.exists()  # scan alone moves nothing


def test_scan_of_a_sparse_terabyte_fails_too_large_unread(layout: Layout, tmp_path: Path) -> None:
    """Larger than every engine's `max_size`: refused from its size, never hashed (an hour)."""
    huge = tmp_path / "huge.bin"
    with open(huge, "wb") as f:
        f.truncate(1 << 40)
    result = _scan(layout.write_config(), "--json", str(huge))
    assert result.returncode == 3
    record = json.loads(result.stdout)
    assert (record["verdict"], record["reason"], record["sha256"]) == ("failed", "too_large", None)


def test_scan_json_lines(layout: Layout, tmp_path: Path) -> None:
    target = tmp_path / "eicar.com"
    target.write_bytes(EICAR)
    result = _scan(layout.write_config(), "--json", "--watch", "inbox", str(target))
    [line] = result.stdout.splitlines()
    record = json.loads(line)
    assert record["verdict"] == "infected" and record["threats"] == ["EICAR_Test_File"]
    assert record["external_reference_id"].startswith("inbox:eicar.com#")
    assert record["destination"] is None


def test_stdout_holds_one_json_object_per_file_and_the_log_goes_to_stderr(layout: Layout) -> None:
    """`scan --json` prints one object per file (docs/contract.md): with `--move`, the log
    records of the files it carries (`scan.verdict`, `file.moved`) were on stdout among them."""
    config = layout.write_config(log={"format": "json", "level": "info"})
    (layout.inbox / "e.com").write_bytes(EICAR)
    (layout.inbox / "ok.txt").write_bytes(b"ok")
    result = _scan(config, "--move", "--json", str(layout.inbox / "e.com"), str(layout.inbox / "ok.txt"))
    assert result.returncode == 1, result.stderr
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(Path(p["path"]).name, p["verdict"]) for p in printed] == [
        ("e.com", "infected"), ("ok.txt", "clean")]
    logged = [json.loads(line)["event"] for line in result.stderr.splitlines()]
    assert logged.count("file.moved") == 2 and logged.count("scan.verdict") == 2
    status = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--json", "--config", str(config)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert json.loads(status.stdout)["watches"]["inbox"]["outcomes"] == {"clean": 1, "infected": 1}


def test_scan_move_handles_files_as_the_daemon_would(layout: Layout) -> None:
    (layout.inbox / "sub").mkdir()
    (layout.inbox / "sub" / "e.com").write_bytes(EICAR)
    (layout.inbox / "ok.txt").write_bytes(b"ok")
    result = _scan(layout.write_config(), "--move", str(layout.inbox / "sub" / "e.com"),
                   str(layout.inbox / "ok.txt"))
    assert result.returncode == 1, result.stderr
    assert f"-> {layout.quarantine / 'sub' / 'e.com'}" in result.stdout
    assert layout.placed("quarantine") == ["sub/e.com"] and layout.placed("clean") == ["ok.txt"]
    assert (layout.quarantine / "sub" / "e.com.scanwatch.json").exists()
    rows = open_journal(layout.state).rows()
    assert {(r.rel_path, r.state.value, r.verdict) for r in rows} == {
        ("sub/e.com", "done", "infected"), ("ok.txt", "done", "clean")}


def test_status_json_matches_the_journal(layout: Layout, capsys) -> None:
    config = layout.write_config()
    (layout.inbox / "a.txt").write_bytes(b"a")
    (layout.inbox / "e.com").write_bytes(EICAR)
    os.link(layout.inbox / "a.txt", layout.inbox / "b.txt")
    assert main(["scan", "--config", str(config), "--move", str(layout.inbox / "e.com"),
                 str(layout.inbox / "a.txt"), str(layout.inbox / "b.txt")]) == 3
    capsys.readouterr()
    assert main(["status", "--config", str(config), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    watch = status["watches"]["inbox"]
    assert watch["outcomes"] == {"infected": 1}
    assert watch["skipped"] == {"hardlink": 2}
    assert status["engines"]["default"]["type"] == "yara"
    assert main(["status", "--config", str(config)]) == 0
    assert "inbox" in capsys.readouterr().out


@pytest.fixture
def quarantined(layout: Layout) -> tuple[Path, int]:
    config = layout.write_config()
    (layout.inbox / "dir").mkdir()
    (layout.inbox / "dir" / "e.com").write_bytes(EICAR)
    assert main(["scan", "--config", str(config), "--move", str(layout.inbox / "dir" / "e.com")]) == 1
    [row] = open_journal(layout.state).rows()
    return config, row.id


def test_quarantine_list_and_show(layout: Layout, quarantined, capsys) -> None:
    config, file_id = quarantined
    capsys.readouterr()
    assert main(["quarantine", "list", "--config", str(config), "--json", "--threat", "EICAR"]) == 0
    [item] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert item["id"] == file_id and item["rel_path"] == "dir/e.com"
    assert main(["quarantine", "list", "--config", str(config), "--threat", "nothing-like-it"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["quarantine", "show", str(file_id), "--config", str(config)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["sidecar"]["verdict"] == "infected" and shown["audit"] == []


def test_release_moves_to_clean_with_audit(layout: Layout, quarantined, capsys) -> None:
    config, file_id = quarantined
    assert main(["quarantine", "release", str(file_id), "--config", str(config),
                 "--reason", "false positive"]) == 0
    assert layout.placed("quarantine") == [] and layout.placed("clean") == ["dir/e.com"]
    assert not (layout.quarantine / "dir" / "e.com.scanwatch.json").exists()
    [audit] = open_journal(layout.state).audit_trail(file_id)
    assert (audit.action, audit.reason) == ("release", "false positive")
    assert main(["quarantine", "release", str(file_id), "--config", str(config),
                 "--reason", "again", "--force"]) == 2


def test_release_and_delete_take_the_contract_arguments_only(layout: Layout, quarantined,
                                                             tmp_path: Path) -> None:
    """`quarantine release ID [--to DEST]` and `quarantine delete ID` (docs/contract.md), as a
    script calls them: the real command, no other flag; both audited in the journal and the log."""
    config, file_id = quarantined
    (layout.inbox / "f.com").write_bytes(EICAR)
    assert main(["scan", "--config", str(config), "--move", str(layout.inbox / "f.com")]) == 1
    other = max(r.id for r in open_journal(layout.state).rows())
    cli = [sys.executable, "-m", "daemon.cli", "quarantine"]
    released = subprocess.run([*cli, "release", str(file_id), "--to", str(tmp_path / "out"),
                               "--config", str(config)], capture_output=True, text=True, cwd=ROOT,
                              timeout=60)
    assert released.returncode == 0, released.stderr
    assert (tmp_path / "out" / "dir" / "e.com").read_bytes() == EICAR
    deleted = subprocess.run([*cli, "delete", str(other), "--config", str(config)],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert deleted.returncode == 0, deleted.stderr
    assert layout.placed("quarantine") == []
    journal = open_journal(layout.state)
    assert [a.action for a in journal.audit_trail(file_id)] == ["release"]
    assert [a.action for a in journal.audit_trail(other)] == ["delete"]
    logged = [json.loads(line) for line in (released.stderr + deleted.stderr).splitlines()
              if line.startswith("{")]
    assert [(e["event"], e["file_id"]) for e in logged if e["event"].startswith("quarantine.")] == [
        ("quarantine.released", file_id), ("quarantine.deleted", other)]


def test_delete_removes_file_and_sidecar_with_audit(layout: Layout, quarantined) -> None:
    config, file_id = quarantined
    assert main(["quarantine", "delete", str(file_id), "--config", str(config), "--reason", "malware"]) == 0
    assert not any(layout.quarantine.rglob("*.*"))
    journal = open_journal(layout.state)
    assert journal.get(file_id).disposition == "deleted"
    assert [a.action for a in journal.audit_trail(file_id)] == ["delete"]


def test_scan_move_beside_a_running_daemon_places_each_file_once(layout: Layout, daemon_factory) -> None:
    """`scan --move` is safe beside the daemon (docs/contract.md, "Command line"): whichever of
    the two takes a file, it lands once, and `scan` reports where (a file the daemon placed
    while `scan` ran was reported `failed` `unreadable`, exit 3)."""
    config = layout.write_config(watch={"settle_seconds": 0.6})
    daemon = daemon_factory(config)
    daemon.wait_started()
    names = [f"f{i:03d}.txt" for i in range(400)] + ["e.com"]
    for name in names:
        (layout.inbox / name).write_bytes(EICAR if name == "e.com" else name.encode())
    result = _scan(config, "--move", "--json", *(str(layout.inbox / n) for n in names))
    assert result.returncode == 1, result.stderr
    reported = {Path(r["path"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert set(reported) == set(names)
    assert reported["e.com"]["destination"] == str(layout.quarantine / "e.com")
    assert all(reported[n]["destination"] == str(layout.clean / n) for n in names[:-1])
    assert daemon.stop() == 0
    assert layout.placed("clean") == names[:-1] and layout.placed("quarantine") == ["e.com"]
    rows = open_journal(layout.state).rows()
    assert sorted(r.rel_path for r in rows) == sorted(names)  # one row each: none scanned twice
