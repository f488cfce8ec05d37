"""Local moves that never overwrite and never lose a file, and the sidecars beside them.

Crash-safety order: the pipeline journals the planned destination name first; the
move then either renames atomically (same filesystem) or copies to a temp name,
fsyncs, renames without replacing, fsyncs the directory and only then removes the
source (across filesystems). `reconcile` finishes a move cut off at any point.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from dataclasses import dataclass

from daemon.errors import LocationError, UnsafePathError
from daemon.fsutil import (
    DirCache,
    Identity,
    classify,
    collision_name,
    open_dir,
    open_file,
    rename_noreplace,
    sha256_fd,
    split_rel,
)

__all__ = ["ChangedError", "MoveRequest", "move", "plan", "reconcile", "write_sidecar"]

_COPY_CHUNK = 1 << 20
_MAX_COLLISIONS = 10_000


class ChangedError(LocationError):
    """The source is not the file that was scanned any more: scan it again."""


@dataclass(frozen=True)
class MoveRequest:
    """Move `src_root/rel_path` to `dest_root/dest_rel`, if it is still the scanned file."""

    file_id: int
    src_root: str
    rel_path: str
    dest_root: str
    dest_rel: str  # as planned and journaled
    identity: Identity
    sha256: str | None  # re-hashed before the move when set (promotion to clean)
    private: bool  # quarantine: 0600 files, 0700 directories


def plan(dest_root: str, rel_path: str) -> str:
    """The first free destination name for `rel_path`: itself, else `<stem>.<n><ext>`."""
    dirs, name = split_rel(rel_path)
    base = os.path.join(dest_root, *dirs)
    for n in range(_MAX_COLLISIONS):
        candidate = collision_name(name, n)
        if not os.path.lexists(os.path.join(base, candidate)):
            return "/".join([*dirs, candidate])
    raise LocationError(f"{base}: more than {_MAX_COLLISIONS} files named like {name!r}")


def move(req: MoveRequest, dirs: DirCache) -> None:
    """Move the file to `dest_rel`, opening directories through `dirs`.

    Raises ChangedError if the source changed since its scan (nothing moved),
    FileExistsError if the planned name was taken meanwhile (plan again), and
    OSError/LocationError when the move failed (the source is left in place).
    """
    src_dirs, src_name = split_rel(req.rel_path)
    dest_dirs, dest_name = split_rel(req.dest_rel)
    src_dir = dirs.open(req.src_root, src_dirs)
    try:
        with open_file(src_dir, src_name) as (fd, st):
            if Identity.of(st) != req.identity:
                raise ChangedError(f"{req.rel_path} changed since it was scanned")
            if req.sha256 is not None and sha256_fd(fd) != req.sha256:
                raise ChangedError(f"{req.rel_path} has other bytes than were scanned")
            must_copy = False
            if req.private:
                try:
                    os.fchmod(fd, 0o600)
                except PermissionError:
                    # Another user's upload is not ours to chmod: a 0600 copy we own replaces it.
                    must_copy = True
            dest_dir = dirs.open(req.dest_root, dest_dirs,
                                 create_mode=0o700 if req.private else 0o777)
            if not must_copy:
                try:
                    rename_noreplace(src_dir, src_name, dest_dir, dest_name)
                    return
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
            _copy_across(req, fd, st, src_dir, src_name, dest_dir, dest_name)
    except PermissionError:
        if req.sha256 is not None or req.private:
            raise
        # A file we may not read still leaves the source for `failed`: a rename needs no
        # read access (across filesystems it cannot be copied, and the error stands).
        st = os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
        if classify(st) is not None or Identity.of(st) != req.identity:
            raise ChangedError(f"{req.rel_path} changed since it was scanned") from None
        rename_noreplace(src_dir, src_name, dirs.open(req.dest_root, dest_dirs, create_mode=0o777),
                         dest_name)


def _temp_name(file_id: int) -> str:
    return f".scanwatch-{file_id}.tmp"


def _copy_across(req: MoveRequest, fd: int, st: os.stat_result, src_dir: int, src_name: str,
                 dest_dir: int, dest_name: str) -> None:
    """Copy to a temp name, fsync, rename without replacing, fsync, then unlink the source.

    Used across filesystems, and for quarantine when the file is not ours to chmod.
    """
    temp = _temp_name(req.file_id)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp, dir_fd=dest_dir)
    mode = 0o600 if req.private else st.st_mode & 0o777
    out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                  mode, dir_fd=dest_dir)
    try:
        digest = hashlib.sha256()
        offset = 0
        while chunk := os.pread(fd, _COPY_CHUNK, offset):
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view):]
            offset += len(chunk)
        if req.sha256 is not None and digest.hexdigest() != req.sha256:
            raise ChangedError(f"{req.rel_path} changed while it was copied")
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fsync(out)
    except BaseException:
        os.close(out)
        os.unlink(temp, dir_fd=dest_dir)
        raise
    os.close(out)
    try:
        rename_noreplace(dest_dir, temp, dest_dir, dest_name)
    except BaseException:
        os.unlink(temp, dir_fd=dest_dir)
        raise
    os.fsync(dest_dir)
    os.unlink(src_name, dir_fd=src_dir)
    os.fsync(src_dir)


def reconcile(req: MoveRequest) -> bool:
    """Finish a move cut off by a crash; True if the file is now at `dest_rel`.

    False means the move never took place and the source is still the scanned file
    (move it again). Raises FileNotFoundError if the file is in neither place.
    """
    dest_path = os.path.join(req.dest_root, req.dest_rel)
    src_dirs, src_name = split_rel(req.rel_path)
    try:
        src_dir = open_dir(req.src_root, src_dirs)
    except (FileNotFoundError, UnsafePathError):
        src_dir = None
    try:
        src_st = _lstat(src_name, src_dir)
        dest_st = _lstat(dest_path, None)
        if dest_st is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(os.path.dirname(dest_path), _temp_name(req.file_id)))
            if src_st is None:
                raise FileNotFoundError(f"{req.rel_path} is in neither its source nor {dest_path}")
            return False
        is_ours = (dest_st.st_dev, dest_st.st_ino) == (req.identity.dev, req.identity.inode) or (
            dest_st.st_size == req.identity.size and req.sha256 is not None
            and _sha256_path(dest_path) == req.sha256)
        if not is_ours:
            if src_st is None:
                raise FileNotFoundError(f"{req.rel_path} vanished; {dest_path} is another file")
            return False
        if src_st is not None and src_dir is not None and Identity.of(src_st) == req.identity:
            os.unlink(src_name, dir_fd=src_dir)  # the copy (or link) is complete
        return True
    finally:
        if src_dir is not None:
            os.close(src_dir)


def _lstat(name: str, dir_fd: int | None) -> os.stat_result | None:
    if dir_fd is None and not os.path.isabs(name):
        return None
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _sha256_path(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)


def write_sidecar(dest_root: str, dest_rel: str, facts: dict[str, object], dirs: DirCache) -> None:
    """Write `<name>.scanwatch.json` beside a placed file, atomically, mode 0600."""
    parents, name = split_rel(dest_rel)
    dir_fd = dirs.open(dest_root, parents)
    sidecar = f"{name}.scanwatch.json"
    temp = f".{sidecar}.tmp"
    out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                  0o600, dir_fd=dir_fd)
    try:
        os.write(out, _json_bytes(facts))
        os.fsync(out)
    finally:
        os.close(out)
    os.rename(temp, sidecar, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _json_bytes(facts: dict[str, object]) -> bytes:
    try:
        return json.dumps(facts, indent=2, ensure_ascii=False).encode() + b"\n"
    except UnicodeEncodeError:  # a file name that is not UTF-8: escape it
        return json.dumps(facts, indent=2).encode() + b"\n"
