"""The staging directory: snapshots of local files, private to the daemon (docs/integrity.md).

A snapshot is the copy of a settled file that scanwatch scans and places: made from the
original's descriptor into `<staging>/<file_id>.snap` (0600; `O_TMPFILE` then linked), by a reflink
(`FICLONE`, free on XFS and Btrfs) or else `copy_file_range`. Nobody else ever opened it,
and nobody else can write to it or reach it by another name: the directory is the
daemon's own, 0700 when created, and refused when it is another user's or group/other
writable. It lives on the source's filesystem, so a reflink works and the original can be
captured into it by rename (`<file_id>.orig`): `<state_dir>/staging` when state_dir is on
that filesystem, else `<source root>/.scanwatch-staging` (never an arrival).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from daemon.errors import StagingError

__all__ = ["IN_SOURCE", "NO_TMPFILE", "Staging", "StagingDirs", "copy_into", "orig_name", "snap_name"]

log = structlog.get_logger("scanwatch.staging")

IN_SOURCE = ".scanwatch-staging"  # the staging directory's name in a source root
# `O_TMPFILE` is not supported there (or not by this kernel).
NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT)
_FICLONE = 0x40049409  # ioctl: share the source file's extents (linux/fs.h)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_COPY_CHUNK = 1 << 30
_READ_CHUNK = 1 << 20
_DENSE_HEAD = 1 << 20  # copied whole; past it, only the ranges that hold data (`_copy_sparse`)
# Filesystems (st_dev) that answered FICLONE "not supported": every copy there is a copy.
_NO_REFLINK: set[int] = set()


def snap_name(file_id: int) -> str:
    """A row's snapshot in staging."""
    return f"{file_id}.snap"


def orig_name(file_id: int) -> str:
    """A row's captured original in staging."""
    return f"{file_id}.orig"


@dataclass(frozen=True)
class Staging:
    """An opened staging directory: its held descriptor, path and filesystem."""

    fd: int
    path: str
    dev: int

    def snapshot(self, src_fd: int, file_id: int) -> tuple[int, str]:
        """A new snapshot of `src_fd` (the original's open descriptor): a read-only fd of it
        (what engines get), and how it was made (`reflink`, `copy_file_range` or `read`).
        A stale one is replaced.

        Made as a file without a name (`O_TMPFILE`), filled, then linked to its name: the
        inode is allocated without the directory's lock, which the other workers' snapshots
        and moves would wait for (ext4 without a journal scans its recently deleted inodes
        then, bench/RESULTS.md "Issue 21"), and the name never shows a partial copy.
        """
        name = snap_name(file_id)
        try:
            out = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno not in NO_TMPFILE:
                raise
            return self._snapshot_named(src_fd, name)
        try:
            how = copy_into(src_fd, out, self.dev)
            try:
                self._link(out, name)
            except FileExistsError:
                self.unlink(name)
                self._link(out, name)
        finally:
            os.close(out)
        return self._open_new(name), how

    def _link(self, fd: int, name: str) -> None:
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=self.fd, follow_symlinks=True)

    def _snapshot_named(self, src_fd: int, name: str) -> tuple[int, str]:
        """`snapshot` where the filesystem has no `O_TMPFILE`."""
        try:
            out = os.open(name, _NEW_FILE, 0o600, dir_fd=self.fd)
        except FileExistsError:
            self.unlink(name)
            out = os.open(name, _NEW_FILE, 0o600, dir_fd=self.fd)
        try:
            how = copy_into(src_fd, out, self.dev)
        except BaseException:
            self.unlink(name)
            raise
        finally:
            os.close(out)
        return self._open_new(name), how

    def _open_new(self, name: str) -> int:
        """A read-only fd of the snapshot just made; the name is removed if that fails."""
        try:
            return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except BaseException:
            self.unlink(name)
            raise

    def open(self, name: str) -> int | None:
        """A read-only descriptor of `name` here, None if there is none."""
        try:
            return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            return None

    def unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def exists(self, name: str) -> bool:
        """Whether `name` is here (as itself, not followed): a lookup that raises nothing
        when it is not (a Python exception costs more than the lookup, asked per file)."""
        return os.access(name, os.F_OK, dir_fd=self.fd, follow_symlinks=False)

    def discard(self, name: str) -> None:
        """`unlink` where `name` is most likely gone already: an unlink takes the directory's
        lock, which the other workers' snapshots wait for; a lookup does not."""
        if self.exists(name):
            self.unlink(name)


def copy_into(src_fd: int, dst_fd: int, dev: int | None = None) -> str:
    """Fill the empty `dst_fd` with `src_fd`'s bytes, by reflink where the filesystem can.

    `dev`: `dst_fd`'s filesystem, when known; one that cannot reflink at all is not asked
    again (a failed ioctl per file)."""
    if dev not in _NO_REFLINK:
        try:
            fcntl.ioctl(dst_fd, _FICLONE, src_fd)
            return "reflink"
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EPERM):
                raise
            if dev is not None and exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
                _NO_REFLINK.add(dev)  # the filesystem's answer; EINVAL and EPERM may be the file's
    try:
        _copy_sparse(src_fd, dst_fd, lambda offset, count: os.copy_file_range(
            src_fd, dst_fd, min(count, _COPY_CHUNK), offset, offset))
        return "copy_file_range"
    except OSError as exc:
        if (exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
                or os.fstat(dst_fd).st_size):
            raise

    def read_write(offset: int, count: int) -> int:
        data = os.pread(src_fd, min(count, _READ_CHUNK), offset)
        view = memoryview(data)
        while view:
            written = os.pwrite(dst_fd, view, offset)
            view, offset = view[written:], offset + written
        return len(data)

    _copy_sparse(src_fd, dst_fd, read_write)
    return "read"


def _copy_sparse(src_fd: int, dst_fd: int, copy: Callable[[int, int], int]) -> None:
    """Copy `src_fd` into `dst_fd` by `copy(offset, count)` (the bytes it copied, 0 at the
    end): the first MiB as it is (a small file costs no more system calls), then only the
    ranges that hold data (`SEEK_DATA`), the holes between them left holes. A sparse file's
    size costs its uploader nothing; its copy must not cost the daemon's disk its size
    (a terabyte of holes filling the state filesystem)."""
    offset = _copy_span(copy, 0, _DENSE_HEAD)
    if offset < _DENSE_HEAD:  # the end came first
        return
    while True:
        try:
            start = os.lseek(src_fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            break  # nothing but a hole (or nothing) past `offset`
        offset = _copy_span(copy, start, os.lseek(src_fd, start, os.SEEK_HOLE))
        if offset == start:  # cut short by the file's end
            break
    os.ftruncate(dst_fd, max(offset, os.fstat(src_fd).st_size))  # a hole at the end too


def _copy_span(copy: Callable[[int, int], int], start: int, end: int) -> int:
    """`copy` from `start` up to `end` or the file's end, whichever comes first: where it stopped."""
    while start < end and (copied := copy(start, end - start)):
        start += copied
    return start


class StagingDirs:
    """The staging directory of each local source root, opened once and held."""

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = Path(state_dir)
        self._lock = threading.Lock()
        self._open: dict[str, Staging] = {}

    def for_source(self, root: str) -> Staging:
        """The staging directory for files of the source `root` (StagingError: unusable)."""
        with self._lock:
            if (staging := self._open.get(root)) is None:
                staging = self._open[root] = self._resolve(root)
            return staging

    def opened(self) -> dict[str, Staging]:
        """The staging directories opened so far, by source root."""
        with self._lock:
            return dict(self._open)

    def close(self) -> None:
        with self._lock:
            for staging in {s.fd: s for s in self._open.values()}.values():
                os.close(staging.fd)
            self._open.clear()

    def _resolve(self, root: str) -> Staging:
        source_dev = os.stat(root).st_dev
        for staging in self._open.values():
            if staging.dev == source_dev:  # one per filesystem
                return staging
        self._state_dir.mkdir(parents=True, exist_ok=True)
        if os.stat(self._state_dir).st_dev == source_dev:
            path = str(self._state_dir / "staging")
        else:
            path = os.path.join(root, IN_SOURCE)
        return _open_private(path, source_dev)


def _open_private(path: str, dev: int) -> Staging:
    """Open (creating, 0700) a staging directory; refuse one that is not the daemon's alone."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as exc:
        raise StagingError(f"staging directory {path} cannot be opened ({exc.strerror}); "
                           "it must be a plain directory, not a symlink") from exc
    st = os.fstat(fd)
    problem = None
    if st.st_uid != os.geteuid():
        problem = f"it is owned by uid {st.st_uid}, not the daemon's ({os.geteuid()})"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"it is group or other writable (mode {stat.S_IMODE(st.st_mode):o})"
    elif st.st_dev != dev:
        problem = "it is on another filesystem than the source"
    if problem:
        os.close(fd)
        log.error("staging.refused", path=path, problem=problem)
        raise StagingError(f"staging directory {path} is refused: {problem}; remove it or fix "
                           "its owner and mode (0700, docs/integrity.md)")
    return Staging(fd, path, dev)
