"""Where an S3 object's scanned bytes wait for their move (docs/integrity.md, "S3 objects").

On an unversioned bucket an ETag is an MD5, not a pin against an adversary: the bytes that
are promoted must be the very bytes that were scanned, kept where only scanwatch can write.
- A **staged copy**: the download that was hashed and scanned, kept as
  `<state_dir>/staging/s3/<file_id>.snap` (directory 0700, file 0600) until the move
  uploads or places it (objects up to `s3.snapshot_threshold`).
- A **snapshot**: a server-side copy of the listed version to
  `<source prefix>.scanwatch/snapshots/<node>/<file_id>-<etag>` (larger objects, and any
  object an engine reads by `path`); `<node>` names this state_dir, so keys are unique
  across a fleet (docs/fleet.md). A bucket policy keeps everyone else out of `.scanwatch/`.
Both go with the source once the row is moved; `reconcile` removes, at start, those that no
live journal row stands for.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, BinaryIO

import structlog

from daemon.config import Config
from daemon.errors import LocationError, S3UnavailableError
from daemon.journal import FileRow, Journal
from daemon.model import FileState
from daemon.s3client import S3Clients, list_objects, s3_boundary
from daemon.s3url import S3Url, bare_etag, is_s3
from daemon.watchers.fleet import LEASE_DIR

__all__ = ["SNAPSHOT_DIR", "Staging", "delete_snapshot", "node_id", "reconcile", "snapshot_rel", "staging_of"]

log = structlog.get_logger("scanwatch.locations.staging")

SNAPSHOT_DIR = LEASE_DIR + "snapshots/"
_NODE_FILE = "node-id"
_SUFFIX = ".snap"
_FREE_SPACE_RESERVE = 64 * 2**20  # staged copies never fill the disk of state_dir
_PIN_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# A staged copy or snapshot serves a row from its scan (or a wait before it) to its move.
_LIVE = frozenset({FileState.STABLE, FileState.SCANNING, FileState.VERDICT, FileState.MOVING})


def node_id(state_dir: Path) -> str:
    """This state_dir's name in snapshot keys: random, made once, kept in `<state_dir>/node-id`."""
    path = state_dir / _NODE_FILE
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    state_dir.mkdir(parents=True, exist_ok=True)
    fresh = state_dir / f".{_NODE_FILE}.{secrets.token_hex(4)}"
    fresh.write_text(secrets.token_hex(8) + "\n")
    try:
        os.link(fresh, path)  # never replaces: a process racing us keeps its name, we read it
    except FileExistsError:
        pass
    finally:
        fresh.unlink()
    return path.read_text().strip()


def snapshot_rel(node: str, file_id: int, etag: str) -> str:
    """The snapshot of row `file_id`'s listed version, relative to the source prefix."""
    pin = _PIN_UNSAFE.sub("_", bare_etag(etag))[:64]
    return f"{SNAPSHOT_DIR}{node}/{file_id}-{pin}"


class Staging:
    """The staged copies of one state_dir: one private file per journal row."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, file_id: int) -> Path:
        return self.directory / f"{file_id}{_SUFFIX}"

    def create(self, file_id: int, size: int) -> BinaryIO:
        """A new, empty staged copy of row `file_id` open for writing and reading.

        S3UnavailableError when the disk lacks room for `size` bytes (the row waits).
        """
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if shutil.disk_usage(self.directory).free < size + _FREE_SPACE_RESERVE:
            raise S3UnavailableError(f"not enough free space in {self.directory} for {size} bytes")
        fd = os.open(self.path(file_id), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        return os.fdopen(fd, "w+b")

    def open(self, file_id: int) -> BinaryIO | None:
        """The staged copy of row `file_id`, or None if there is none."""
        try:
            fd = os.open(self.path(file_id), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        return os.fdopen(fd, "rb")

    def drop(self, file_id: int) -> None:
        self.path(file_id).unlink(missing_ok=True)

    def reconcile(self, journal: Journal) -> int:
        """Remove the staged copies no live row stands for; how many were removed."""
        removed = 0
        for path in self.directory.glob("*") if self.directory.is_dir() else ():
            row = journal.get(int(path.stem)) if path.stem.isdigit() and path.suffix == _SUFFIX else None
            if row is None or row.state not in _LIVE:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def staging_of(config: Config) -> Staging:
    """The staged copies of S3 objects under `config.state_dir`."""
    return Staging(config.state_dir / "staging" / "s3")


def reconcile(config: Config, journal: Journal, clients: S3Clients | None = None) -> None:
    """At start: remove staged copies and snapshots that no live row stands for.

    S3 failures are logged and left for the next start: nothing here stops the daemon.
    """
    removed = staging_of(config).reconcile(journal)
    clients = clients or S3Clients()
    for watch in config.watches:
        if not is_s3(watch.source):
            continue
        try:
            removed += _reconcile_snapshots(clients(config.s3_for(watch)), S3Url.parse(watch.source),
                                            node_id(config.state_dir), watch.name, journal)
        except (LocationError, OSError) as exc:
            log.warning("staging.reconcile_failed", watch=watch.name, error=str(exc))
    if removed:
        log.info("staging.reconciled", removed=removed)


def _reconcile_snapshots(client: Any, where: S3Url, node: str, watch: str, journal: Journal) -> int:
    """Delete this node's snapshots under `where` that no live row of `watch` stands for."""
    prefix = where.key(f"{SNAPSHOT_DIR}{node}/")
    removed = 0
    keys = [str(o["Key"]) for page in list_objects(client, S3Url(where.bucket, prefix)) for o in page]
    for key in keys:
        file_id = key.removeprefix(prefix).partition("-")[0]
        row = journal.get(int(file_id)) if file_id.isdigit() else None
        if row is None or not _stands_for(row, watch, where, node, key):
            delete_snapshot(client, where.bucket, key, versioned=True)
            removed += 1
    return removed


def delete_snapshot(client: Any, bucket: str, key: str, *, versioned: bool) -> None:
    """Delete a snapshot; on a versioned bucket every version of it, leaving no delete marker."""
    with contextlib.suppress(FileNotFoundError), s3_boundary(f"DELETE s3://{bucket}/{key}"):
        if versioned:
            answer = client.list_object_versions(Bucket=bucket, Prefix=key)
            found = (*answer.get("Versions", ()), *answer.get("DeleteMarkers", ()))
            ids = [str(v["VersionId"]) for v in found
                   if v["Key"] == key and v.get("VersionId") not in (None, "", "null")]
            for version_id in ids:
                client.delete_object(Bucket=bucket, Key=key, VersionId=version_id)
            if ids:
                return
        client.delete_object(Bucket=bucket, Key=key)


def _stands_for(row: FileRow, watch: str, where: S3Url, node: str, key: str) -> bool:
    """True when `key` is the snapshot that live `row` is (or will be) scanned and moved from."""
    if row.watch != watch or row.state not in _LIVE:
        return False
    expected = None if row.etag is None else where.key(snapshot_rel(node, row.id, row.etag))
    return key in (row.snapshot, expected)
