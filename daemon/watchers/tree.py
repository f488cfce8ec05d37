"""Walking a local source tree through directory descriptors, never by full path.

Every directory is opened relative to its parent's descriptor with
`O_NOFOLLOW | O_DIRECTORY`, so a tree deeper than PATH_MAX is walked like any
other, and a directory swapped for a symlink mid-walk is not entered (the shape
of CPython's `shutil._rmtree_safe_fd`). Descriptors are held only along the
current path, so a walk holds at most one per level.

A subtree that cannot be walked (permissions, too many open files...) is handed
to `on_skip` and left out; the rest of the tree is still walked.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Generator, Iterator

from daemon.fsutil import Identity, classify, open_below

__all__ = ["OnSkip", "stat_below", "walk"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Vanished, replaced by a file, or replaced by a symlink while we looked: nothing to report,
# the next sweep sees what is there now.
_RACES = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})

OnSkip = Callable[[str, OSError], None]


def _join(rel_dir: str, name: str) -> str:
    return f"{rel_dir}/{name}" if rel_dir else name


def _parts(rel_dir: str) -> list[str]:
    """The components of `rel_dir` ("" = none: the root itself)."""
    return rel_dir.split("/") if rel_dir else []


def stat_below(root_fd: int, rel_path: str) -> os.stat_result:
    """lstat of `rel_path` below `root_fd`, without following a symlink on the way."""
    parent, _, name = rel_path.rpartition("/")
    if not parent:  # in the root itself: its descriptor is the one to look below
        return os.stat(name, dir_fd=root_fd, follow_symlinks=False)
    fd = open_below(root_fd, _parts(parent))
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)


def is_below(root_fd: int, rel_path: str) -> bool:
    """Whether something is at `rel_path` below `root_fd` (a symlink on the way: nothing is);
    any other error is raised."""
    try:
        stat_below(root_fd, rel_path)
    except OSError as exc:
        if exc.errno in _RACES:
            return False
        raise
    return True


def _list(fd: int, rel_dir: str, keep: Callable[[str], bool], on_skip: OnSkip,
          seen: dict[str, Identity] | None) -> Generator[tuple[str, int], None, list[str]]:
    """Yield `(rel_path, inode)` of the files in `fd`; return the names of its subdirectories."""
    subdirs: list[str] = []
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                rel = _join(rel_dir, entry.name)
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.name)
                    elif keep(rel):
                        if seen is not None:
                            st = entry.stat(follow_symlinks=False)
                            if classify(st) is None:
                                seen[rel] = Identity.of(st)
                        yield rel, entry.inode()
                except OSError:
                    continue
    except OSError as exc:
        if exc.errno not in _RACES:
            on_skip(rel_dir, exc)
    return subdirs


def walk(root_fd: int, keep: Callable[[str], bool], on_skip: OnSkip, top: str = "",
         seen: dict[str, Identity] | None = None) -> Iterator[tuple[str, int]]:
    """`(rel_path, inode)` of every kept non-directory below `top` of the tree at `root_fd`.

    Symlinked directories are not entered. Relative paths may be longer than PATH_MAX.
    `seen`, if given, gets the identity of each plain file's `lstat` (made below its
    directory's descriptor) before the file is yielded: discovery records it with it, stable
    at once if it has settled already (daemon/watchers/local.py).
    """
    try:
        fd = open_below(root_fd, _parts(top))
    except OSError as exc:
        if exc.errno not in _RACES:
            on_skip(top, exc)
        return
    frames: list[tuple[str, int, list[str]]] = [(top, fd, [])]
    try:
        frames[-1] = (top, fd, (yield from _list(fd, top, keep, on_skip, seen)))
        while frames:
            rel_dir, fd, subdirs = frames[-1]
            if not subdirs:
                frames.pop()
                os.close(fd)
                continue
            rel = _join(rel_dir, subdirs.pop())
            try:
                child = os.open(rel.rpartition("/")[2], _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in _RACES:
                    on_skip(rel, exc)
                continue
            frames.append((rel, child, []))
            frames[-1] = (rel, child, (yield from _list(child, rel, keep, on_skip, seen)))
    finally:
        for _, fd, _ in frames:
            os.close(fd)
