"""The direct inotify reader against a real directory tree (Linux)."""

from __future__ import annotations

import os
import resource
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until

from daemon.watchers import inotify

pytestmark = pytest.mark.skipif(not inotify.available(), reason="no inotify here")


class Seen:
    def __init__(self) -> None:
        self.paths: list[str] = []
        self.root_events = 0
        self.lock = threading.Lock()

    def path(self, paths: set[str]) -> None:
        with self.lock:
            self.paths.extend(paths)

    def root(self) -> None:
        with self.lock:
            self.root_events += 1


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, Seen]]:
    root = tmp_path / "root"
    (root / "old" / "deeper").mkdir(parents=True)
    seen = Seen()
    reader = inotify.InotifyReader(str(root), seen.path, seen.root)
    reader.start()
    try:
        yield root, seen
    finally:
        reader.stop()


def test_files_written_and_renamed_in_are_reported_once_closed(watched: tuple[Path, Seen],
                                                               tmp_path: Path) -> None:
    root, seen = watched
    (root / "a.txt").write_bytes(b"a")
    (tmp_path / "b.txt").write_bytes(b"b")
    os.rename(tmp_path / "b.txt", root / "old" / "deeper" / "b.txt")  # a directory there at start
    wait_until(lambda: str(root / "old" / "deeper" / "b.txt") in seen.paths, what="the rename")
    assert str(root / "a.txt") in seen.paths  # created, then closed after writing
    assert seen.root_events == 0


def test_a_new_directory_is_swept_and_then_watched(watched: tuple[Path, Seen]) -> None:
    root, seen = watched
    (root / "new").mkdir()
    wait_until(lambda: str(root / "new") + "/" in seen.paths, what="the directory")
    (root / "new" / "c.txt").write_bytes(b"c")
    wait_until(lambda: str(root / "new" / "c.txt") in seen.paths, what="the file in it")


def test_a_directory_renamed_within_the_tree_reports_its_new_names(watched: tuple[Path, Seen]) -> None:
    root, seen = watched
    os.rename(root / "old", root / "renamed")
    wait_until(lambda: str(root / "renamed") + "/" in seen.paths, what="the renamed directory")
    (root / "renamed" / "deeper" / "d.txt").write_bytes(b"d")
    wait_until(lambda: str(root / "renamed" / "deeper" / "d.txt") in seen.paths, what="d.txt")


def test_the_root_deleted_or_moved_away_is_reported(watched: tuple[Path, Seen], tmp_path: Path) -> None:
    root, seen = watched
    os.rename(root, tmp_path / "elsewhere")
    wait_until(lambda: seen.root_events >= 1, what="the root moved away")


def test_a_root_that_is_not_a_directory_cannot_be_watched(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    reader = inotify.InotifyReader(str(tmp_path / "file"), lambda _: None, lambda: None)
    with pytest.raises(OSError):
        reader.start()
    reader.stop()


def test_events_are_read_when_descriptors_past_1023_are_in_use(tmp_path: Path) -> None:
    """A busy daemon holds more than 1024 descriptors: the reader's own are then past
    select()'s limit (it raised ValueError and the thread died)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} leaves no room past 1024 descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    root = tmp_path / "root"
    root.mkdir()
    seen = Seen()
    reader = inotify.InotifyReader(str(root), seen.path, seen.root)
    try:
        reader.start()
        (root / "a.txt").write_bytes(b"a")
        wait_until(lambda: str(root / "a.txt") in seen.paths, what="the event")
    finally:
        reader.stop()
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_events_of_one_read_are_handed_over_once_each_path_once(tmp_path: Path) -> None:
    """A file written in place is created, then closed: one path, one hand-over per read (the
    watcher's lock and wake-up are taken once, not once per event)."""
    import struct

    def event(mask: int, name: bytes) -> bytes:
        padded = name + b"\0" * (16 - len(name))
        return struct.pack("iIII", 1, mask, 0, len(padded)) + padded

    calls: list[set[str]] = []
    reader = inotify.InotifyReader(str(tmp_path), calls.append, lambda: None)
    try:
        reader._dirs[1] = os.fsencode(tmp_path)
        reader._handle(event(inotify.IN_CREATE, b"a.txt") + event(inotify.IN_CLOSE_WRITE, b"a.txt")
                       + event(inotify.IN_MOVED_TO, b"b.txt"))
    finally:
        reader.stop()
    assert calls == [{str(tmp_path / "a.txt"), str(tmp_path / "b.txt")}]
