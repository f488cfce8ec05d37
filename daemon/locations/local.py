"""A local directory as a Location: every path below it opened without following symlinks.

A file of the journal is scanned and placed as its snapshot, and its original is removed
only if it still is what was snapshotted (docs/integrity.md, "Local files").
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, BinaryIO

import structlog

from daemon.errors import ChangedError, LocationError, StagingError, UnsafePathError
from daemon.faults import pause
from daemon.fsutil import DirCache, Identity, classify, open_file, rename_noreplace, same_bytes, sha256_fd
from daemon.journal import RowChanges
from daemon.locations.base import (
    CHUNK,
    MAX_COLLISIONS,
    SIDECAR_SUFFIX,
    Content,
    Listed,
    MoveRequest,
    Opened,
    ReadBy,
    Source,
    Verified,
    json_bytes,
)
from daemon.locations.original import return_original, write_back
from daemon.locations.placing import new_file, place_staged, temp_name, write_all
from daemon.log import enabled
from daemon.model import Reason
from daemon.naming import collision_name, local_rel, split_rel
from daemon.staging import Staging, StagingDirs, orig_name, snap_name

__all__ = ["LocalLocation"]

log = structlog.get_logger("scanwatch.locations")

_DENIED = (errno.EACCES, errno.EPERM)


class LocalLocation:
    """A local directory; every path below it is opened without following symlinks."""

    settles = True

    def __init__(self, root: str, dirs: DirCache, staging: StagingDirs | None = None) -> None:
        self.url = root
        self._dirs = dirs
        self._stagings = staging
        self._renamed: set[str] = set()  # names in staging that `place` renamed away

    def name(self, rel_path: str) -> str:
        return os.path.join(self.url, rel_path)

    def plan(self, rel_path: str, *, taken: bool = False, placing: MoveRequest | None = None) -> str:
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

    def staging(self) -> Staging:
        """This source's staging directory (StagingError: none, or unusable)."""
        if self._stagings is None:
            raise StagingError(f"{self.url}: no staging directory for snapshots")
        return self._stagings.for_source(self.url)

    # -- scanning: the snapshot ---------------------------------------------------------------

    @contextmanager
    def open_for_scan(self, listed: Listed) -> Iterator[Opened]:
        dir_fd, base = self._dir(listed.rel_path)
        if listed.file_id is None:  # a one-shot scan, or a file already ours: read in place
            with open_file(dir_fd, base) as (fd, st):
                yield _OpenedFile(self.name(listed.rel_path), fd, Identity.of(st), None)
            return
        staging = self.staging()
        path = os.path.join(staging.path, snap_name(listed.file_id))
        kept = staging.open(snap_name(listed.file_id)) if listed.sha256 is not None else None
        if kept is not None:  # hashed before (a remote scan being followed): those are the bytes
            try:
                yield _OpenedFile(path, kept, None, listed.sha256)
            finally:
                os.close(kept)
            return
        _check_writable(dir_fd, base, self.name(listed.rel_path))
        fd, identity = _snapshot(staging, dir_fd, base, listed.file_id)
        try:
            try:
                if listed.identity is not None and identity != listed.identity:
                    raise ChangedError(f"{self.name(listed.rel_path)} changed after it settled")
                # Private to the daemon (docs/integrity.md): its size, just taken, is its end.
                opened = _OpenedFile(path, fd, identity, sha256_fd(fd, identity.size), identity.size)
                if listed.sha256 is not None and opened.sha256 != listed.sha256:
                    raise ChangedError(f"{self.name(listed.rel_path)} changed since it was hashed")
            except BaseException:  # not the row's bytes, or unread: no move will place or remove it
                staging.unlink(snap_name(listed.file_id))
                raise
            yield opened
        finally:
            os.close(fd)

    def refuses(self, rel_path: str) -> str | None:
        try:
            local_rel(rel_path)
        except UnsafePathError as exc:
            return str(exc)
        return None

    def identity_now(self, rel_path: str) -> Identity | None:
        dir_fd, base = self._dir(rel_path)
        return Identity.of(os.stat(base, dir_fd=dir_fd, follow_symlinks=False))

    # -- moving: the snapshot placed, the original removed if unchanged ----------------------

    def hand_over(self, req: MoveRequest) -> tuple[Staging, str]:
        """The staged file to place for `req`: its snapshot (made again from the original if
        it was lost), or the captured original itself when it was never read."""
        staging = self.staging()
        if req.sha256 is None:  # never read (a failed verdict): the original itself is placed
            if not staging.exists(orig_name(req.file_id)) and not self._capture(req, staging):
                raise FileNotFoundError(errno.ENOENT, "no longer there", self.name(req.rel_path))
            return staging, orig_name(req.file_id)
        if not staging.exists(snap_name(req.file_id)):
            self._snapshot_again(req, staging)
        return staging, snap_name(req.file_id)

    def place(self, req: MoveRequest, dest_dir: int, dest_name: str) -> None:
        """Put the staged file of `req` (`hand_over`) at `dest_name` in `dest_dir`, a local
        destination: by a rename, which leaves nothing of it in staging for `remove` to
        look for (a lookup of a name no longer there waits for the lock of a directory that
        every worker writes)."""
        staging, name = self.hand_over(req)
        place_staged(staging, name, dest_dir, dest_name, req.file_id, private=req.private)
        self._renamed.add(name)

    def _snapshot_again(self, req: MoveRequest, staging: Staging) -> None:
        """A lost snapshot, made again from the original: only if it has the scanned bytes."""
        dir_fd, base = self._dir(req.rel_path)
        fd, identity = _snapshot(staging, dir_fd, base, req.file_id)
        try:
            same = (req.identity is not None and (identity.dev, identity.inode)
                    == (req.identity.dev, req.identity.inode) and same_bytes(fd, req.size, req.sha256))
        finally:
            os.close(fd)
        if not same:
            staging.unlink(snap_name(req.file_id))
            raise ChangedError(f"{self.name(req.rel_path)} changed since it was scanned")

    def _capture(self, req: MoveRequest, staging: Staging) -> bool:
        """Rename the original into staging (`<id>.orig`) if its name still holds the scanned
        inode; whatever else is at the name is a new arrival. True when captured."""
        try:
            dir_fd, base = self._dir(req.rel_path)
            st = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError, UnsafePathError):
            return False
        identity = req.identity
        if identity is None or (st.st_dev, st.st_ino) != (identity.dev, identity.inode):
            if classify(st) is None:  # another file renamed over the name: scan it
                req.arrivals.append((req.rel_path, st.st_ino))
            return False
        pause("move.before_capture")
        try:
            rename_noreplace(dir_fd, base, staging.fd, orig_name(req.file_id))
        except (FileNotFoundError, FileExistsError):  # gone, or captured before a cut-off move
            return False
        except OSError as exc:
            if exc.errno in _DENIED:
                raise UnsafePathError(f"{self.name(req.rel_path)}: {_DENIED_HINT}",
                                      Reason.PERMISSION_DENIED) from exc
            raise
        captured = os.stat(orig_name(req.file_id), dir_fd=staging.fd, follow_symlinks=False)
        if (captured.st_dev, captured.st_ino) != (identity.dev, identity.inode):
            return_original(self.url, req, staging, orig_name(req.file_id), "replaced at its name")
            return False
        return True

    def remove(self, req: MoveRequest) -> None:
        """Once the snapshot is placed: the original goes only if it still has the snapshot's
        bytes, else it goes back into the source as a new arrival (docs/integrity.md)."""
        staging = self.staging()
        snap, orig = snap_name(req.file_id), orig_name(req.file_id)
        if not self._gone(snap):  # a copy was placed (S3), or a move cut off is finished
            staging.discard(snap)
        if req.sha256 is None:  # never read: the original itself was placed
            if not self._gone(orig):
                staging.unlink(orig)
            return
        # Captured now, as a rule; else captured before a move was cut off (opened below), or
        # gone, moved by a rename, another file, or not ours to take: nothing to remove.
        try:
            if self._capture(req, staging):
                pause("move.captured")
        except UnsafePathError as exc:  # e.g. a sticky folder: its next row is held for it
            log.warning("file.original_kept", file_id=req.file_id, rel_path=req.rel_path,
                        reason=exc.reason, detail=str(exc))
        fd = staging.open(orig)
        if fd is None:
            return
        try:
            self._settle(req, staging, fd)
        finally:
            os.close(fd)

    def _gone(self, name: str) -> bool:
        """Whether `place` renamed `name` out of staging (forgotten once asked)."""
        if name not in self._renamed:
            return False
        self._renamed.discard(name)
        return True

    def _settle(self, req: MoveRequest, staging: Staging, fd: int) -> None:
        """Unlink the captured original `fd` if it is the scanned inode with the scanned bytes."""
        st = os.fstat(fd)
        identity = req.identity
        if (identity is None or (st.st_dev, st.st_ino) != (identity.dev, identity.inode)
                or not same_bytes(fd, req.size, req.sha256)):
            return_original(self.url, req, staging, orig_name(req.file_id), "changed after its snapshot")
            return
        staging.unlink(orig_name(req.file_id))  # no fsync: if a crash undoes it, reconcile does it again
        if not same_bytes(fd, req.size, req.sha256):  # written to between the check and the unlink
            write_back(self.url, req, fd)

    def holds(self, req: MoveRequest) -> bool:
        try:
            dir_fd, base = self._dir(req.dest_rel)
        except (FileNotFoundError, UnsafePathError):
            return False
        st = _lstat(dir_fd, base)
        if st is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name(req.file_id), dir_fd=dir_fd)
            return False
        if req.identity is not None and (st.st_dev, st.st_ino) == (req.identity.dev, req.identity.inode):
            return True  # the original itself, renamed here
        if st.st_size != req.size or req.sha256 is None or classify(st) is not None:
            return False
        with open_file(dir_fd, base) as (fd, _):
            return same_bytes(fd, req.size, req.sha256)

    @contextmanager
    def open_bytes(self, req: MoveRequest) -> Iterator[BinaryIO]:
        """The staged bytes of `req` (its snapshot), checked against the scanned hash."""
        staging, name = self.hand_over(req)
        fd = staging.open(name)
        if fd is None:
            raise FileNotFoundError(errno.ENOENT, "not staged", self.name(req.rel_path))
        with os.fdopen(fd, "rb", buffering=0) as raw:
            yield io.BufferedReader(Verified(raw, req, self.name(req.rel_path)), CHUNK)

    def receive(self, req: MoveRequest, source: Source) -> bool:
        dest_dir, dest_name = self._dir(req.dest_rel, private=req.private)
        if isinstance(source, LocalLocation):
            source.place(req, dest_dir, dest_name)
            # Durable before the move is journaled done: once per batch (the pipeline).
            self._dirs.changed(dest_dir)
            return False
        with source.open_bytes(req) as reader:
            new_file(dest_dir, dest_name, 0o600 if req.private else 0o644, req.file_id,
                     lambda out: write_all(reader, out, CHUNK))
        os.fsync(dest_dir)  # at once: the source (S3) deletes its object next
        return False

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
        self._dirs.changed(dir_fd)

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
    """A file held for scanning: its snapshot (or, for a one-shot scan, the file itself)."""

    def __init__(self, path: str, fd: int, identity: Identity | None, sha256: str | None,
                 size: int | None = None) -> None:
        """`size`: the snapshot's, when it was just taken (else asked of `fd`)."""
        self.path = path
        self._fd = fd
        self._identity = identity
        self.sha256 = sha256
        self._size = size

    @property
    def facts(self) -> RowChanges:
        return {} if self._identity is None else self._identity.columns()

    def content(self, *, read_by: ReadBy = ReadBy.DESCRIPTOR) -> Content:
        size = self._size if self._size is not None else os.fstat(self._fd).st_size
        return Content(self._fd, self.sha256 or sha256_fd(self._fd), size)


_DENIED_HINT = ("the daemon may not write to this file's folder, so it could not take the file out "
                "once scanned; give the daemon's user write and search access to it")


def _check_writable(dir_fd: int, base: str, where: str) -> None:
    """UnsafePathError (permission_denied) when the daemon could not take the file out of
    its folder: no write or search access, or a sticky folder (like /tmp) where neither the
    folder nor the file is the daemon's (only root may rename others' files there)."""
    euid = os.geteuid()
    denied = not os.access(".", os.W_OK | os.X_OK, dir_fd=dir_fd, effective_ids=True)
    if not denied and euid != 0:
        folder = os.fstat(dir_fd)
        denied = bool(folder.st_mode & stat.S_ISVTX) and euid not in (
            folder.st_uid, os.stat(base, dir_fd=dir_fd, follow_symlinks=False).st_uid)
    if denied:
        raise UnsafePathError(f"{where}: {_DENIED_HINT}", Reason.PERMISSION_DENIED)


def _snapshot(staging: Staging, dir_fd: int, base: str, file_id: int) -> tuple[int, Identity]:
    """A snapshot of `base` in staging: its fd, and the original's identity when it was made
    (with the snapshot's size). The snapshot keeps the original's times and mode bits,
    less group/other write."""
    with open_file(dir_fd, base) as (src, st):
        fd, how = staging.snapshot(src, file_id)
    try:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o755)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        size = os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        raise
    if enabled(logging.DEBUG):  # per file: no logger built when it is filtered
        log.debug("file.snapshot", file_id=file_id, how=how, size=size)
    return fd, Identity(st.st_dev, st.st_ino, size, st.st_mtime_ns, st.st_ctime_ns)


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


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


