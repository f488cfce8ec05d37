"""A local directory as a Location: every path below it opened without following symlinks."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, BinaryIO

import structlog

from daemon.errors import ChangedError, LocationError, UnsafePathError
from daemon.faults import pause
from daemon.fsutil import (
    DirCache,
    Identity,
    classify,
    collision_name,
    open_file,
    put_back,
    rename_noreplace,
    sha256_fd,
    split_rel,
    write_lease,
)
from daemon.journal import RowChanges
from daemon.locations.base import (
    CHUNK,
    MAX_COLLISIONS,
    SIDECAR_SUFFIX,
    Content,
    Listed,
    MoveRequest,
    Opened,
    Source,
    Verified,
    json_bytes,
)
from daemon.s3 import local_rel

__all__ = ["LocalLocation"]

log = structlog.get_logger("scanwatch.locations")

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class LocalLocation:
    """A local directory; every path below it is opened without following symlinks."""

    settles = True

    def __init__(self, root: str, dirs: DirCache) -> None:
        self.url = root
        self._dirs = dirs

    def name(self, rel_path: str) -> str:
        return os.path.join(self.url, rel_path)

    def plan(self, rel_path: str, *, taken: bool = False) -> str:
        dirs, base = split_rel(local_rel(rel_path))
        try:
            dir_fd = self._dirs.open(self.url, dirs)
        except FileNotFoundError:
            return "/".join([*dirs, base])  # a new directory: every name is free
        for n in range(MAX_COLLISIONS):
            candidate = collision_name(base, n)
            if not _exists(dir_fd, candidate):
                return "/".join([*dirs, candidate])
        raise LocationError(f"{self.name(rel_path)}: more than {MAX_COLLISIONS} files named like it")

    def _dir(self, rel_path: str, private: bool | None = None) -> tuple[int, str]:
        """The fd of `rel_path`'s directory (created when `private` is given) and its basename."""
        parents, base = split_rel(rel_path)
        mode = None if private is None else 0o700 if private else 0o777
        return self._dirs.open(self.url, parents, create_mode=mode), base

    @contextmanager
    def open_for_scan(self, listed: Listed) -> Iterator[Opened]:
        dir_fd, base = self._dir(listed.rel_path)
        with open_file(dir_fd, base) as (fd, st):
            yield _OpenedFile(self.name(listed.rel_path), fd, st)

    def refuses(self, rel_path: str) -> str | None:
        try:
            local_rel(rel_path)
        except UnsafePathError as exc:
            return str(exc)
        return None

    def identity_now(self, rel_path: str) -> Identity | None:
        dir_fd, base = self._dir(rel_path)
        return Identity.of(os.stat(base, dir_fd=dir_fd, follow_symlinks=False))

    def remove(self, req: MoveRequest) -> None:
        """Remove the scanned inode from `req.rel_path`, never another file put at its name.

        There is no "unlink if this inode" call: the name is captured (renamed to a private
        `.scanwatch-<id>.del` and checked) and only the scanned inode is unlinked.
        """
        try:
            dir_fd, _ = self._dir(req.rel_path)
        except (FileNotFoundError, UnsafePathError):
            return
        trash = f".scanwatch-{req.file_id}.del"
        if not _is_inode(dir_fd, trash, req.identity):  # else captured before a crash
            try:
                self.capture(req, dir_fd, trash)
            except (FileNotFoundError, ChangedError):
                return  # moved by a rename, or a new file by that name: not ours to remove
        os.unlink(trash, dir_fd=dir_fd)
        os.fsync(dir_fd)

    def holds(self, req: MoveRequest) -> bool:
        try:
            dir_fd, base = self._dir(req.dest_rel)
        except (FileNotFoundError, UnsafePathError):
            return False
        st = _lstat(dir_fd, base)
        if st is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_temp_name(req.file_id), dir_fd=dir_fd)
            return False
        if req.identity is not None and (st.st_dev, st.st_ino) == (req.identity.dev, req.identity.inode):
            return True  # renamed here
        if st.st_size != req.size or req.sha256 is None or classify(st) is not None:
            return False
        with open_file(dir_fd, base) as (fd, _):
            if sha256_fd(fd) != req.sha256:
                return False
        # Copied here: the captured original, if a crash left it, is ours to drop.
        if _is_inode(dir_fd, _capture_name(req.file_id), req.identity):
            os.unlink(_capture_name(req.file_id), dir_fd=dir_fd)
        return True

    @contextmanager
    def open_scanned(self, req: MoveRequest) -> Iterator[tuple[int, os.stat_result]]:
        """A descriptor of the scanned file and its fstat (ChangedError if it is another)."""
        dir_fd, base = self._dir(req.rel_path)
        # Another name for the file (a hardlink made after the scan) does not matter here:
        # the bytes are copied from this descriptor, and checked against the scanned hash.
        with open_file(dir_fd, base, links_ok=True) as (fd, st):
            if req.identity is None or not _same_file(st, req.identity):
                raise ChangedError(f"{self.name(req.rel_path)} changed since it was scanned")
            yield fd, st

    @contextmanager
    def open_bytes(self, req: MoveRequest) -> Iterator[BinaryIO]:
        with self.open_scanned(req) as (fd, _), os.fdopen(os.dup(fd), "rb", buffering=0) as raw:
            yield io.BufferedReader(Verified(raw, req, self.name(req.rel_path)), CHUNK)

    def receive(self, req: MoveRequest, source: Source) -> bool:
        dest_dir, dest_name = self._dir(req.dest_rel, private=req.private)
        if not isinstance(source, LocalLocation):
            with source.open_bytes(req) as reader:
                self._write_new(req, reader, dest_dir, dest_name, 0o600 if req.private else 0o666, None)
            return False
        try:
            self._move_local(req, source, dest_dir, dest_name)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # Across filesystems: a verified copy from the descriptor; `transfer` removes the source.
            with source.open_scanned(req) as (fd, st):
                self._promote_copy(req, fd, st, dest_dir, dest_name)
        return False

    def _move_local(self, req: MoveRequest, source: LocalLocation, dest_dir: int, dest_name: str) -> None:
        """Move the scanned inode, never whatever its name points to by now (docs/integrity.md).

        The source name is renamed to `.scanwatch-<id>.move` beside the destination first
        (the capture); only if that is the scanned inode does it go on, else it is put back
        into the source as a new arrival. EXDEV: across filesystems, the caller copies.
        """
        captured = _capture_name(req.file_id)
        if not _is_inode(dest_dir, captured, req.identity):  # else captured before a crash
            source.capture(req, dest_dir, captured)
            pause("move.captured")
        try:
            self._promote(req, dest_dir, captured, dest_name)
        except ChangedError:
            source.restore(req, dest_dir, captured)
            raise

    def capture(self, req: MoveRequest, to_dir: int, to_name: str) -> None:
        """Rename the scanned file to `to_dir/to_name` (same filesystem), checking it is that inode.

        FileNotFoundError: no file, or no plain path, at `req.rel_path` any more. ChangedError:
        another file was there (it was put back, nothing moved).
        """
        identity = req.identity
        try:
            dir_fd, base = self._dir(req.rel_path)
        except UnsafePathError as exc:  # a directory on the way was swapped for a link
            raise FileNotFoundError(errno.ENOENT, str(exc), self.name(req.rel_path)) from exc
        st = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
        if identity is None or not _same_file(st, identity):
            raise ChangedError(f"{self.name(req.rel_path)} changed since it was scanned")
        pause("move.before_capture")
        rename_noreplace(dir_fd, base, to_dir, to_name)
        if not _is_inode(to_dir, to_name, identity):
            put_back(to_dir, to_name, dir_fd, base)
            raise ChangedError(f"{self.name(req.rel_path)} was replaced before it could be moved")
        # No fsync here: the caller's fsync after its last rename or unlink makes this rename
        # durable too (a journaling filesystem commits them in order); a crash before it finds
        # the file at its name or captured, and either is finished.

    def restore(self, req: MoveRequest, from_dir: int, name: str) -> None:
        """Put a captured file back at `req.rel_path` (or a collision name): a new arrival."""
        dir_fd, base = self._dir(req.rel_path)
        put_back(from_dir, name, dir_fd, base)

    def _promote(self, req: MoveRequest, dest_dir: int, captured: str, dest_name: str) -> None:
        """Give the captured file its final name, checked; `clean` only if nobody else holds it."""
        st = os.stat(captured, dir_fd=dest_dir, follow_symlinks=False)
        if req.identity is None or not _same_file(st, req.identity):
            raise ChangedError(f"{self.name(req.dest_rel)}: the source changed since it was scanned")
        if req.private:
            with contextlib.suppress(PermissionError):  # another user's upload: copied below
                os.chmod(captured, 0o600, dir_fd=dest_dir)
        if not req.verify and not (req.private and os.stat(captured, dir_fd=dest_dir).st_mode & 0o077):
            rename_noreplace(dest_dir, captured, dest_dir, dest_name)
            os.fsync(dest_dir)
            return
        try:
            fd = os.open(captured, _READ_FLAGS, dir_fd=dest_dir)
        except PermissionError as exc:  # made unreadable since the scan, through a descriptor
            raise ChangedError(f"{req.rel_path} cannot be read again: {exc}") from exc
        try:
            with write_lease(fd) as leased:
                # Under the lease no other descriptor is open; with one link, no other name.
                alone = leased and os.fstat(fd).st_nlink == 1 and not req.private
                if alone:
                    if sha256_fd(fd) != req.sha256:
                        raise ChangedError(f"{req.rel_path} has other bytes than were scanned")
                    rename_noreplace(dest_dir, captured, dest_dir, dest_name)
            if not alone:
                log.info("file.copied", file_id=req.file_id, rel_path=req.rel_path,
                         why="private" if req.private else "held_elsewhere")
                self._promote_copy(req, fd, st, dest_dir, dest_name)
                os.unlink(captured, dir_fd=dest_dir)
            os.fsync(dest_dir)
        finally:
            os.close(fd)

    def _promote_copy(self, req: MoveRequest, fd: int, st: os.stat_result, dest_dir: int,
                      dest_name: str) -> None:
        """Place a fresh copy of the held bytes: an inode only we have ever opened."""
        with os.fdopen(os.dup(fd), "rb", buffering=0) as raw:
            reader = io.BufferedReader(Verified(raw, req, req.rel_path), CHUNK)
            mode = 0o600 if req.private else st.st_mode & 0o777
            self._write_new(req, reader, dest_dir, dest_name, mode, st)

    def _write_new(self, req: MoveRequest, reader: BinaryIO, dest_dir: int, dest_name: str,
                   mode: int, st: os.stat_result | None) -> None:
        """Copy to a temp name, fsync, rename without replacing, fsync the directory."""
        temp = _temp_name(req.file_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dest_dir)
        out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      mode, dir_fd=dest_dir)
        try:
            try:
                while chunk := reader.read(CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view):]
                if st is not None:
                    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.fsync(out)
            finally:
                os.close(out)  # exactly once: a second close could hit another thread's new fd
            rename_noreplace(dest_dir, temp, dest_dir, dest_name)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=dest_dir)
            raise
        os.fsync(dest_dir)

    def write_sidecar(self, rel_path: str, facts: Mapping[str, object]) -> None:
        """Atomically, mode 0600."""
        dir_fd, base = self._dir(rel_path)
        sidecar = _sidecar_name(base)
        # Named after the sidecar, so a write cut off by a crash is overwritten by the retry.
        temp = f".scanwatch-sidecar-{hashlib.sha256(os.fsencode(sidecar)).hexdigest()[:16]}.tmp"
        out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=dir_fd)
        try:
            os.write(out, json_bytes(facts))
            os.fsync(out)
        finally:
            os.close(out)
        os.rename(temp, sidecar, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    def read_sidecar(self, rel_path: str) -> Any:
        dir_fd, base = self._dir(rel_path)
        with open_file(dir_fd, _sidecar_name(base)) as (fd, _):
            return json.loads(os.pread(fd, 1 << 20, 0))

    def delete(self, rel_path: str) -> None:
        dir_fd, base = self._dir(rel_path)
        for name in (base, _sidecar_name(base)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)


class _OpenedFile:
    """A local file held open for scanning: the descriptor is what gets hashed and scanned."""

    def __init__(self, path: str, fd: int, st: os.stat_result) -> None:
        self.path = path
        self._fd = fd
        self._identity = Identity.of(st)

    @property
    def facts(self) -> RowChanges:
        return self._identity.columns()

    def changed_from(self, identity: Identity | None) -> str | None:
        return None if identity is None or identity == self._identity else "changed after it settled"

    def content(self, *, engine_reads_s3: bool) -> Content:
        return Content(self._fd, sha256_fd(self._fd), self._identity.size)


def _sidecar_name(base: str) -> str:
    """`<name>.scanwatch.json`; a name too long for that keeps its head and gets a hash."""
    if len(os.fsencode(base + SIDECAR_SUFFIX)) <= 255:
        return base + SIDECAR_SUFFIX
    digest = hashlib.sha256(os.fsencode(base)).hexdigest()[:12]
    head = os.fsencode(base)[: 255 - len(SIDECAR_SUFFIX) - 13].decode(errors="ignore")
    return f"{head}@{digest}{SIDECAR_SUFFIX}"


def _exists(dir_fd: int, name: str) -> bool:
    """Whether `name` is taken in `dir_fd`; any error but "no such file" is raised, never "free"."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _temp_name(file_id: int) -> str:
    return f".scanwatch-{file_id}.tmp"


def _capture_name(file_id: int) -> str:
    return f".scanwatch-{file_id}.move"


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _is_inode(dir_fd: int, name: str, identity: Identity | None) -> bool:
    """True when `name` in `dir_fd` is the inode of `identity`."""
    st = _lstat(dir_fd, name)
    return (st is not None and identity is not None
            and (st.st_dev, st.st_ino) == (identity.dev, identity.inode))


def _same_file(st: os.stat_result, identity: Identity) -> bool:
    """Still the scanned file; ctime is not compared, as our own chmod to 0600 changes it."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (
        identity.dev, identity.inode, identity.size, identity.mtime_ns)
