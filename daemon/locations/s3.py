"""An S3 prefix as a Location: conditional copies and uploads that never overwrite."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode

import structlog

from daemon.config import S3Config
from daemon.errors import ChangedError, LocationError, S3ConditionError, S3UnavailableError, UnsafePathError
from daemon.fsutil import Identity
from daemon.locations import inplace
from daemon.locations.base import (
    CHUNK,
    MAX_COLLISIONS,
    SIDECAR_SUFFIX,
    CopySource,
    Listed,
    MoveRequest,
    Opened,
    Rewritten,
    Source,
    Verified,
    json_bytes,
)
from daemon.locations.s3copy import Target, server_copy, upload
from daemon.locations.s3scan import OpenedObject, copy_hashing, list_objects
from daemon.locations.s3staging import Staging, delete_snapshot, node_id, snapshot_rel
from daemon.naming import collision_name
from daemon.s3client import s3_boundary
from daemon.s3url import S3Url, bare_etag, tag_value

__all__ = ["SHA256_TAG", "SOURCE_VERSION_TAG", "S3Location", "copy_hashing", "source_tags"]

_PRESIGN_S = 3600
_FREE_SPACE_RESERVE = 64 * 2**20  # downloads for scanning never fill the disk of state_dir
_MAX_KEY_BYTES = 1024
# What a placed copy says about its source, the same whichever daemon placed it (docs/fleet.md).
SOURCE_VERSION_TAG = "scanwatch-source-version"
SHA256_TAG = "scanwatch-sha256"

log = structlog.get_logger("scanwatch.locations.s3")


def source_tags(req: MoveRequest) -> dict[str, str]:
    """The node-independent identity of the scanned source version, as destination tags."""
    tags = {}
    version = req.version_id or bare_etag(req.etag or "")
    if not req.version_id and version and req.last_modified is not None:
        # Unversioned: the same bytes uploaded again have the same ETag but are another version.
        version = f"{version}@{int(req.last_modified)}"
    if version:
        tags[SOURCE_VERSION_TAG] = tag_value(version)
    if req.sha256:
        tags[SHA256_TAG] = req.sha256
    return tags


def _check_key(key: str) -> None:
    """UnsafePathError for a name no object can have: not UTF-8 (a local file's), or too long."""
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        raise UnsafePathError(f"{key!r} is not UTF-8: it cannot be an S3 key") from None
    if size > _MAX_KEY_BYTES:
        raise UnsafePathError(f"{key[:64]!r}... is over {_MAX_KEY_BYTES} bytes: too long for an S3 key")


class S3Location:
    """An S3 prefix. Writes never overwrite (`IfNoneMatch`); reads pin the scanned ETag."""

    settles = False

    def __init__(self, url: str, client: Any, config: S3Config, work_dir: Path | None = None, *,
                 state_dir: Path | None = None, stages: bool = True) -> None:
        self.url = url
        self.where = S3Url.parse(url)
        self._client = client
        self._copy_threshold = config.multipart_threshold
        self._part_size = config.multipart_chunksize
        self._work_dir = work_dir  # private copies of objects being scanned
        # Where scanned bytes wait for their move (daemon/locations/s3staging.py): none without
        # a state_dir; no staged copies where they are never moved (`in_place`).
        self._state_dir = state_dir
        self.staging = Staging(state_dir / "staging" / "s3") if state_dir is not None and stages else None
        self.snapshot_threshold = config.snapshot_threshold if state_dir is not None else 1 << 62
        self.makes_snapshots = state_dir is not None  # for a reader by key (`ReadBy.KEY`)
        self._node: str | None = None

    # -- as a source being scanned -------------------------------------------------------

    @contextmanager
    def open_for_scan(self, listed: Listed) -> Iterator[Opened]:
        etag, version_id, size = listed.etag, listed.version_id, listed.size
        if etag is None:  # replaced since it was listed: take the version there now
            head = self.head(listed.rel_path)
            if head is None:
                self._drop_snapshot(listed.snapshot)
                raise FileNotFoundError(errno.ENOENT, "no such object", self.name(listed.rel_path))
            etag, version_id, size = str(head["ETag"]), head.get("VersionId"), int(head["ContentLength"])
        if listed.file_id is not None and listed.snapshot is not None \
                and listed.snapshot != self._snapshot_key(listed.file_id, etag):
            self._drop_snapshot(listed.snapshot)  # of a version replaced before it was scanned
        with contextlib.ExitStack() as held:
            yield OpenedObject(self, listed, etag, version_id, size or 0, held)

    def refuses(self, rel_path: str) -> str | None:
        return None  # an S3 key takes any name; one that is not UTF-8 fails when it is planned

    def identity_now(self, rel_path: str) -> Identity | None:
        return None  # objects are pinned by ETag and VersionId, not by an identity

    def presign(self, key: str, version_id: str | None) -> str:
        """A GET URL of exactly that key's version, for an engine that reads the object itself."""
        params = {"Bucket": self.where.bucket, "Key": key}
        if version_id:
            params["VersionId"] = version_id
        return str(self._client.generate_presigned_url("get_object", Params=params, ExpiresIn=_PRESIGN_S))

    def private_copy(self, size: int) -> BinaryIO:
        """A temp file for an object's bytes; S3UnavailableError when the disk lacks room for them."""
        if self._work_dir is None:
            return tempfile.TemporaryFile()
        self._work_dir.mkdir(mode=0o700, exist_ok=True)
        if shutil.disk_usage(self._work_dir).free < size + _FREE_SPACE_RESERVE:
            raise S3UnavailableError(f"not enough free space in {self._work_dir} for {size} bytes")
        return tempfile.TemporaryFile(dir=self._work_dir)

    def staged_copy(self, file_id: int, size: int) -> BinaryIO:
        """Row `file_id`'s staged copy, new and empty: kept after the scan until the move."""
        assert self.staging is not None
        return self.staging.create(file_id, size)

    def drop_staged(self, file_id: int) -> None:
        if self.staging is not None:
            self.staging.drop(file_id)

    # -- snapshots: private server-side copies (daemon/locations/s3staging.py) ---------------

    def _snapshot_key(self, file_id: int, etag: str) -> str | None:
        """The key of row `file_id`'s snapshot of version `etag` (None: no state_dir, no snapshots)."""
        if self._state_dir is None:
            return None
        if self._node is None:
            self._node = node_id(self._state_dir)
        return self.key(snapshot_rel(self._node, file_id, etag))

    def has_snapshot(self, listed: Listed, file_id: int, etag: str) -> bool:
        """True when the row already has its snapshot of this version: scanned and moved from it."""
        return listed.snapshot is not None and listed.snapshot == self._snapshot_key(file_id, etag)

    def snapshot(self, listed: Listed, file_id: int, etag: str, version_id: str | None, size: int) -> str:
        """Make (once) the snapshot of the listed version; its key.

        The copy is pinned to the version (VersionId, else `CopySourceIfMatch` on the listed
        ETag) and never overwrites (`IfNoneMatch`): a snapshot already there is this very one,
        made before a crash. ChangedError when the source is no longer the listed version.
        """
        key = self._snapshot_key(file_id, etag)
        assert key is not None
        source = {"Bucket": self.where.bucket, "Key": self.key(listed.rel_path)}
        if version_id:
            source["VersionId"] = version_id
        pinned = {} if version_id else {"CopySourceIfMatch": etag}
        target = Target(self._client, self.where.bucket, key, "", self._copy_threshold, self._part_size)
        try:
            with s3_boundary(f"SNAPSHOT {self.name(listed.rel_path)}"):
                server_copy(target, source, size, pinned, lambda: self.head_key(source["Key"]))
        except S3ConditionError as exc:
            if not self._exists(key):
                raise ChangedError(f"{self.name(listed.rel_path)} was replaced since it was listed") from exc
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such object", self.name(listed.rel_path)) from None
        log.info("s3.snapshot_made", rel_path=listed.rel_path, key=key)
        return key

    def get_snapshot(self, key: str) -> Any:
        """The streaming body of a snapshot; ChangedError if it is gone (scan the source again)."""
        try:
            return self._call("GET", "get_object", Key=key)["Body"]
        except FileNotFoundError:
            raise ChangedError(f"the snapshot s3://{self.where.bucket}/{key} is gone: scanning the "
                               "source again") from None

    def _drop_snapshot(self, key: str | None, *, versioned: bool = False) -> None:
        if key is not None:
            delete_snapshot(self._client, self.where.bucket, key, versioned=versioned)

    def name(self, rel_path: str) -> str:
        return str(self.where) + rel_path

    def key(self, rel_path: str) -> str:
        """The object key of `rel_path`."""
        return self.where.key(rel_path)

    def _call(self, what: str, method: str, **kwargs: Any) -> Any:
        """One S3 call on this bucket, through the error boundary (daemon/locations/inplace.py too)."""
        with s3_boundary(f"{what} s3://{self.where.bucket}/{kwargs.get('Key', self.where.prefix)}"):
            return getattr(self._client, method)(Bucket=self.where.bucket, **kwargs)

    def _exists(self, key: str, **conditions: Any) -> bool:
        try:
            self._call("HEAD", "head_object", Key=key, **conditions)
        except (FileNotFoundError, S3ConditionError):
            return False
        return True

    def plan(self, rel_path: str, *, taken: bool = False, placing: MoveRequest | None = None) -> str:
        _check_key(self.key(rel_path))
        if not taken:
            return rel_path  # `receive` writes with IfNoneMatch: a collision is found then
        dirs, base = rel_path.rpartition("/")[::2]
        for n in range(MAX_COLLISIONS):
            candidate = f"{dirs}/{collision_name(base, n)}" if dirs else collision_name(base, n)
            if not self._exists(self.key(candidate)) or (
                    placing and self.holds_source(dataclasses.replace(placing, dest_rel=candidate))):
                return candidate
        raise LocationError(f"{self.name(rel_path)}: more than {MAX_COLLISIONS} objects named like it")

    def _version(self, req: MoveRequest) -> dict[str, str]:
        """The conditions that pin the scanned version of the source object."""
        return {"VersionId": req.version_id} if req.version_id else {"IfMatch": req.etag or "*"}

    def remove(self, req: MoveRequest) -> None:
        """Delete the snapshot or staged copy (the scanned bytes are placed), then the source
        if it still is the scanned version: a new upload meanwhile is a new arrival."""
        self._drop_snapshot(req.snapshot, versioned=req.version_id is not None)
        self.drop_staged(req.file_id)
        with contextlib.suppress(FileNotFoundError, S3ConditionError):
            self._call("DELETE", "delete_object", Key=self.key(req.rel_path), **self._version(req))

    def holds(self, req: MoveRequest) -> bool:
        return self.tags(req.dest_rel).get("scanwatch-file") == req.marker

    def tags(self, rel_path: str) -> dict[str, str]:
        try:
            answer = self._call("GET tagging", "get_object_tagging", Key=self.key(rel_path))
        except FileNotFoundError:
            return {}
        return {tag["Key"]: tag["Value"] for tag in answer.get("TagSet", [])}

    def tag_in_place(self, rel_path: str, etag: str | None, version_id: str | None,
                     tags: Mapping[str, str], sha256: str | None) -> Rewritten | None:
        return inplace.tag_in_place(self, rel_path, etag, version_id, tags, sha256)

    def listing(self, keep: Callable[[str], bool]) -> Iterator[Listed]:
        return list_objects(self._client, self.where, keep)

    def read_object(self, rel_path: str) -> bytes:
        return bytes(self._call("GET", "get_object", Key=self.key(rel_path))["Body"].read())

    def create_object(self, rel_path: str, body: bytes) -> bool:
        try:
            self._call("PUT", "put_object", Key=self.key(rel_path), IfNoneMatch="*", Body=body,
                       ContentType="application/json")
        except S3ConditionError:
            return False
        return True

    def holds_source(self, req: MoveRequest) -> bool:
        """True when `req.dest_rel` is a copy of this very source version, whoever placed it.

        Needs both the source version (VersionId, else ETag) and the sha256 of the scanned bytes
        to match: a copy placed by another daemon of the fleet counts; any other object does not.
        """
        wanted = source_tags(req)
        if SOURCE_VERSION_TAG not in wanted or SHA256_TAG not in wanted:
            return False
        found = self.tags(req.dest_rel)
        return all(found.get(key) == value for key, value in wanted.items())

    @contextmanager
    def open_bytes(self, req: MoveRequest) -> Iterator[BinaryIO]:
        """The scanned bytes: the staged copy, the snapshot, or the pinned version downloaded again
        (verified against the scanned sha256 where that is known: a staged copy always)."""
        staged = self.staging.open(req.file_id) if self.staging is not None and req.sha256 else None
        if staged is not None:
            with staged:
                yield io.BufferedReader(Verified(staged, dataclasses.replace(req, verify=True),
                                                 f"the staged copy of {self.name(req.rel_path)}"), CHUNK)
            return
        body = (self.get_snapshot(req.snapshot) if req.snapshot
                else self.get(req.rel_path, req.etag, req.version_id))
        try:
            yield io.BufferedReader(Verified(_Body(body, self.name(req.rel_path)), req,
                                              self.name(req.rel_path)), CHUNK)
        finally:
            body.close()

    def copy_source(self, req: MoveRequest) -> tuple[dict[str, str], dict[str, str]] | None:
        """What a server-side copy of the scanned bytes copies, and its conditions; None when
        only the scanned bytes themselves may be uploaded (docs/integrity.md, "S3 objects").

        A snapshot, or a version, is immutable. Unversioned, a clean file is uploaded from its
        staged copy (or downloaded again and checked against its sha256): an ETag is an MD5.
        """
        source = {"Bucket": self.where.bucket, "Key": self.key(req.rel_path)}
        if req.snapshot:
            return {"Bucket": self.where.bucket, "Key": req.snapshot}, {}
        if req.version_id:
            return {**source, "VersionId": req.version_id}, {}
        if req.verify or (self.staging is not None and self.staging.path(req.file_id).exists()):
            return None
        return source, {"CopySourceIfMatch": req.etag} if req.etag else {}

    def get(self, rel_path: str, etag: str | None, version_id: str | None) -> Any:
        """The streaming body of that version; ChangedError/FileNotFoundError if it is not there."""
        return self.get_answer(rel_path, etag, version_id)["Body"]

    def get_answer(self, rel_path: str, etag: str | None, version_id: str | None) -> dict[str, Any]:
        """GetObject of that version (its `Body` and `VersionId`), as `get`."""
        conditions = {"VersionId": version_id} if version_id else {"IfMatch": etag} if etag else {}
        try:
            return dict(self._call("GET", "get_object", Key=self.key(rel_path), **conditions))
        except S3ConditionError as exc:
            raise ChangedError(f"{self.name(rel_path)} was replaced since it was listed") from exc

    def head(self, rel_path: str) -> dict[str, Any] | None:
        """HeadObject of `rel_path`, or None if there is no such object."""
        return self.head_key(self.key(rel_path)) or None

    def head_key(self, key: str) -> dict[str, Any]:
        """HeadObject of `key` ({} if there is no such object)."""
        try:
            return dict(self._call("HEAD", "head_object", Key=key))
        except FileNotFoundError:
            return {}

    def receive(self, req: MoveRequest, source: Source) -> bool:
        tags = urlencode({**req.tags, **source_tags(req), "scanwatch-file": req.marker})
        target = Target(self._client, self.where.bucket, self.key(req.dest_rel), tags,
                        self._copy_threshold, self._part_size)
        copied = source.copy_source(req) if isinstance(source, CopySource) else None
        try:
            with s3_boundary(f"PUT {self.name(req.dest_rel)}"):
                if copied is not None:
                    assert isinstance(source, CopySource)
                    server_copy(target, copied[0], req.size, copied[1],
                                lambda: source.head_key(copied[0]["Key"]))
                else:
                    with source.open_bytes(req) as reader:
                        upload(target, reader)
        except (S3ConditionError, FileNotFoundError) as exc:
            if self.holds_source(req):
                # Another daemon of a fleet placed this very version (and may have deleted the
                # source): it is placed, with no `.1` twin.
                log.info("move.already_placed", destination=self.name(req.dest_rel), rel_path=req.rel_path)
                return True
            if isinstance(exc, FileNotFoundError) and req.snapshot:
                raise ChangedError(f"the snapshot of {source.name(req.rel_path)} is gone: scanning it "
                                   "again") from exc
            if isinstance(exc, FileNotFoundError):
                raise FileNotFoundError(errno.ENOENT, "no such object", source.name(req.rel_path)) from exc
            if self._exists(self.key(req.dest_rel)):
                raise FileExistsError(errno.EEXIST, "taken", self.name(req.dest_rel)) from exc
            raise ChangedError(f"{source.name(req.rel_path)} was replaced since it was scanned") from exc
        return False

    def write_sidecar(self, rel_path: str, facts: Mapping[str, object]) -> None:
        self._call("PUT", "put_object", Key=self.key(rel_path) + SIDECAR_SUFFIX, Body=json_bytes(facts),
                   ContentType="application/json")

    def read_sidecar(self, rel_path: str) -> Any:
        body = self._call("GET", "get_object", Key=self.key(rel_path) + SIDECAR_SUFFIX)["Body"]
        with contextlib.closing(body):
            return json.loads(body.read(1 << 20))

    def delete(self, rel_path: str) -> None:
        for key in (self.key(rel_path), self.key(rel_path) + SIDECAR_SUFFIX):
            self._call("DELETE", "delete_object", Key=key)


class _Body:
    """A botocore streaming body whose network errors are LocationErrors."""

    def __init__(self, body: Any, what: str) -> None:
        self._body = body
        self._what = what

    def read(self, size: int) -> bytes:
        with s3_boundary(f"GET {self._what}"):
            return bytes(self._body.read(size))
