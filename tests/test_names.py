"""Every name the kernel accepts (any bytes but `/` and NUL, up to 255) is scanned and placed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EICAR, ROOT, Daemon, Harness, Layout
from fakes import FakeEngine
from hypothesis import given
from hypothesis import strategies as st

from daemon.config import S3Config
from daemon.errors import UnsafePathError
from daemon.locations.inplace import verdict_tags
from daemon.locations.local import LocalLocation
from daemon.locations.s3 import S3Location
from daemon.model import FileState
from daemon.naming import NAME_MAX, collision_name, flat_name, local_rel, printable
from daemon.refid import build_ref_id
from daemon.s3url import tag_value

SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

# A kernel name: any bytes but `/` and NUL, 1..255 of them, as the daemon sees it (os.fsdecode);
# many near the limit, where a suffix must cut the stem (1-, 2-, 4-byte characters).
_LONG = st.sampled_from(["", "x" * 230, "é" * 120, "\U0001f600" * 60, "日本" * 40])
raw_names = st.tuples(_LONG.map(os.fsencode), st.binary(min_size=1, max_size=NAME_MAX)).map(
    lambda t: (t[0] + t[1]).replace(b"/", b"_").replace(b"\0", b"_")[-NAME_MAX:]
).filter(lambda b: b not in (b".", b".."))
utf8_names = st.tuples(_LONG, st.text(st.characters(blacklist_characters="/\0",
                                                    blacklist_categories=("Cs",)), min_size=1)).map(
    lambda t: t[0] + t[1]).filter(lambda s: len(s.encode()) <= NAME_MAX and s not in (".", ".."))
numbers = st.integers(min_value=1, max_value=10_000)


@given(st.one_of(raw_names.map(os.fsdecode), utf8_names), numbers, numbers)
def test_collision_names_fit_and_differ(name: str, n: int, m: int) -> None:
    first, second = collision_name(name, n), collision_name(name, m)
    assert len(os.fsencode(first)) <= NAME_MAX
    assert first != name and (first == second) == (n == m)
    assert "/" not in first and "\0" not in first


@given(utf8_names, numbers)
def test_a_utf8_name_stays_utf8_and_keeps_its_extension(name: str, n: int) -> None:
    result = collision_name(name, n)
    assert len(result.encode()) <= NAME_MAX  # and never a multi-byte character cut in two
    stem, dot, ext = name.rpartition(".")
    if dot and stem and len((dot + ext).encode()) <= 200:
        assert result.endswith(f".{n}.{ext}") and name.startswith(result[: -len(f".{n}.{ext}")])


@pytest.mark.parametrize(("name", "n", "expected"), [
    ("a.tar.gz", 1, "a.tar.1.gz"),
    ("same.txt", 2, "same.2.txt"),
    ("README", 1, "README.1"),
    ("c" * 251 + ".txt", 1, "c" * 249 + ".1.txt"),
    ("é" * 125 + ".txt", 10, "é" * 124 + ".10.txt"),  # 2-byte characters: never cut in half
])
def test_collision_examples(name: str, n: int, expected: str) -> None:
    assert collision_name(name, n) == expected


def test_printable_names_keep_one_line() -> None:
    assert printable("a\nb\\c\td.txt") == "a\\nb\\\\c\\td.txt"
    assert printable(os.fsdecode(b"bad\xff\xfe.txt")) == "bad\\xff\\xfe.txt"
    assert printable("\x1b[31m\u202eé ok") == "\\x1b[31m\\u202eé ok"


def test_tag_values_keep_only_what_s3_allows_everywhere() -> None:
    """One sanitizer for every tag scanwatch writes: ASCII letters, digits and ` +-=._:/@`."""
    assert tag_value("Eicar-Test-Signature é✓ a_b:/@=+.") == "Eicar-Test-Signature __ a_b:/@=+."
    assert tag_value("x" * 300) == "x" * 256
    tags = verdict_tags("infected", "naïve", "2026-01-01T00:00:00Z", "W32/é" * 100)
    assert tags["scanwatch-reason"] == "na_ve" and tags["scanwatch-threat"] == tag_value("W32/é" * 100)


def test_non_utf8_names_get_sanitized_ref_ids_hashing_the_bytes() -> None:
    one, two = os.fsdecode(b"bad\xff.txt"), os.fsdecode(b"bad\xfe.txt")
    ids = {build_ref_id("w", one, SHA), build_ref_id("w", two, SHA)}
    assert len(ids) == 2
    for ref_id in ids:
        assert ref_id.startswith("w:bad_.txt#9f86d081884c@") and ref_id.isascii()


def test_non_utf8_names_are_local_paths_but_not_s3_keys() -> None:
    name = os.fsdecode(b"dir/bad\xff.txt")
    assert local_rel(name) == name
    assert flat_name(name) == "dir%2Fbad%FF%2Etxt"
    with pytest.raises(UnsafePathError):
        S3Location("s3://bucket/failed/", None, S3Config()).plan(name)


def test_an_error_while_planning_never_hands_the_batch_back(layout: Layout, monkeypatch) -> None:
    harness = Harness(layout, FakeEngine())
    plan = LocalLocation.plan

    def broken(self: LocalLocation, rel_path: str, *, taken: bool = False) -> str:
        if "boom" in rel_path:
            raise RuntimeError("a bug in planning")
        return plan(self, rel_path, taken=taken)

    monkeypatch.setattr(LocalLocation, "plan", broken)
    for i in range(5):
        harness.drop(f"ok{i}.txt", b"fine")
    harness.drop("boom.txt", b"fine")
    harness.step()  # one pass: the bad row waits its turn, the others are placed
    assert len(layout.placed("clean")) == 5
    row = harness.row("boom.txt")
    assert row.state is FileState.VERDICT and row.owner is None  # type: ignore[attr-defined]
    assert row.next_attempt_at > harness.clock.now  # type: ignore[attr-defined]
    assert "a bug in planning" in row.last_error  # type: ignore[attr-defined]


# -- the daemon, on real directories ---------------------------------------------------------


def _status(layout: Layout) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--json", "--config",
                          str(layout.config_path)], capture_output=True, cwd=ROOT, timeout=60, check=True)
    return dict(json.loads(out.stdout.decode()))


def _no_internal_errors(daemon: Daemon) -> None:
    assert daemon.named("file.internal_error") == [] and daemon.named("worker.error") == []
    assert daemon.named("raw") == []  # every log line was UTF-8 JSON


def test_a_255_byte_name_that_collides_lands_shortened(layout: Layout, daemon_factory) -> None:
    name = "c" * 251 + ".txt"
    layout.clean.mkdir()
    (layout.clean / name).write_bytes(b"first")
    daemon = daemon_factory(layout.write_config())
    daemon.wait_started()
    (layout.inbox / name).write_bytes(b"second")
    daemon.wait_for(lambda: daemon.named("file.moved"), what="the file moved")
    shortened = "c" * 249 + ".1.txt"
    assert sorted(layout.placed("clean")) == sorted([name, shortened])
    assert (layout.clean / shortened).read_bytes() == b"second"
    assert daemon.stop() == 0
    _no_internal_errors(daemon)


def test_names_that_are_not_utf8_are_scanned_and_placed(layout: Layout, daemon_factory) -> None:
    inbox = os.fsencode(layout.inbox)
    for i in range(30):
        (layout.inbox / f"plain{i}.txt").write_bytes(b"plain %d" % i)
    with open(inbox + b"/bad\xff\xfe.txt", "wb") as f:
        f.write(b"harmless")
    with open(inbox + b"/eicar\xff.com", "wb") as f:
        f.write(EICAR)
    daemon = daemon_factory(layout.write_config())
    daemon.wait_for(lambda: len(daemon.named("file.moved")) >= 32, timeout=60, what="32 files moved")
    assert daemon.stop() == 0
    _no_internal_errors(daemon)
    assert os.listdir(inbox) == []
    assert b"bad\xff\xfe.txt" in os.listdir(os.fsencode(layout.clean))
    assert len(os.listdir(layout.clean)) == 31
    assert sorted(os.listdir(os.fsencode(layout.quarantine))) == [
        b"eicar\xff.com", b"eicar\xff.com.scanwatch.json"]
    sidecar = json.loads((layout.quarantine / "eicar\udcff.com.scanwatch.json").read_bytes())
    assert sidecar["threats"] == ["EICAR_Test_File"]
    assert sidecar["source"] == str(layout.inbox) + "/eicar\udcff.com"  # JSON's `\udcff` escape
    assert sidecar["external_reference_id"].startswith("inbox:eicar_.com#")
    moved = {e["rel_path"] for e in daemon.named("file.moved")}
    assert {"bad\udcff\udcfe.txt", "eicar\udcff.com"} <= moved
    watch = _status(layout)["watches"]["inbox"]  # type: ignore[index]
    assert watch["outcomes"] == {"clean": 31, "infected": 1} and watch["states"] == {"done": 32}


def test_quarantine_list_shows_a_name_with_a_newline_on_one_row(layout: Layout, daemon_factory) -> None:
    (layout.inbox / "evil\nname.com").write_bytes(EICAR)
    daemon = daemon_factory(layout.write_config())
    daemon.wait_for(lambda: daemon.named("file.moved"), what="the file moved")
    assert daemon.stop() == 0
    _no_internal_errors(daemon)
    base = [sys.executable, "-m", "daemon.cli", "quarantine", "list", "--config", str(layout.config_path)]
    table = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, timeout=60, check=True)
    rows = table.stdout.splitlines()
    assert len(rows) == 1 and "evil\\nname.com" in rows[0] and "EICAR_Test_File" in rows[0]
    lines = subprocess.run([*base, "--json"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                           check=True).stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["rel_path"] == "evil\nname.com"


def test_cli_json_keeps_a_non_utf8_name_exact(tmp_path: Path) -> None:
    from daemon.cli import _json

    text = _json({"rel_path": os.fsdecode(b"bad\xff-\xc3\xa9.txt")})
    assert text == '{"rel_path": "bad\\udcff-é.txt"}'
    assert json.loads(text.encode().decode())["rel_path"] == os.fsdecode(b"bad\xff-\xc3\xa9.txt")
