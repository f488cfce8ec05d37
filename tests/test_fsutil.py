"""Relative paths, collision names and no-overwrite renames."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon import fsutil
from daemon.errors import UnsafePathError
from daemon.fsutil import open_dir, rename_noreplace, sha256_fd
from daemon.naming import collision_name, rel_parts
from daemon.watchers.base import relative_path

segments = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
                   min_size=1, max_size=40).filter(lambda s: s not in (".", ".."))


@given(st.lists(segments, min_size=1, max_size=8))
def test_relative_path_round_trips_below_the_root(parts: list[str]) -> None:
    root = "/srv/drop"
    rel = "/".join(parts)
    assert relative_path(root, os.path.join(root, rel)) == rel
    assert rel_parts(rel) == parts


@given(st.lists(st.sampled_from(["..", ".", "", "a", "b"]), min_size=1, max_size=6))
def test_relative_path_never_escapes(parts: list[str]) -> None:
    root = "/srv/drop"
    rel = relative_path(root, os.path.normpath(os.path.join(root, *parts)))
    if rel is not None:
        assert not rel.startswith("..") and not os.path.isabs(rel)
        assert os.path.normpath(os.path.join(root, rel)).startswith(root + "/")


@pytest.mark.parametrize("rel", ["", "/etc/passwd", "a/../../b", "a//b", "./a", "a/\0b", ".."])
def test_unsafe_relative_paths_are_refused(rel: str) -> None:
    with pytest.raises(UnsafePathError):
        rel_parts(rel)


@pytest.mark.parametrize(("name", "n", "expected"), [
    ("a.tar.gz", 1, "a.tar.1.gz"), ("same.txt", 1, "same.1.txt"), ("README", 1, "README.1"),
    ("same.txt", 0, "same.txt"), ("x.pdf", 12, "x.12.pdf")])
def test_collision_names_follow_the_contract(name: str, n: int, expected: str) -> None:
    assert collision_name(name, n) == expected


def test_rename_noreplace_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(FileExistsError):
            rename_noreplace(fd, "a", fd, "b")
        rename_noreplace(fd, "a", fd, "c")
    finally:
        os.close(fd)
    assert (tmp_path / "b").read_text() == "b" and (tmp_path / "c").read_text() == "a"


def test_open_dir_refuses_a_symlinked_component(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(UnsafePathError):
        open_dir(str(tmp_path), ["link"])
    os.close(open_dir(str(tmp_path), ["real", "new"], create_mode=0o700))
    assert (tmp_path / "real" / "new").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("length", [0, 4096, (1 << 20) + 5])
def test_sha256_fd_reads_up_to_a_known_size_without_the_read_at_the_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, length: int) -> None:
    data = os.urandom(length)
    (tmp_path / "f").write_bytes(data)
    reads: list[int] = []
    pread = os.pread

    def counted(fd: int, n: int, offset: int) -> bytes:
        reads.append(n)
        return pread(fd, n, offset)

    monkeypatch.setattr(fsutil.os, "pread", counted)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert sha256_fd(fd) == sha256_fd(fd, length) == hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)
    whole = -(-length // (1 << 20))  # the reads that carry bytes
    assert len(reads) == (whole + 1) + whole
