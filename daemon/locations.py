"""Locations: where files come from and go to (a local directory or an S3 prefix).

The pipeline moves a file with `transfer(request, source, dest)` without knowing
which kinds the two are. Every move is "place a verified copy, then remove the
source if it is still the scanned file", with the planned name journaled first,
so a move cut off at any point is finished by `transfer(..., resumed=True)`:

- local → local: an atomic rename that never overwrites (a copy across filesystems);
- S3 → S3: a server-side copy of exactly the scanned version (`CopySourceIfMatch`);
- S3 → local: a download to a temp name, fsync, a no-overwrite rename;
- local → S3: an upload (multipart above one part) that completes only when the bytes
  are the scanned ones, never overwriting (`IfNoneMatch`).

A copy meant for `clean` is checked against the scanned sha256 before it becomes
visible; anything else (the source changed) raises ChangedError: scan it again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlencode

from botocore.exceptions import BotoCoreError, ClientError

from daemon.config import Config, S3Config, WatchConfig
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
from daemon.s3 import S3Clients, S3Url, error_code, is_s3, local_rel, s3_errors

__all__ = [
    "ChangedError",
    "LocalLocation",
    "Location",
    "Locations",
    "MoveRequest",
    "S3Location",
    "SIDECAR_SUFFIX",
    "transfer",
]

SIDECAR_SUFFIX = ".scanwatch.json"
_CHUNK = 1 << 20
_MAX_COLLISIONS = 10_000
_MAX_PARTS = 10_000


class ChangedError(LocationError):
    """The source is not the file that was scanned any more: scan it again."""


@dataclass(frozen=True)
class MoveRequest:
    """Move the scanned version of `rel_path` to `dest_rel` (planned and journaled)."""

    file_id: int
    rel_path: str
    dest_rel: str
    size: int
    sha256: str | None  # the scanned bytes' hash (None if they could not be read)
    verify: bool  # check the bytes against sha256 before they become visible (clean)
    private: bool  # quarantine: 0600 files, 0700 directories
    identity: Identity | None = None  # a local source
    etag: str | None = None  # an S3 source
    version_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)  # for S3 destinations

    @property
    def marker(self) -> str:
        """Tells our copy at the destination from any other object (S3 tag value)."""
        return f"{self.file_id}.{(self.sha256 or (self.etag or '').strip(chr(34)))[:16]}"


class Location(Protocol):
    """A local directory or an S3 prefix, as one side of a move."""

    url: str  # as configured

    def name(self, rel_path: str) -> str:
        """The full name of `rel_path` here (a path, or an s3:// URL)."""
        ...

    def plan(self, rel_path: str, *, taken: bool = False) -> str:
        """The first free name for `rel_path` here: itself, else `<stem>.<n><ext>`.

        `taken`: a `receive` found the name taken, so look again. Where `receive` never
        overwrites and looking costs a request (S3), the first plan is the name itself.
        """
        ...

    def receive(self, req: MoveRequest, source: Location) -> None:
        """Place the scanned bytes at `req.dest_rel`; FileExistsError if the name is taken."""
        ...

    def holds(self, req: MoveRequest) -> bool:
        """True when `req.dest_rel` holds the copy this request placed."""
        ...

    def present(self, req: MoveRequest) -> bool:
        """True when the scanned version of `req.rel_path` is still here."""
        ...

    def remove(self, req: MoveRequest) -> None:
        """Remove `req.rel_path` if it is still the scanned version (else leave it)."""
        ...

    def open_bytes(self, req: MoveRequest) -> AbstractContextManager[BinaryIO]:
        """A reader of the scanned bytes of `req.rel_path` (ChangedError if they changed)."""
        ...

    def write_sidecar(self, rel_path: str, facts: Mapping[str, object]) -> None:
        """Write `<name>.scanwatch.json` beside `rel_path`."""
        ...

    def read_sidecar(self, rel_path: str) -> Any:
        """The sidecar beside `rel_path`."""
        ...

    def delete(self, rel_path: str) -> None:
        """Delete `rel_path` and its sidecar for good (quarantine delete)."""
        ...


def transfer(req: MoveRequest, source: Location, dest: Location, *, resumed: bool = False) -> None:
    """Move the scanned file from `source` to `dest` at `req.dest_rel`.

    `resumed`: a move of this request may have been cut off; finish it. Raises
    FileNotFoundError when the file is in neither place, ChangedError when the source
    is not the scanned file, FileExistsError when `dest_rel` was taken (plan again).
    """
    if resumed:
        if dest.holds(req):
            source.remove(req)
            return
        if not source.present(req):
            raise FileNotFoundError(f"{source.name(req.rel_path)} is gone")
    dest.receive(req, source)
    source.remove(req)


class _Verified(io.RawIOBase):
    """Reads a stream and, at its end, checks the bytes against the expected sha256."""

    def __init__(self, raw: Any, req: MoveRequest, what: str) -> None:
        self._raw = raw
        self._digest = hashlib.sha256() if req.verify else None
        self._expected = req.sha256
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        if self._digest is not None:
            if data:
                self._digest.update(data)
            elif self._digest.hexdigest() != self._expected:
                raise ChangedError(f"{self._what} has other bytes than were scanned")
        buffer[: len(data)] = data
        return len(data)


def _read_full(reader: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes (fewer only at the end of the stream)."""
    parts: list[bytes] = []
    while size > 0 and (chunk := reader.read(size)):
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def _json_bytes(facts: Mapping[str, object]) -> bytes:
    try:
        return json.dumps(facts, indent=2, ensure_ascii=False).encode() + b"\n"
    except UnicodeEncodeError:  # a file name that is not UTF-8: escape it
        return json.dumps(facts, indent=2).encode() + b"\n"


# -- local directories -----------------------------------------------------------------------------


class LocalLocation:
    """A local directory; every path below it is opened without following symlinks."""

    def __init__(self, root: str, dirs: DirCache) -> None:
        self.url = root
        self._dirs = dirs

    def name(self, rel_path: str) -> str:
        return os.path.join(self.url, rel_path)

    def plan(self, rel_path: str, *, taken: bool = False) -> str:
        dirs, base = split_rel(local_rel(rel_path))
        parent = os.path.join(self.url, *dirs)
        for n in range(_MAX_COLLISIONS):
            candidate = collision_name(base, n)
            if not os.path.lexists(os.path.join(parent, candidate)):
                return "/".join([*dirs, candidate])
        raise LocationError(f"{parent}: more than {_MAX_COLLISIONS} files named like {base!r}")

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
                yield io.BufferedReader(_Verified(raw, req, self.name(req.rel_path)), _CHUNK)

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
                    reader = io.BufferedReader(_Verified(raw, req, req.rel_path), _CHUNK)
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
            while chunk := reader.read(_CHUNK):
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
            os.write(out, _json_bytes(facts))
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


def _temp_name(file_id: int) -> str:
    return f".scanwatch-{file_id}.tmp"


def _same_file(st: os.stat_result, identity: Identity) -> bool:
    """Still the scanned file; ctime is not compared, as our own chmod to 0600 changes it."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == (
        identity.dev, identity.inode, identity.size, identity.mtime_ns)


# -- S3 prefixes -----------------------------------------------------------------------------------


class S3Location:
    """An S3 prefix. Writes never overwrite (`IfNoneMatch`); reads pin the scanned ETag."""

    def __init__(self, url: str, client: Any, config: S3Config) -> None:
        self.url = url
        self.where = S3Url.parse(url)
        self.client = self._client = client
        self._copy_threshold = config.multipart_threshold
        self._part_size = config.multipart_chunksize

    def name(self, rel_path: str) -> str:
        return str(self.where) + rel_path

    def key(self, rel_path: str) -> str:
        """The object key of `rel_path`."""
        return self.where.key(rel_path)

    def _call(self, what: str, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._client, method)(Bucket=self.where.bucket, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise s3_errors(f"{what} {self.name(kwargs.get('Key', ''))}", exc) from exc

    def _exists(self, key: str, **conditions: Any) -> bool:
        try:
            self._client.head_object(Bucket=self.where.bucket, Key=key, **conditions)
        except ClientError as exc:
            if error_code(exc) in ("404", "NoSuchKey", "NotFound", "412", "PreconditionFailed"):
                return False
            raise s3_errors(f"HEAD {self.name(key)}", exc) from exc
        except BotoCoreError as exc:
            raise s3_errors(f"HEAD {self.name(key)}", exc) from exc
        return True

    def plan(self, rel_path: str, *, taken: bool = False) -> str:
        if not taken:
            return rel_path  # `receive` writes with IfNoneMatch: a collision is found then
        dirs, base = rel_path.rpartition("/")[::2]
        for n in range(_MAX_COLLISIONS):
            candidate = f"{dirs}/{collision_name(base, n)}" if dirs else collision_name(base, n)
            if not self._exists(self.key(candidate)):
                return candidate
        raise LocationError(f"{self.name(rel_path)}: more than {_MAX_COLLISIONS} objects named like it")

    def _version(self, req: MoveRequest) -> dict[str, str]:
        """The conditions that pin the scanned version of the source object."""
        return {"VersionId": req.version_id} if req.version_id else {"IfMatch": req.etag or "*"}

    def present(self, req: MoveRequest) -> bool:
        return self._exists(self.key(req.rel_path), **self._version(req))

    def remove(self, req: MoveRequest) -> None:
        key = self.key(req.rel_path)
        try:
            self._client.delete_object(Bucket=self.where.bucket, Key=key, **self._version(req))
        except ClientError as exc:
            if error_code(exc) in ("404", "NoSuchKey", "412", "PreconditionFailed"):
                return  # replaced by a new upload meanwhile: that one is a new arrival
            raise s3_errors(f"DELETE {self.name(key)}", exc) from exc
        except BotoCoreError as exc:
            raise s3_errors(f"DELETE {self.name(key)}", exc) from exc

    def holds(self, req: MoveRequest) -> bool:
        try:
            tags = self._client.get_object_tagging(Bucket=self.where.bucket, Key=self.key(req.dest_rel))
        except ClientError as exc:
            if error_code(exc) in ("404", "NoSuchKey"):
                return False
            raise s3_errors(f"GET tagging {self.name(req.dest_rel)}", exc) from exc
        except BotoCoreError as exc:
            raise s3_errors(f"GET tagging {self.name(req.dest_rel)}", exc) from exc
        return {"Key": "scanwatch-file", "Value": req.marker} in tags.get("TagSet", [])

    @contextmanager
    def open_bytes(self, req: MoveRequest) -> Iterator[BinaryIO]:
        body = self.get(req.rel_path, req.etag, req.version_id)
        try:
            yield io.BufferedReader(_Verified(_Body(body, self.name(req.rel_path)), req,
                                              self.name(req.rel_path)), _CHUNK)
        finally:
            body.close()

    def get(self, rel_path: str, etag: str | None, version_id: str | None) -> Any:
        """The streaming body of that version; ChangedError/FileNotFoundError if it is not there."""
        conditions = {"VersionId": version_id} if version_id else {"IfMatch": etag} if etag else {}
        try:
            return self._client.get_object(Bucket=self.where.bucket, Key=self.key(rel_path),
                                           **conditions)["Body"]
        except ClientError as exc:
            code = error_code(exc)
            if code in ("412", "PreconditionFailed"):
                raise ChangedError(f"{self.name(rel_path)} was replaced since it was listed") from exc
            if code in ("404", "NoSuchKey", "NoSuchVersion"):
                raise FileNotFoundError(errno.ENOENT, "no such object", self.name(rel_path)) from exc
            raise s3_errors(f"GET {self.name(rel_path)}", exc) from exc
        except BotoCoreError as exc:
            raise s3_errors(f"GET {self.name(rel_path)}", exc) from exc

    def head(self, rel_path: str) -> dict[str, Any] | None:
        """HeadObject of `rel_path`, or None if there is no such object."""
        try:
            return dict(self._client.head_object(Bucket=self.where.bucket, Key=self.key(rel_path)))
        except ClientError as exc:
            if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise s3_errors(f"HEAD {self.name(rel_path)}", exc) from exc
        except BotoCoreError as exc:
            raise s3_errors(f"HEAD {self.name(rel_path)}", exc) from exc

    def receive(self, req: MoveRequest, source: Location) -> None:
        tags = urlencode({**req.tags, "scanwatch-file": req.marker})
        try:
            if isinstance(source, S3Location):
                self._copy(req, source, tags)
            else:
                with source.open_bytes(req) as reader:
                    self._upload(req, reader, tags)
        except ClientError as exc:
            if error_code(exc) in ("412", "PreconditionFailed"):
                if self._exists(self.key(req.dest_rel)):
                    raise FileExistsError(errno.EEXIST, "taken", self.name(req.dest_rel)) from exc
                raise ChangedError(f"{source.name(req.rel_path)} was replaced since it was scanned") from exc
            raise s3_errors(f"PUT {self.name(req.dest_rel)}", exc) from exc
        except BotoCoreError as exc:
            raise s3_errors(f"PUT {self.name(req.dest_rel)}", exc) from exc

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
        first = _read_full(reader, self._part_size)
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
                chunk, number = _read_full(reader, self._part_size), number + 1

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
            with contextlib.suppress(ClientError, BotoCoreError):
                self._client.abort_multipart_upload(Bucket=self.where.bucket, Key=key, UploadId=upload_id)
            raise

    def write_sidecar(self, rel_path: str, facts: Mapping[str, object]) -> None:
        self._call("PUT", "put_object", Key=self.key(rel_path) + SIDECAR_SUFFIX, Body=_json_bytes(facts),
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
        try:
            return bytes(self._body.read(size))
        except (BotoCoreError, OSError) as exc:
            raise s3_errors(f"GET {self._what}", exc) from exc


class Locations:
    """Location objects by configured URL for one batch of work: local ones share `dirs`,
    S3 ones use the client for their watch's S3 settings."""

    def __init__(self, config: Config, dirs: DirCache, clients: S3Clients | None = None) -> None:
        self._config = config
        self.dirs = dirs
        self._clients = clients or S3Clients()

    def __call__(self, url: str, watch: WatchConfig) -> Location:
        if is_s3(url):
            s3 = self._config.s3_for(watch)
            return S3Location(url, self._clients(s3), s3)
        return LocalLocation(url, self.dirs)
