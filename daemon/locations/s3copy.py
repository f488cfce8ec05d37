"""Writing one S3 object without overwriting: a server-side copy, or an upload of given bytes.

Both end with `IfNoneMatch: *` (a single request, or the multipart completion), so an
existing key is never replaced; a multipart upload is aborted on any error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

from daemon.errors import LocationError
from daemon.locations.base import read_full
from daemon.s3client import s3_boundary

__all__ = ["Target", "server_copy", "upload"]

_MAX_PARTS = 10_000


@dataclass(frozen=True)
class Target:
    """The key to write and how: its bucket's client, the tags, the multipart sizes."""

    client: Any
    bucket: str
    key: str
    tags: str  # URL-encoded TagSet ("" for none)
    copy_threshold: int  # server-side copies above this are multipart copies
    part_size: int


def server_copy(target: Target, copy_source: Mapping[str, str], size: int, pinned: Mapping[str, str],
                head: Callable[[], Mapping[str, Any]]) -> None:
    """Copy `copy_source` (a version, or pinned by `CopySourceIfMatch`) to the target key.

    `head` gives the source's HeadObject answer, asked only for a multipart copy (which
    carries its ContentType and Metadata over by hand).
    """
    client, bucket, key = target.client, target.bucket, target.key
    tagging = {"TaggingDirective": "REPLACE", "Tagging": target.tags} if target.tags else {}
    if size <= target.copy_threshold:
        client.copy_object(Bucket=bucket, Key=key, CopySource=dict(copy_source), IfNoneMatch="*",
                           **tagging, **pinned)
        return
    answer = head()
    extra = {k: answer[k] for k in ("ContentType", "Metadata") if answer.get(k)}
    part = max(target.part_size, -(-size // _MAX_PARTS))
    with _multipart(target, extra) as (upload_id, parts):
        for number, start in enumerate(range(0, size, part), start=1):
            end = min(start + part, size) - 1
            answer = client.upload_part_copy(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                CopySource=dict(copy_source), CopySourceRange=f"bytes={start}-{end}", **pinned)
            parts.append({"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]})


def upload(target: Target, reader: BinaryIO) -> None:
    """One PUT up to a part's size, else a multipart upload completed only once `reader` ends
    (a verifying reader raises before the last part if the bytes are not the scanned ones)."""
    client, bucket, key = target.client, target.bucket, target.key
    first = read_full(reader, target.part_size)
    if len(first) < target.part_size:  # the whole file, verified at its end by the reader
        tagging = {"Tagging": target.tags} if target.tags else {}
        client.put_object(Bucket=bucket, Key=key, Body=first, IfNoneMatch="*", **tagging)
        return
    with _multipart(target, {}) as (upload_id, parts):
        chunk, number = first, 1
        while chunk:
            answer = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                        Body=chunk)
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            chunk, number = read_full(reader, target.part_size), number + 1


@contextmanager
def _multipart(target: Target, extra: Mapping[str, Any]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A multipart upload, completed without overwriting, or aborted on any error."""
    client, bucket, key = target.client, target.bucket, target.key
    tagging = {"Tagging": target.tags} if target.tags else {}
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, **tagging, **extra)["UploadId"]
    parts: list[dict[str, Any]] = []
    try:
        yield upload_id, parts
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, IfNoneMatch="*",
                                         MultipartUpload={"Parts": parts})
    except BaseException:
        with contextlib.suppress(LocationError, OSError), s3_boundary(f"ABORT s3://{bucket}/{key}"):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise
