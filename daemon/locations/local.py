"""A local directory as a Location: every path below it opened without following symlinks."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, BinaryIO

from daemon.errors import LocationError, UnsafePathError
from daemon.fsutil import (
    DirCache,
    Identity,
    classify,
    collision_name,
    open_file,
    rename_noreplace,
    sha256_fd,
    split_rel,
)
from daemon.locations.base import (
    CHUNK,
    MAX_COLLISIONS,
    SIDECAR_SUFFIX,
    ChangedError,
    Location,
    MoveRequest,
    Verified,
    json_bytes,
)
from daemon.s3 import local_rel

__all__ = ["LocalLocation"]


class LocalLocation:
    """A local directory; every path below it is opened without following symlinks."""

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

    def _lstat(self, rel_path: str) -> os.stat_result | None:
        try:
            dir_fd, base = self._dir(rel_path)
            return os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
        except (FileNotFoundError, UnsafePathError):
            return None

    def present(self, req: MoveRequest) -> bool:
        st = self._lstat(req.rel_path)
        return st is not None and req.identity is not None and _same_file(st, req.identity)

    def remove(self, req: MoveRequest) -> None:
        st = self._lstat(req.rel_path)
        if st is None or req.identity is None or not _same_file(st, req.identity):
            return  # moved by a rename, or a new file by that name: not ours to remove
        dir_fd, base = self._dir(req.rel_path)
        os.unlink(base, dir_fd=dir_fd)
        os.fsync(dir_fd)

    def holds(self, req: MoveRequest) -> bool:
        st = self._lstat(req.dest_rel)
        if st is None:
            with contextlib.suppress(OSError, UnsafePathError):
                dir_fd, _ = self._dir(req.dest_rel)
                os.unlink(_temp_name(req.file_id), dir_fd=dir_fd)
            return False
        if req.identity is not None and (st.st_dev, st.st_ino) == (req.identity.dev, req.identity.inode):
            return True  # renamed here
        if st.st_size != req.size or req.sha256 is None or classify(st) is not None:
            return False
        dir_fd, base = self._dir(req.dest_rel)
        with open_file(dir_fd, base) as (fd, _):
            return sha256_fd(fd) == req.sha256  # copied here

    @contextmanager
    def open_bytes(self, req: MoveRequest) -> Iterator[BinaryIO]:
        dir_fd, base = self._dir(req.rel_path)
        with open_file(dir_fd, base) as (fd, st):
            if req.identity is None or not _same_file(st, req.identity):
                raise ChangedError(f"{self.name(req.rel_path)} changed since it was scanned")
            with os.fdopen(os.dup(fd), "rb", buffering=0) as raw:
                yield io.BufferedReader(Verified(raw, req, self.name(req.rel_path)), CHUNK)

    def receive(self, req: MoveRequest, source: Location) -> None:
        dest_dir, dest_name = self._dir(req.dest_rel, private=req.private)
        if isinstance(source, LocalLocation):
            self._move_local(req, source, dest_dir, dest_name)
            return
        with source.open_bytes(req) as reader:
            self._write_new(req, reader, dest_dir, dest_name, 0o600 if req.private else 0o666, None)

    def _move_local(self, req: MoveRequest, source: LocalLocation, dest_dir: int, dest_name: str) -> None:
        """Rename (same filesystem) or copy across; chmod 0600 first for quarantine."""
        src_dir, src_name = source._dir(req.rel_path)
        try:
            with open_file(src_dir, src_name) as (fd, st):
                if req.identity is None or Identity.of(st) != req.identity:
                    raise ChangedError(f"{req.rel_path} changed since it was scanned")
                if req.verify and sha256_fd(fd) != req.sha256:
                    raise ChangedError(f"{req.rel_path} has other bytes than were scanned")
                must_copy = False
                if req.private:
                    try:
                        os.fchmod(fd, 0o600)
                    except PermissionError:
                        # Another user's upload is not ours to chmod: a 0600 copy we own replaces it.
                        must_copy = True
                if not must_copy:
                    try:
                        rename_noreplace(src_dir, src_name, dest_dir, dest_name)
                        return
                    except OSError as exc:
                        if exc.errno != errno.EXDEV:
                            raise
                with os.fdopen(os.dup(fd), "rb", buffering=0) as raw:
                    reader = io.BufferedReader(Verified(raw, req, req.rel_path), CHUNK)
                    mode = 0o600 if req.private else st.st_mode & 0o777
                    self._write_new(req, reader, dest_dir, dest_name, mode, st)
        except PermissionError:
            if req.verify or req.private:
                raise
            # A file we may not read still leaves the source for `failed`: a rename needs no
            # read access (across filesystems it cannot be copied, and the error stands).
            st = os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
            if classify(st) is not None or req.identity is None or Identity.of(st) != req.identity:
                raise ChangedError(f"{req.rel_path} changed since it was scanned") from None
            rename_noreplace(src_dir, src_name, dest_dir, dest_name)

    def _write_new(self, req: MoveRequest, reader: BinaryIO, dest_dir: int, dest_name: str,
                   mode: int, st: os.stat_result | None) -> None:
        """Copy to a temp name, fsync, rename without replacing, fsync the directory."""
        temp = _temp_name(req.file_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dest_dir)
        out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      mode, dir_fd=dest_dir)
        try:
            while chunk := reader.read(CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
            if st is not None:
                os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(out)
            os.close(out)
            rename_noreplace(dest_dir, temp, dest_dir, dest_name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(out)
            os.unlink(temp, dir_fd=dest_dir)
            raise
        os.fsync(dest_dir)

    def write_sidecar(self, rel_path: str, facts: Mapping[str, object]) -> None:
        """Atomically, mode 0600."""
        dir_fd, base = self._dir(rel_path)
        sidecar = _sidecar_name(base)
        temp = f".scanwatch-sidecar-{os.getpid()}-{threading.get_ident()}.tmp"
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


def _same_file(st: os.stat_result, identity: Identity) -> bool:
    """Still the scanned file; ctime is not compared, as our own chmod to 0600 changes it."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (
        identity.dev, identity.inode, identity.size, identity.mtime_ns)
