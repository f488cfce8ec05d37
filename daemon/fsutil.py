"""Safe file-system primitives: walk beneath a root without following links, move without overwriting.

Every path below a watched root is opened one component at a time with
`O_NOFOLLOW`, so a directory swapped for a symlink mid-flight can never lead
outside the root (a drop-folder user may create any name they like).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from daemon.errors import UnsafePathError
from daemon.model import Reason, RowChanges
from daemon.naming import collision_name

__all__ = [
    "DirCache",
    "Identity",
    "classify",
    "open_below",
    "open_dir",
    "open_file",
    "put_back",
    "rename_noreplace",
    "same_bytes",
    "sha256_fd",
]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


@dataclass(frozen=True)
class Identity:
    """What must not change between a scan and a move: inode and every timestamp."""

    dev: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        """The identity of a stat result."""
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def settles_at(self, settle_s: float, now: float) -> float:
        """When a file of this identity is complete: once its mtime and ctime are `settle_s`
        old (docs/contract.md, "Arrival and settle"); times ahead of `now` (a network
        filesystem's clock) count as `now`, so that such a file is not held for ever."""
        return min(max(self.mtime_ns, self.ctime_ns) / 1e9, now) + settle_s

    def columns(self) -> RowChanges:
        """As the journal's columns."""
        return {"dev": self.dev, "inode": self.inode, "size": self.size,
                "mtime_ns": self.mtime_ns, "ctime_ns": self.ctime_ns}


_HASH_CHUNK = 1 << 20


def sha256_fd(fd: int, size: int | None = None) -> str:
    """sha256 of an open file's whole content, read with pread (the offset is untouched).

    `size`: the file's size where nobody else can write to it (a snapshot in the staging
    directory, docs/integrity.md): read up to it, without the read that finds the end."""
    digest = hashlib.sha256()
    offset = 0
    while size is None or offset < size:
        chunk = os.pread(fd, _HASH_CHUNK if size is None else min(_HASH_CHUNK, size - offset), offset)
        if not chunk:
            break
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def same_bytes(fd: int, size: int | None, sha256: str | None) -> bool:
    """Whether `fd` holds exactly `size` bytes that hash to `sha256`. A file of another size
    is not read: one grown since (a sparse terabyte is a `truncate` away) costs no hashing."""
    return (size is not None and sha256 is not None and os.fstat(fd).st_size == size
            and sha256_fd(fd, size) == sha256)


def classify(st: os.stat_result) -> Reason | None:
    """Why a file must be left alone (symlink, hardlink, special file), or None."""
    if stat.S_ISLNK(st.st_mode):
        return Reason.SYMLINK
    if not stat.S_ISREG(st.st_mode):
        return Reason.SPECIAL_FILE
    if st.st_nlink > 1:
        return Reason.HARDLINK
    return None


def open_dir(root: str, dirs: list[str], *, create_mode: int | None = None) -> int:
    """An fd of `root/dirs...`, never following a symlink below root; create missing dirs if asked."""
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        return open_below(root_fd, dirs, create_mode=create_mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePathError(f"{exc.filename!r} below {root} is not a plain directory") from exc
        raise
    finally:
        os.close(root_fd)


def open_below(dir_fd: int, dirs: Iterable[str], *, create_mode: int | None = None) -> int:
    """A new fd of `dirs...` below the directory `dir_fd` (left open), opened one component at a
    time with `O_NOFOLLOW`: a symlink or file on the way fails with ELOOP or ENOTDIR. Missing
    directories are created with `create_mode` if it is given (else FileNotFoundError)."""
    fd = os.dup(dir_fd)
    try:
        for name in dirs:
            child = _open_child(fd, name, create_mode)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_child(dir_fd: int, name: str, create_mode: int | None) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        if create_mode is None:
            raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, create_mode, dir_fd=dir_fd)
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


class DirCache:
    """Directory fds opened beneath their roots, kept for one batch of work; not thread-safe.

    `sync_later`: a directory given to `changed` is fsynced by `sync` (once for the whole
    batch, before its journal commit), not at once.
    """

    def __init__(self, *, sync_later: bool = False) -> None:
        self._fds: dict[tuple[str, tuple[str, ...]], int] = {}
        self._sync_later = sync_later
        self._unsynced: set[int] = set()

    def open(self, root: str, dirs: list[str], *, create_mode: int | None = None) -> int:
        """The fd of `root/dirs...` (see `open_dir`); owned by the cache, do not close it."""
        key = (root, tuple(dirs))
        fd = self._fds.get(key)
        if fd is None:
            if create_mode is not None:
                try:
                    os.makedirs(root, mode=create_mode, exist_ok=True)
                except FileExistsError:  # makedirs says so when the root is a file
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory", root) from None
            fd = self._fds[key] = open_dir(root, dirs, create_mode=create_mode)
        return fd

    def changed(self, fd: int) -> None:
        """A name was added to the directory `fd` (one of ours): fsync it now, or at `sync`."""
        if self._sync_later:
            self._unsynced.add(fd)
        else:
            os.fsync(fd)

    def sync(self) -> None:
        """fsync each directory changed since the last `sync`."""
        while self._unsynced:
            os.fsync(self._unsynced.pop())

    def close(self) -> None:
        """fsync what is still unsynced, close every cached fd."""
        try:
            self.sync()
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._unsynced.clear()

    def __enter__(self) -> DirCache:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@contextmanager
def open_file(dir_fd: int, name: str, *, links_ok: bool = False) -> Iterator[tuple[int, os.stat_result]]:
    """Open a regular, singly-linked file in `dir_fd` for reading, with its fstat.

    Raises UnsafePathError (its `reason` says which) for a symlink, hardlink or
    special file, checked on lstat before opening and on fstat after. `links_ok`: a
    file with other names is opened too (its bytes are copied, never moved).
    """
    before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if (reason := classify(before)) and not (links_ok and reason is Reason.HARDLINK):
        raise UnsafePathError(f"{name!r} is a {reason.value}", reason)
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"{name!r} is a symlink", Reason.SYMLINK) from exc
        raise
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise UnsafePathError(f"{name!r} was replaced while opening", Reason.SPECIAL_FILE)
        if (reason := classify(st)) and not (links_ok and reason is Reason.HARDLINK):
            raise UnsafePathError(f"{name!r} is a {reason.value}", reason)
        yield fd, st
    finally:
        os.close(fd)


def rename_noreplace(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
    """Rename without ever replacing `dst` (FileExistsError if it exists); EXDEV across filesystems."""
    if _renameat2 is not None:
        if _renameat2(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), dst)
    # No renameat2 here (old kernel or a filesystem without it): link fails on an existing name.
    os.link(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
    os.unlink(src, dir_fd=src_dir)


def put_back(dir_fd: int, name: str, to_dir: int, to_name: str) -> str:
    """Rename `name` back to `to_name`, or to its first free collision name; returns the name used."""
    for n in range(10_000):
        candidate = collision_name(to_name, n)
        try:
            rename_noreplace(dir_fd, name, to_dir, candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free name to put the file back", to_name)
