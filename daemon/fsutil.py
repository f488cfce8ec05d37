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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from daemon.errors import UnsafePathError
from daemon.model import Reason, RowChanges

__all__ = [
    "NAME_MAX",
    "DirCache",
    "Identity",
    "sha256_fd",
    "classify",
    "collision_name",
    "open_dir",
    "open_file",
    "put_back",
    "printable",
    "rel_parts",
    "rename_noreplace",
    "split_rel",
]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_RENAME_NOREPLACE = 1
NAME_MAX = 255  # bytes in one file name (Linux)
_MIN_STEM_ROOM = 24  # a stem byte and `.<n>` for any n: an extension longer than the rest is no extension
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

    def columns(self) -> RowChanges:
        """As the journal's columns."""
        return {"dev": self.dev, "inode": self.inode, "size": self.size,
                "mtime_ns": self.mtime_ns, "ctime_ns": self.ctime_ns}


def sha256_fd(fd: int) -> str:
    """sha256 of an open file's whole content, read with pread (the offset is untouched)."""
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def rel_parts(rel_path: str) -> list[str]:
    """The components of a relative path; raise UnsafePathError for `..`, absolute or empty parts."""
    parts = rel_path.split("/")
    if not rel_path or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise UnsafePathError(f"unsafe relative path {rel_path!r}", Reason.UNSAFE_PATH)
    return parts


def split_rel(rel_path: str) -> tuple[list[str], str]:
    """Directory components and basename of a safe relative path."""
    parts = rel_parts(rel_path)
    return parts[:-1], parts[-1]


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
    fd = os.open(root, _DIR_FLAGS)
    try:
        for name in dirs:
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if create_mode is None:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, create_mode, dir_fd=fd)
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePathError(f"{name!r} below {root} is not a plain directory") from exc
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


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


def collision_name(name: str, n: int) -> str:
    """`a.tar.gz` → `a.tar.<n>.gz`, `README` → `README.<n>`; n = 0 keeps the name.

    The result fits NAME_MAX (255 bytes): a long stem is cut, by whole characters (a byte
    that is not UTF-8 counts as one, see `os.fsdecode`), to make room for the suffix. The
    extension is kept unless it alone leaves no room (then the whole name is the stem).
    Every n gives another name: all are the same stem's prefixes followed by `.<n>`.
    """
    if n == 0:
        return name
    suffix = f".{n}"
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or _nbytes(dot + ext) > NAME_MAX - _MIN_STEM_ROOM:
        stem, ext = name, ""
    else:
        ext = dot + ext
    room = NAME_MAX - _nbytes(suffix + ext)
    return _head(stem, room) + suffix + ext


def _nbytes(text: str) -> int:
    """The length of a name on disk, in bytes."""
    return len(os.fsencode(text))


def _head(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` of at most `max_bytes` bytes, cut between characters."""
    if _nbytes(text) <= max_bytes:
        return text
    used = 0
    for i, char in enumerate(text):
        used += _nbytes(char)
        if used > max_bytes:
            return text[:i]
    return text


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(name: str) -> str:
    """A name on one line for people, escaped as `ls -b` does: `\\n`, `\\\\`, `\\xff` for a
    byte that is not UTF-8 (see `os.fsdecode`), `\\x1b` or `\\u202e` for other unprintables."""
    return "".join(_escape(char) for char in name)


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable():
        return char
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the raw byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


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
