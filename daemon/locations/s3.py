"""An S3 prefix as a Location: conditional copies and uploads that never overwrite."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlencode

import structlog

from daemon.config import S3Config
from daemon.errors import ChangedError, LocationError, S3ConditionError, S3UnavailableError, UnsafePathError
from daemon.fsutil import Identity, collision_name
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
    read_full,
)
from daemon.model import S3Object
from daemon.s3 import S3Url, epoch, s3_boundary

__all__ = ["SHA256_TAG", "SOURCE_VERSION_TAG", "S3Location", "copy_hashing", "source_tags"]

_MAX_PARTS = 10_000
_PRESIGN_S = 3600
_FREE_SPACE_RESERVE = 64 * 2**20  # downloads for scanning never fill the disk of state_dir
_MAX_KEY_BYTES = 1024
# What a placed copy says about its source, the same whichever daemon placed it (docs/fleet.md).
SOURCE_VERSION_TAG = "scanwatch-source-version"
SHA256_TAG = "scanwatch-sha256"
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9 +\-=._:/@]")

log = structlog.get_logger("scanwatch.locations.s3")


def source_tags(req: MoveRequest) -> dict[str, str]:
    """The node-independent identity of the scanned source version, as destination tags."""
    tags = {}
    version = req.version_id or (req.etag or "").strip('"')
    if not req.version_id and version and req.last_modified is not None:
        # Unversioned: the same bytes uploaded again have the same ETag but are another version.
        version = f"{version}@{int(req.last_modified)}"
    if version:
        tags[SOURCE_VERSION_TAG] = _TAG_UNSAFE.sub("_", version)[:256]
    if req.sha256:
        tags[SHA256_TAG] = req.sha256
    return tags


class _OpenedObject:
    """One object version held for scanning: downloaded and hashed when its content is asked for."""

    def __init__(self, location: S3Location, rel_path: str, etag: str, version_id: str | None,
                 size: int, held: contextlib.ExitStack) -> None:
        self.path = location.name(rel_path)
        self._location = location
        self._rel_path = rel_path
        self._facts: RowChanges = {"etag": etag, "version_id": version_id}
        self._size = size
        self._held = held

    @property
    def facts(self) -> RowChanges:
        return {**self._facts}

    def changed_from(self, identity: Identity | None) -> str | None:
        return None  # pinned by ETag: a replaced object fails the download with ChangedError

    def content(self, *, engine_reads_s3: bool) -> Content:
        """The object's bytes, hashed on the way; an engine reads the object itself only where a
        VersionId pins what it reads (docs/integrity.md, "Remote engines")."""
        where, rel_path = self._location, self._rel_path
        etag, version_id = self._facts["etag"] or "", self._facts["version_id"]
        if engine_reads_s3 and version_id is None:
            version_id = where.version_of(rel_path, etag)
        by_engine = engine_reads_s3 and version_id is not None
        copy = None if by_engine else self._held.enter_context(where.private_copy(self._size))
        obj = S3Object(where.where.bucket, where.key(rel_path), etag, version_id,
                       where.presign(rel_path, version_id) if by_engine else "")
        answer = where.get_answer(rel_path, etag, version_id)
        with contextlib.closing(answer["Body"]) as body:
            sha256, size = copy_hashing(body, None if copy is None else copy.fileno())
        # The version these bytes are (a listing names none): what an in-place tag is put on.
        served = answer.get("VersionId")
        version_id = version_id or (None if served in (None, "", "null") else str(served))
        self._facts["version_id"], self._facts["size"] = version_id, size
        if answer.get("LastModified") is not None:  # which version these bytes are (an event names none)
            self._facts["last_modified"] = epoch(answer["LastModified"])
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

    def __init__(self, url: str, client: Any, config: S3Config, work_dir: Path | None = None) -> None:
        self.url = url
        self.where = S3Url.parse(url)
        self._client = client
        self._copy_threshold = config.multipart_threshold
        self._part_size = config.multipart_chunksize
        self._work_dir = work_dir  # private copies of objects being scanned

    # -- as a source being scanned -------------------------------------------------------

    @contextmanager
    def open_for_scan(self, listed: Listed) -> Iterator[Opened]:
        etag, version_id, size = listed.etag, listed.version_id, listed.size
        if etag is None:  # replaced since it was listed: take the version there now
            head = self.head(listed.rel_path)
            if head is None:
                raise FileNotFoundError(errno.ENOENT, "no such object", self.name(listed.rel_path))
            etag, version_id, size = str(head["ETag"]), head.get("VersionId"), int(head["ContentLength"])
        with contextlib.ExitStack() as held:
            yield _OpenedObject(self, listed.rel_path, etag, version_id, size or 0, held)

    def refuses(self, rel_path: str) -> str | None:
        return None  # an S3 key takes any name; one that is not UTF-8 fails when it is planned

    def identity_now(self, rel_path: str) -> Identity | None:
        return None  # objects are pinned by ETag and VersionId, not by an identity

    def presign(self, rel_path: str, version_id: str | None) -> str:
        """A GET URL of exactly that version, for an engine that reads the object itself."""
        params = {"Bucket": self.where.bucket, "Key": self.key(rel_path)}
        if version_id:
            params["VersionId"] = version_id
        return str(self._client.generate_presigned_url("get_object", Params=params, ExpiresIn=_PRESIGN_S))

    def version_of(self, rel_path: str, etag: str) -> str | None:
        """The VersionId of the listed version (a listing names none), if it is still current."""
        head = self.head(rel_path)
        return head.get("VersionId") if head is not None and str(head["ETag"]) == etag else None

    def private_copy(self, size: int) -> BinaryIO:
        """A temp file for an object's bytes; S3UnavailableError when the disk lacks room for them."""
        if self._work_dir is None:
            return tempfile.TemporaryFile()
        self._work_dir.mkdir(mode=0o700, exist_ok=True)
        if shutil.disk_usage(self._work_dir).free < size + _FREE_SPACE_RESERVE:
            raise S3UnavailableError(f"not enough free space in {self._work_dir} for {size} bytes")
        return tempfile.TemporaryFile(dir=self._work_dir)

    def name(self, rel_path: str) -> str:
        return str(self.where) + rel_path

    @property
    def client(self) -> Any:
        """The boto3 client (daemon/locations/inplace.py tags objects through it)."""
        return self._client

    def key(self, rel_path: str) -> str:
        """The object key of `rel_path`."""
        return self.where.key(rel_path)

    def call(self, what: str, method: str, **kwargs: Any) -> Any:
        """One S3 call on this bucket, through the error boundary."""
        with s3_boundary(f"{what} s3://{self.where.bucket}/{kwargs.get('Key', self.where.prefix)}"):
            return getattr(self._client, method)(Bucket=self.where.bucket, **kwargs)

    def _exists(self, key: str, **conditions: Any) -> bool:
        try:
            self.call("HEAD", "head_object", Key=key, **conditions)
        except (FileNotFoundError, S3ConditionError):
            return False
        return True

    def plan(self, rel_path: str, *, taken: bool = False) -> str:
        _check_key(self.key(rel_path))
        if not taken:
            return rel_path  # `receive` writes with IfNoneMatch: a collision is found then
        dirs, base = rel_path.rpartition("/")[::2]
        for n in range(MAX_COLLISIONS):
            candidate = f"{dirs}/{collision_name(base, n)}" if dirs else collision_name(base, n)
            if not self._exists(self.key(candidate)):
                return candidate
        raise LocationError(f"{self.name(rel_path)}: more than {MAX_COLLISIONS} objects named like it")

    def _version(self, req: MoveRequest) -> dict[str, str]:
        """The conditions that pin the scanned version of the source object."""
        return {"VersionId": req.version_id} if req.version_id else {"IfMatch": req.etag or "*"}

    def remove(self, req: MoveRequest) -> None:
        with contextlib.suppress(FileNotFoundError, S3ConditionError):
            # Gone, or replaced by a new upload meanwhile: that one is a new arrival.
            self.call("DELETE", "delete_object", Key=self.key(req.rel_path), **self._version(req))

    def holds(self, req: MoveRequest) -> bool:
        return {"Key": "scanwatch-file", "Value": req.marker} in self._tags(req.dest_rel)

    def _tags(self, rel_path: str) -> list[dict[str, str]]:
        """The TagSet of `rel_path`; [] if there is no such object."""
        try:
            answer = self.call("GET tagging", "get_object_tagging", Key=self.key(rel_path))
        except FileNotFoundError:
            return []
        return list(answer.get("TagSet", []))

    def holds_source(self, req: MoveRequest) -> bool:
        """True when `req.dest_rel` is a copy of this very source version, whoever placed it.

        Needs both the source version (VersionId, else ETag) and the sha256 of the scanned bytes
        to match: a copy placed by another daemon of the fleet counts; any other object does not.
        """
        wanted = source_tags(req)
        if SOURCE_VERSION_TAG not in wanted or SHA256_TAG not in wanted:
            return False
        found = {tag["Key"]: tag["Value"] for tag in self._tags(req.dest_rel)}
        return all(found.get(key) == value for key, value in wanted.items())

    @contextmanager
    def open_bytes(self, req: MoveRequest) -> Iterator[BinaryIO]:
        body = self.get(req.rel_path, req.etag, req.version_id)
        try:
            yield io.BufferedReader(Verified(_Body(body, self.name(req.rel_path)), req,
                                              self.name(req.rel_path)), CHUNK)
        finally:
            body.close()

    def get(self, rel_path: str, etag: str | None, version_id: str | None) -> Any:
        """The streaming body of that version; ChangedError/FileNotFoundError if it is not there."""
        return self.get_answer(rel_path, etag, version_id)["Body"]

    def get_answer(self, rel_path: str, etag: str | None, version_id: str | None) -> dict[str, Any]:
        """GetObject of that version (its `Body` and `VersionId`), as `get`."""
        conditions = {"VersionId": version_id} if version_id else {"IfMatch": etag} if etag else {}
        try:
            return dict(self.call("GET", "get_object", Key=self.key(rel_path), **conditions))
        except S3ConditionError as exc:
            raise ChangedError(f"{self.name(rel_path)} was replaced since it was listed") from exc

    def head(self, rel_path: str) -> dict[str, Any] | None:
        """HeadObject of `rel_path`, or None if there is no such object."""
        try:
            return dict(self.call("HEAD", "head_object", Key=self.key(rel_path)))
        except FileNotFoundError:
            return None

    def receive(self, req: MoveRequest, source: Source) -> bool:
        tags = urlencode({**req.tags, **source_tags(req), "scanwatch-file": req.marker})
        try:
            with s3_boundary(f"PUT {self.name(req.dest_rel)}"):
                if isinstance(source, S3Location):
                    self._copy(req, source, tags)
                else:
                    with source.open_bytes(req) as reader:
                        self._upload(req, reader, tags)
        except (S3ConditionError, FileNotFoundError) as exc:
            if self.holds_source(req):
                # Another daemon of a fleet placed this very version (and may have deleted the
                # source): it is placed, with no `.1` twin.
                log.info("move.already_placed", destination=self.name(req.dest_rel), rel_path=req.rel_path)
                return True
            if isinstance(exc, FileNotFoundError):
                raise FileNotFoundError(errno.ENOENT, "no such object", source.name(req.rel_path)) from exc
            if self._exists(self.key(req.dest_rel)):
                raise FileExistsError(errno.EEXIST, "taken", self.name(req.dest_rel)) from exc
            raise ChangedError(f"{source.name(req.rel_path)} was replaced since it was scanned") from exc
        return False

    def _copy(self, req: MoveRequest, source: S3Location, tags: str) -> None:
        """Server-side copy of the scanned version; multipart above the copy threshold."""
        copy_source = {"Bucket": source.where.bucket, "Key": source.key(req.rel_path)}
        if req.version_id:
            copy_source["VersionId"] = req.version_id
        pinned = {"CopySourceIfMatch": req.etag} if req.etag and not req.version_id else {}
        key = self.key(req.dest_rel)
        if req.size <= self._copy_threshold:
            self._client.copy_object(Bucket=self.where.bucket, Key=key, CopySource=copy_source,
                                     IfNoneMatch="*", TaggingDirective="REPLACE", Tagging=tags, **pinned)
            return
        head = source.head(req.rel_path) or {}
        extra = {k: head[k] for k in ("ContentType", "Metadata") if head.get(k)}
        part = max(self._part_size, -(-req.size // _MAX_PARTS))
        with self._multipart(key, tags, extra) as (upload_id, parts):
            for number, start in enumerate(range(0, req.size, part), start=1):
                end = min(start + part, req.size) - 1
                answer = self._client.upload_part_copy(
                    Bucket=self.where.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                    CopySource=copy_source, CopySourceRange=f"bytes={start}-{end}", **pinned)
                parts.append({"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]})

    def _upload(self, req: MoveRequest, reader: BinaryIO, tags: str) -> None:
        """One PUT up to a part's size, else a multipart upload completed only once verified."""
        key = self.key(req.dest_rel)
        first = read_full(reader, self._part_size)
        if len(first) < self._part_size:  # the whole file, verified at its end by the reader
            self._client.put_object(Bucket=self.where.bucket, Key=key, Body=first, IfNoneMatch="*",
                                    Tagging=tags)
            return
        with self._multipart(key, tags, {}) as (upload_id, parts):
            chunk, number = first, 1
            while chunk:
                answer = self._client.upload_part(Bucket=self.where.bucket, Key=key, UploadId=upload_id,
                                                  PartNumber=number, Body=chunk)
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
                chunk, number = read_full(reader, self._part_size), number + 1

    @contextmanager
    def _multipart(self, key: str, tags: str, extra: Mapping[str, Any]
                   ) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        """A multipart upload, completed without overwriting, or aborted on any error."""
        upload_id = self._client.create_multipart_upload(
            Bucket=self.where.bucket, Key=key, Tagging=tags, **extra)["UploadId"]
        parts: list[dict[str, Any]] = []
        try:
            yield upload_id, parts
            self._client.complete_multipart_upload(
                Bucket=self.where.bucket, Key=key, UploadId=upload_id, IfNoneMatch="*",
                MultipartUpload={"Parts": parts})
        except BaseException:
            with contextlib.suppress(LocationError, OSError):
                self.call("ABORT", "abort_multipart_upload", Key=key, UploadId=upload_id)
            raise

    def write_sidecar(self, rel_path: str, facts: Mapping[str, object]) -> None:
        self.call("PUT", "put_object", Key=self.key(rel_path) + SIDECAR_SUFFIX, Body=json_bytes(facts),
                   ContentType="application/json")

    def read_sidecar(self, rel_path: str) -> Any:
        body = self.call("GET", "get_object", Key=self.key(rel_path) + SIDECAR_SUFFIX)["Body"]
        with contextlib.closing(body):
            return json.loads(body.read(1 << 20))

    def delete(self, rel_path: str) -> None:
        for key in (self.key(rel_path), self.key(rel_path) + SIDECAR_SUFFIX):
            self.call("DELETE", "delete_object", Key=key)


class _Body:
    """A botocore streaming body whose network errors are LocationErrors."""

    def __init__(self, body: Any, what: str) -> None:
        self._body = body
        self._what = what

    def read(self, size: int) -> bytes:
        with s3_boundary(f"GET {self._what}"):
            return bytes(self._body.read(size))
