"""External reference IDs: contract examples and properties."""

from __future__ import annotations

import hashlib
import re

from hypothesis import given
from hypothesis import strategies as st

from daemon.refid import MAX_LENGTH, build_ref_id

SHA = hashlib.sha256(b"x").hexdigest()
_ALLOWED = re.compile(r"[A-Za-z0-9._:/#@-]+")

names = st.from_regex(r"[a-z0-9_-]{1,20}", fullmatch=True)
paths = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                min_size=1, max_size=400)
shas = st.binary(min_size=1, max_size=8).map(lambda b: hashlib.sha256(b).hexdigest())


def test_contract_example() -> None:
    sha = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    assert build_ref_id("invoices", "2026/11/a.pdf", sha) == "invoices:2026/11/a.pdf#9f86d081884c"


def test_resubmissions_get_a_generation_suffix() -> None:
    assert build_ref_id("w", "a.pdf", SHA, 2) == f"w:a.pdf#{SHA[:12]}.2"


def test_unsafe_characters_are_replaced_and_the_id_gets_a_digest() -> None:
    ref = build_ref_id("w", "dir with space/ü.pdf", SHA)
    assert ref.startswith("w:dir_with_space/_.pdf#")
    raw = f"w:dir with space/ü.pdf#{SHA[:12]}"
    assert ref.endswith("@" + hashlib.sha256(raw.encode()).hexdigest()[:12])


def test_long_ids_keep_their_tail() -> None:
    ref = build_ref_id("w", "a" * 300 + "/end.pdf", SHA)
    assert len(ref) == MAX_LENGTH
    assert f"/end.pdf#{SHA[:12]}@" in ref


@given(names, paths, shas, st.integers(1, 5))
def test_ids_use_the_allowed_charset_and_length(watch: str, rel: str, sha: str, gen: int) -> None:
    ref = build_ref_id(watch, rel, sha, gen)
    assert _ALLOWED.fullmatch(ref)
    assert len(ref) <= MAX_LENGTH


@given(st.tuples(names, paths, shas, st.integers(1, 3)),
       st.tuples(names, paths, shas, st.integers(1, 3)))
def test_distinct_inputs_give_distinct_ids(a: tuple, b: tuple) -> None:
    # Only the first 12 hex of the hash are part of the ID, by contract.
    if (a[0], a[1], a[2][:12], a[3]) != (b[0], b[1], b[2][:12], b[3]):
        assert build_ref_id(*a) != build_ref_id(*b)


@given(paths)
def test_near_miss_paths_never_collide(rel: str) -> None:
    # Paths that sanitize to the same text ("a b" and "a_b") still get distinct IDs.
    sanitized = re.sub(r"[^A-Za-z0-9._:/#@-]", "_", rel)
    if sanitized != rel:
        assert build_ref_id("w", rel, SHA) != build_ref_id("w", sanitized, SHA)
