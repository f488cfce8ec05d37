"""Journal retention (docs/operations.md, "Journal retention"): old finished rows go, what
still needs a row keeps it, and `status` counts the same before and after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import EICAR, ROOT, Layout, wait_until

from daemon.config import IN_PLACE
from daemon.journal import Journal
from daemon.model import SeenObject
from daemon.quarantine import list_quarantined

DAY = 86400.0
NOW = 1_900_000_000.0
OLD = NOW - 100 * DAY  # past the cutoff below
CUTOFF = NOW - 90 * DAY


def _journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path / "state" / "journal.sqlite3")


def _row(rel: str, state: str = "done", at: float = OLD, **columns: Any) -> dict[str, Any]:
    return {"watch": "w", "rel_path": rel, "state": state, "next_attempt_at": at, "discovered_at": at,
            "done_at": at if state in ("done", "gone") else None, "updated_at": at, **columns}


def _ids(journal: Journal) -> dict[str, int]:
    return {row.rel_path: row.id for row in journal.rows(limit=10_000)}


def _count(journal: Journal, table: str) -> int:
    return int(journal._conn().execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def test_old_finished_rows_go_what_is_needed_stays_and_the_counts_do_not_change(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    journal.restore([
        _row("clean-1", verdict="clean"), _row("clean-2", verdict="clean"),
        _row("failed", verdict="error", reason="engine_unavailable"),
        _row("gone", state="gone"),
        _row("recent", at=NOW - DAY, verdict="clean"),
        _row("waiting", state="verdict", verdict="clean"),  # its move retried since long ago
        _row("ignored", state="held", reason="ignored"),
        _row("quarantined", verdict="infected", threats=["EICAR"]),
        _row("released", verdict="infected", disposition="released"),
        _row("key", verdict="clean", dest_root=IN_PLACE, etag="e1", last_modified=OLD - 10),
        _row("key", verdict="clean", dest_root=IN_PLACE, etag="e2", last_modified=OLD),
        _row("rescanning", verdict="clean"), _row("rescanned", verdict="clean"),
    ])
    ids = _ids(journal)
    conn = journal._conn()
    conn.execute("INSERT INTO scans (file_id, engine, sha256) VALUES (?, 'yara', 'x')", (ids["clean-1"],))
    journal.audit(ids["released"], "release", "ops", "false positive", None, {}, OLD)
    journal.audit(ids["quarantined"], "show", "ops", "looked", None, {}, OLD)
    finished, _ = journal.rescan("w", OLD)
    journal.rescan_record(finished, "rescanned", "clean", ids["rescanned"])
    journal.rescan_finish(finished, OLD)
    under_way, _ = journal.rescan("w", NOW)
    journal.rescan_record(under_way, "rescanning", "moving", ids["rescanning"], {"to": "quarantine"})
    before = journal.counts()

    removed = journal.prune(CUTOFF)

    assert removed == 7
    left = journal.rows(limit=100)
    assert sorted(r.rel_path for r in left) == ["ignored", "key", "quarantined", "recent", "rescanning",
                                                "waiting"]
    assert next(r.etag for r in left if r.rel_path == "key") == "e2"  # the newest outcome of the key
    assert journal.counts() == before
    assert _count(journal, "scans") == 0
    assert [a.action for a in journal.audit_trail(ids["quarantined"])] == ["show"]
    assert _count(journal, "audit") == 1
    assert [r[0] for r in conn.execute("SELECT id FROM rescans")] == [under_way]  # the finished one went
    assert [r.rel_path for r in list_quarantined(journal)] == ["quarantined"]
    # What stayed for a reason does its job: the object judged in place is not an arrival again.
    assert journal.discover_objects("w", [SeenObject("key", "e2", None, 1, OLD)], NOW, listed_at=NOW) == []
    # A second pass finds nothing more, and counts nothing twice.
    assert journal.prune(CUTOFF) == 0
    assert journal.counts() == before


def test_a_pass_told_to_stop_ends_at_a_transaction_and_the_next_one_finishes(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    journal.restore(_row(f"f{i}", verdict="clean") for i in range(2500))
    before = journal.counts()
    asked: list[int] = []
    assert journal.prune(CUTOFF, go_on=lambda: bool(asked.append(1))) == 1000
    assert asked == [1] and len(journal.rows(limit=10_000)) == 1500
    assert journal.counts() == before
    assert journal.prune(CUTOFF) == 1500
    assert journal.rows(limit=10) == [] and journal.counts() == before
    journal.restore([_row("later", verdict="clean")])  # counted beside the removed ones
    assert journal.counts() == [("w", "done", "clean", None, 2501)]


def _status(config: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--json", "--config", str(config)],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out))


def test_the_daemon_prunes_what_it_finished_beside_its_workers(layout: Layout, daemon_factory) -> None:
    config = layout.write_config(journal={"keep": "1s"}, workers=2, log={"format": "json", "level": "info"})
    daemon = daemon_factory(config)
    daemon.wait_started()
    for i in range(40):
        (layout.inbox / f"clean-{i:02d}.txt").write_bytes(b"hello %d" % i)
    (layout.inbox / "eicar.com").write_bytes(EICAR)
    daemon.wait_for(lambda: len(daemon.named("file.moved")) == 41, what="41 files moved")
    journal = Journal(layout.state / "journal.sqlite3")
    wait_until(lambda: [r.rel_path for r in journal.rows()] == ["eicar.com"], timeout_s=10,
               what="every row but the quarantined one removed")
    daemon.wait_for(lambda: sum(p["rows"] for p in daemon.named("journal.pruned")) == 40,
                    what="journal.pruned of 40 rows")
    assert daemon.named("journal.pruned")[0]["finished_before"].endswith("Z")
    status = _status(config)["watches"]["inbox"]
    assert status["states"] == {"done": 41} and status["outcomes"] == {"clean": 40, "infected": 1}
    time.sleep(1.5)  # another pass or two: nothing more to remove, nothing counted twice
    assert sum(p["rows"] for p in daemon.named("journal.pruned")) == 40
    assert _status(config)["watches"]["inbox"]["states"] == {"done": 41}
    assert daemon.stop() == 0
    assert len(layout.placed("clean")) == 40 and layout.placed("quarantine") == ["eicar.com"]


def test_kill_9_in_a_pass_loses_no_count_and_the_next_start_finishes_it(layout: Layout,
                                                                        daemon_factory) -> None:
    config = layout.write_config(log={"format": "json", "level": "info"})  # the default keep, 90 days
    old = time.time() - 100 * DAY
    journal = Journal(layout.state / "journal.sqlite3")
    journal.restore(_row(f"f{i:06d}", at=old, verdict="clean", watch="inbox") for i in range(200_000))
    before = _status(config)["watches"]["inbox"]["states"]
    assert before == {"done": 200_000}
    first = daemon_factory(config)
    first.wait_started()
    wait_until(lambda: _count(journal, "files") < 200_000, what="a pass under way")
    first.proc.kill()
    first.proc.wait()
    left = _count(journal, "files")
    assert 0 < left < 200_000 and not first.named("journal.pruned")
    assert _status(config)["watches"]["inbox"]["states"] == before
    assert journal.quick_check() is None
    second = daemon_factory(config)
    second.wait_for(lambda: second.named("journal.pruned"), what="journal.pruned")
    assert second.named("journal.pruned")[0]["rows"] == left
    assert journal.rows(limit=10) == []
    assert _status(config)["watches"]["inbox"]["states"] == before
    assert second.stop() == 0


def test_links_an_uploader_makes_and_removes_leave_nothing_behind(layout: Layout, daemon_factory) -> None:
    """Held paths no longer there are gone at the next sweep, then removed by retention; one
    still there stays held and is reported once (docs/contract.md, "Symlinks, hardlinks and
    special files")."""
    config = layout.write_config(journal={"keep": "1s"}, log={"format": "json", "level": "info"})
    daemon = daemon_factory(config)
    daemon.wait_started()
    for i in range(30):
        (layout.inbox / f"link-{i:02d}").symlink_to("/etc/passwd")
    os.mkfifo(layout.inbox / "pipe")
    daemon.wait_for(lambda: len(daemon.named("file.skipped")) == 31, what="31 paths held")
    assert _status(config)["watches"]["inbox"]["skipped"] == {"symlink": 30, "special_file": 1}
    for i in range(29):
        (layout.inbox / f"link-{i:02d}").unlink()
    journal = Journal(layout.state / "journal.sqlite3")
    wait_until(lambda: sorted(r.rel_path for r in journal.rows()) == ["link-29", "pipe"], timeout_s=15,
               what="the removed links gone, then removed")
    assert all(r.state == "held" for r in journal.rows())
    assert _status(config)["watches"]["inbox"]["skipped"] == {"symlink": 1, "special_file": 1}
    (layout.inbox / "link-00").symlink_to("/etc/passwd")  # a new link under an old name: news
    daemon.wait_for(lambda: len(daemon.named("file.skipped")) == 32, what="the new link held")
    time.sleep(2.5)  # another sweep: what is still there is not reported again
    assert sorted(e["rel_path"] for e in daemon.named("file.skipped")) == sorted(
        [f"link-{i:02d}" for i in range(30)] + ["link-00", "pipe"])
    assert daemon.stop() == 0
