"""Objects judged in place: tags on exactly the scanned version of an S3 source object.

A versioned object is tagged by its VersionId (the listed ETag's, asked with `IfMatch` when
the listing named none). An unversioned one is tagged through a
copy onto itself conditional on the scanned ETag (`CopySourceIfMatch`, with
`TaggingDirective=REPLACE`, `MetadataDirective=COPY`): PutObjectTagging would tag whatever
replaced the object since its scan. The copy may give the object a new ETag (a multipart
object's, on AWS): it is returned, and the journal remembers it as the object judged, so
the listing does not take it for a new arrival (docs/contract.md, "S3 in place").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from daemon.errors import ChangedError, S3ConditionError, TooManyTagsError
from daemon.locations.s3 import S3Location

__all__ = ["MAX_TAGS", "tag_in_place", "verdict_tags"]

MAX_TAGS = 10  # S3's limit per object
_OURS = "scanwatch-"
_UNSAFE = re.compile(r"[^A-Za-z0-9 +\-=._:/@]")


def verdict_tags(verdict: str, reason: str | None, scanned_at: str, threat: str | None) -> dict[str, str]:
    """The tags of a verdict; `scanwatch-threat` (the first threat, at most 256) when infected."""
    tags = {"scanwatch-verdict": verdict, "scanwatch-reason": _UNSAFE.sub("_", reason or ""),
            "scanwatch-scanned-at": scanned_at}
    if threat:
        tags["scanwatch-threat"] = _UNSAFE.sub("_", threat)[:256]
    return tags


def tag_in_place(source: S3Location, rel_path: str, etag: str | None, version_id: str | None,
                 tags: Mapping[str, str]) -> str | None:
    """Put `tags` on that version, keeping its other tags; returns the ETag after a self-copy.

    Raises ChangedError when the object is no longer the scanned one (unversioned),
    FileNotFoundError when the version is gone, TooManyTagsError when the tags do not fit.
    """
    key = source.key(rel_path)
    name = source.name(rel_path)
    try:
        version_id = version_id or _version_of(source, key, etag)
        pinned = {"VersionId": version_id} if version_id else {}
        found = source.call("GET tagging", "get_object_tagging", Key=key, **pinned).get("TagSet", [])
        kept = {t["Key"]: t["Value"] for t in found if not t["Key"].startswith(_OURS)}
        if len(kept) + len(tags) > MAX_TAGS:
            raise TooManyTagsError(f"{name} has {len(kept)} tags of its own: no room for "
                                   f"{len(tags)} more within S3's {MAX_TAGS}")
        merged = {**kept, **tags}
        if version_id:
            source.call("TAG", "put_object_tagging", Key=key, VersionId=version_id, Tagging={
                "TagSet": [{"Key": k, "Value": v} for k, v in merged.items()]})
            return None
        answer = source.call(
            "TAG", "copy_object", Key=key, CopySource={"Bucket": source.where.bucket, "Key": key},
            CopySourceIfMatch=etag or "*", TaggingDirective="REPLACE", Tagging=urlencode(merged),
            MetadataDirective="COPY")
        return _quoted(answer.get("CopyObjectResult", {}).get("ETag")) or etag
    except S3ConditionError as exc:
        raise ChangedError(f"{name} was replaced since it was scanned") from exc


def _version_of(source: S3Location, key: str, etag: str | None) -> str | None:
    """The VersionId of the scanned ETag where the bucket keeps versions (a listing names none).

    Asked with `IfMatch`: a version of other bytes is refused (ChangedError via the caller).
    """
    if etag is None:
        return None
    head = source.call("HEAD", "head_object", Key=key, IfMatch=etag)
    version = head.get("VersionId")
    return None if version in (None, "", "null") else str(version)


def _quoted(etag: Any) -> str | None:
    """An ETag as listings give it (quoted); some servers answer a copy's without quotes."""
    if not etag:
        return None
    return f'"{str(etag).strip(chr(34))}"'
