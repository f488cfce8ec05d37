"""Putting a file into a destination folder without a temporary name there (docs/integrity.md).

A staged file (a snapshot) is renamed into place, never replacing a name. Across
filesystems, or for bytes that come from elsewhere (S3), a new file is made with
`O_TMPFILE` (a file without a name), filled, fsynced and linked to its final name, which
fails if the name is taken: a crash at any point leaves no name behind. Only where the
filesystem has no `O_TMPFILE` is a `.scanwatch-<id>.tmp` name used (removed by the retry).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from typing import BinaryIO

from daemon.fsutil import rename_noreplace
from daemon.staging import NO_TMPFILE, Staging, copy_into

__all__ = ["place_staged", "new_file", "temp_name", "write_all"]

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def temp_name(file_id: int) -> str:
    """The fallback temporary name of a row's copy (filesystems without `O_TMPFILE`)."""
    return f".scanwatch-{file_id}.tmp"


def place_staged(staging: Staging, name: str, dest_dir: int, dest_name: str, file_id: int, *,
                 private: bool) -> None:
    """Move `name` out of staging to `dest_name` (quarantine: 0600 first).

    A rename within one filesystem is made durable by the caller's fsync of the folder
    before it journals the move done (once per batch: later renames and unlinks on the same
    journaling filesystem are committed after it). A copy to another filesystem is fsynced
    here, before the staged file goes: no ordering holds across filesystems.
    """
    if private:
        with contextlib.suppress(PermissionError):  # an original never read, not ours to chmod
            os.chmod(name, 0o600, dir_fd=staging.fd, follow_symlinks=False)
    try:
        rename_noreplace(staging.fd, name, dest_dir, dest_name)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=staging.fd)
        try:
            st = os.fstat(fd)
            mode = 0o600 if private else st.st_mode & 0o755

            def fill(out: int) -> None:
                copy_into(fd, out)
                os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))

            new_file(dest_dir, dest_name, mode, file_id, fill)
        finally:
            os.close(fd)
        os.fsync(dest_dir)
        staging.unlink(name)


def new_file(dest_dir: int, dest_name: str, mode: int, file_id: int, fill: Callable[[int], None]) -> None:
    """A new file at `dest_name` (FileExistsError if taken) holding what `fill(fd)` writes."""
    try:
        out = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, mode, dir_fd=dest_dir)
    except OSError as exc:
        if exc.errno not in NO_TMPFILE:
            raise
        _new_named(dest_dir, dest_name, mode, file_id, fill)
        return
    try:
        os.fchmod(out, mode)  # O_TMPFILE's mode is filtered by the umask like any other
        fill(out)
        os.fsync(out)
        os.link(f"/proc/self/fd/{out}", dest_name, dst_dir_fd=dest_dir, follow_symlinks=True)
    finally:
        os.close(out)


def _new_named(dest_dir: int, dest_name: str, mode: int, file_id: int, fill: Callable[[int], None]) -> None:
    temp = temp_name(file_id)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp, dir_fd=dest_dir)
    out = os.open(temp, _NEW, mode, dir_fd=dest_dir)
    try:
        try:
            os.fchmod(out, mode)
            fill(out)
            os.fsync(out)
        finally:
            os.close(out)  # exactly once: a second close could hit another thread's new fd
        rename_noreplace(dest_dir, temp, dest_dir, dest_name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dest_dir)
        raise


def write_all(reader: BinaryIO, out: int, chunk_bytes: int = 1 << 20) -> None:
    """Copy a reader to a descriptor."""
    while chunk := reader.read(chunk_bytes):
        view = memoryview(chunk)
        while view:
            view = view[os.write(out, view):]
