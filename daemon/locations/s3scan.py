"""An S3 object version held for scanning: which bytes are scanned, and where they wait.

docs/integrity.md, "S3 objects": a versioned object is pinned by its VersionId at every
step. On an unversioned bucket the scanned bytes are kept where only scanwatch can write,
until the move: a staged copy of the download (small objects), or a server-side snapshot
(large objects, and any object an engine reads by `path`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from daemon.faults import pause
from daemon.journal import RowChanges
from daemon.locations.base import CHUNK, Content, Listed, ReadBy
from daemon.model import S3Object
from daemon.s3client import epoch, s3_boundary
from daemon.s3client import list_objects as list_pages
from daemon.s3url import S3Url, quoted_etag

if TYPE_CHECKING:
    from daemon.locations.s3 import S3Location

__all__ = ["OpenedObject", "copy_hashing", "list_objects"]


class OpenedObject:
    """One object version held for scanning: downloaded and hashed when its content is asked for."""

    def __init__(self, location: S3Location, listed: Listed, etag: str, version_id: str | None,
                 size: int, held: contextlib.ExitStack) -> None:
        self.path = location.name(listed.rel_path)
        self._location = location
        self._listed = listed
        self._facts: RowChanges = {"etag": etag, "version_id": version_id}
        self._size = size
        self._held = held

    @property
    def facts(self) -> RowChanges:
        return {**self._facts}

    def content(self, *, read_by: ReadBy = ReadBy.DESCRIPTOR) -> Content:
        """The object's bytes, hashed on the way; the object is read itself only where a
        VersionId or a private snapshot pins what is read (docs/integrity.md, "Remote engines")."""
        where, rel_path, file_id = self._location, self._listed.rel_path, self._listed.file_id
        by_reference = read_by is not ReadBy.DESCRIPTOR
        etag = self._facts["etag"] or ""
        is_large = self._size > where.snapshot_threshold
        if (by_reference or is_large) and self._facts["version_id"] is None:
            self._current_version(rel_path, etag)
        version_id = self._facts["version_id"]
        if file_id is not None and (where.has_snapshot(self._listed, file_id, etag)
                                    or (read_by is ReadBy.KEY and where.makes_snapshots)
                                    or (is_large and version_id is None)):
            return self._from_snapshot(file_id, etag, version_id, by_reference=by_reference)
        by_version = by_reference and version_id is not None
        # Unversioned: the download is kept, staged, to be promoted as scanned.
        stage_id = file_id if where.staging is not None and not by_version and version_id is None else None
        copy = None if by_version else self._held.enter_context(
            where.private_copy(self._size) if stage_id is None else where.staged_copy(stage_id, self._size))
        obj = S3Object(where.where.bucket, where.key(rel_path), etag, version_id,
                       where.presign(where.key(rel_path), version_id) if by_version else "")
        try:
            answer = where.get_answer(rel_path, etag, version_id)
            with contextlib.closing(answer["Body"]) as body:
                sha256, size = copy_hashing(body, None if copy is None else copy.fileno())
        except BaseException:
            if stage_id is not None:
                where.drop_staged(stage_id)
            raise
        # The version these bytes are (a listing names none): what an in-place tag is put on.
        served = answer.get("VersionId")
        version_id = version_id or (None if served in (None, "", "null") else str(served))
        if stage_id is not None and version_id is not None:
            where.drop_staged(stage_id)  # versioned after all: the VersionId pins the move
        self._facts["version_id"], self._facts["size"] = version_id, size
        if answer.get("LastModified") is not None:  # which version these bytes are (an event names none)
            self._facts["last_modified"] = epoch(answer["LastModified"])
        return Content(None if copy is None else copy.fileno(), sha256, size, obj)

    def _current_version(self, rel_path: str, etag: str) -> None:
        """The VersionId and LastModified of the listed version, if it is still current: what an
        event names neither of, and a snapshot's own LastModified is not the source's
        (unversioned, placed copies name `<ETag>@<LastModified>`: docs/fleet.md)."""
        head = self._location.head(rel_path)
        if head is None or str(head["ETag"]) != etag:
            return
        served = head.get("VersionId")
        self._facts["version_id"] = None if served in (None, "", "null") else str(served)
        if head.get("LastModified") is not None:
            self._facts["last_modified"] = epoch(head["LastModified"])

    def _from_snapshot(self, file_id: int, etag: str, version_id: str | None, *,
                       by_reference: bool) -> Content:
        """Snapshot the listed version (once), then hash the snapshot: what is scanned and promoted."""
        where = self._location
        key = where.snapshot(self._listed, file_id, etag, version_id, self._size)
        self._facts["snapshot"] = key
        pause("scan.snapshotted")
        copy: BinaryIO | None = None if by_reference else self._held.enter_context(
            where.private_copy(self._size))
        body = where.get_snapshot(key)
        with contextlib.closing(body):
            sha256, size = copy_hashing(body, None if copy is None else copy.fileno())
        obj = S3Object(where.where.bucket, key, etag, version_id, where.presign(key, None), is_snapshot=True)
        self._facts["size"] = size
        return Content(None if copy is None else copy.fileno(), sha256, size, obj)


def copy_hashing(body: Any, out_fd: int | None) -> tuple[str, int]:
    """Read a download to its end, into `out_fd` if given; its sha256 and size."""
    digest = hashlib.sha256()
    size = 0
    with s3_boundary("download"):
        while chunk := body.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            view = memoryview(chunk)
            while out_fd is not None and view:
                view = view[os.write(out_fd, view):]
    return digest.hexdigest(), size


def list_objects(client: Any, where: S3Url, keep: Callable[[str], bool]) -> Iterator[Listed]:
    """The objects under `where`, as listed (folder markers left out; `keep` filters names)."""
    for page in list_pages(client, where):
        for obj in page:
            rel = str(obj["Key"]).removeprefix(where.prefix)
            if rel and not rel.endswith("/") and keep(rel):
                yield Listed(rel, quoted_etag(str(obj["ETag"])), None, int(obj["Size"]))
