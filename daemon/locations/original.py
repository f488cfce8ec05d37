"""An original that changed after its snapshot goes back into its source as a new arrival.

Changed bytes are never lost and never promoted unscanned (docs/integrity.md): a staged
original is put back at its name (or the next free collision name), into its folder,
recreated if it was removed meanwhile, else at the watch root; bytes written into it
after its removal are copied back the same way. Either is reported once (`file.changed`)
and recorded by the journal as an arrival of its own (`MoveRequest.arrivals`).
"""

from __future__ import annotations

import os

import structlog

from daemon.errors import UnsafePathError
from daemon.fsutil import open_dir, put_back
from daemon.locations.base import MAX_COLLISIONS, MoveRequest
from daemon.locations.placing import new_file
from daemon.naming import collision_name, split_rel
from daemon.staging import Staging, copy_into

__all__ = ["return_original", "write_back"]

log = structlog.get_logger("scanwatch.locations")


def return_original(root: str, req: MoveRequest, staging: Staging, name: str, detail: str) -> None:
    """Put the staged `name` back at `req.rel_path` in the source `root`: a new arrival."""
    dir_fd, prefix = _source_dir(root, req.rel_path)
    try:
        used = put_back(staging.fd, name, dir_fd, split_rel(req.rel_path)[1])
        _arrived(req, dir_fd, prefix, used, detail)
    finally:
        os.close(dir_fd)


def write_back(root: str, req: MoveRequest, fd: int) -> None:
    """Copy the bytes of the removed original `fd` back into the source: a new arrival."""
    dir_fd, prefix = _source_dir(root, req.rel_path)
    base = split_rel(req.rel_path)[1]

    def fill(out: int) -> None:
        copy_into(fd, out)

    try:
        for n in range(MAX_COLLISIONS):
            try:
                new_file(dir_fd, collision_name(base, n), os.fstat(fd).st_mode & 0o777, req.file_id, fill)
            except FileExistsError:
                continue
            _arrived(req, dir_fd, prefix, collision_name(base, n), "written to while it was removed")
            return
        raise FileExistsError(f"no free name to put {req.rel_path} back")
    finally:
        os.close(dir_fd)


def _source_dir(root: str, rel_path: str) -> tuple[int, str]:
    """A fresh fd of `rel_path`'s folder, recreated if it was removed (else the root), and
    its prefix below the root. Never the cached fd: that may be of a removed folder."""
    parents, _ = split_rel(rel_path)
    try:
        return open_dir(root, parents, create_mode=0o777), "".join(f"{p}/" for p in parents)
    except (OSError, UnsafePathError):
        return open_dir(root, []), ""


def _arrived(req: MoveRequest, dir_fd: int, prefix: str, name: str, detail: str) -> None:
    inode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino
    os.fsync(dir_fd)
    req.arrivals.append((prefix + name, inode))
    log.info("file.changed", file_id=req.file_id, rel_path=req.rel_path, detail=detail,
             put_back=prefix + name)
