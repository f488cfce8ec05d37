"""Objects judged in place: tags on exactly the scanned version of an S3 source object.

A versioned object is tagged by its VersionId (the listed ETag's, asked with `IfMatch` when
the listing named none). An unversioned one is written again: the scanned bytes (downloaded
pinned by `IfMatch` and checked against the scanned sha256) with their tags, in one
`PutObject` conditional on the scanned ETag. Whatever races it, the object tagged with the
verdict holds exactly the bytes judged: PutObjectTagging would tag whatever replaced the
object since its scan, and a self-copy with `CopySourceIfMatch` is only as atomic as the
store makes it (SeaweedFS was seen tagging the racing PUT's bytes). The write gives the object
a new LastModified (and a multipart object a new ETag): both are returned, and the journal
remembers them as the version judged, so the listing does not take it for a new arrival
(docs/contract.md, "S3 in place").
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from daemon.errors import ChangedError, LocationError, S3ConditionError, TooManyTagsError
from daemon.locations.base import Rewritten
from daemon.locations.s3scan import copy_hashing
from daemon.s3client import epoch
from daemon.s3url import quoted_etag, tag_value

if TYPE_CHECKING:  # S3Location.tag_in_place calls in here
    from daemon.locations.s3 import S3Location

__all__ = ["MAX_TAGS", "Rewritten", "tag_in_place", "verdict_tags"]

MAX_TAGS = 10  # S3's limit per object
_OURS = "scanwatch-"
_MAX_PUT_BYTES = 5 * 2**30  # S3's limit of one PutObject
# What a rewrite keeps of the object besides its bytes (its user metadata and headers).
_KEPT = ("ContentType", "ContentEncoding", "ContentDisposition", "ContentLanguage", "CacheControl",
         "Metadata")


def verdict_tags(verdict: str, reason: str | None, scanned_at: str, threat: str | None) -> dict[str, str]:
    """The tags of a verdict; `scanwatch-threat` (the first threat, at most 256) when infected."""
    tags = {"scanwatch-verdict": verdict, "scanwatch-reason": tag_value(reason or ""),
            "scanwatch-scanned-at": scanned_at}
    if threat:
        tags["scanwatch-threat"] = tag_value(threat)
    return tags


def tag_in_place(source: S3Location, rel_path: str, etag: str | None, version_id: str | None,
                 tags: Mapping[str, str], sha256: str | None) -> Rewritten | None:
    """Put `tags` on that version, keeping its other tags; the version it is now if rewritten.

    Raises ChangedError when the object is no longer the scanned one (unversioned),
    FileNotFoundError when the version is gone, TooManyTagsError when the tags do not fit.
    """
    key = source.key(rel_path)
    name = source.name(rel_path)
    try:
        version_id = version_id or _version_of(source, key, etag)
        pinned = {"VersionId": version_id} if version_id else {}
        found = source._call("GET tagging", "get_object_tagging", Key=key, **pinned).get("TagSet", [])
        kept = {t["Key"]: t["Value"] for t in found if not t["Key"].startswith(_OURS)}
        if len(kept) + len(tags) > MAX_TAGS:
            raise TooManyTagsError(f"{name} has {len(kept)} tags of its own: no room for "
                                   f"{len(tags)} more within S3's {MAX_TAGS}")
        merged = {**kept, **tags}
        if version_id:
            source._call("TAG", "put_object_tagging", Key=key, VersionId=version_id, Tagging={
                "TagSet": [{"Key": k, "Value": v} for k, v in merged.items()]})
            return None
        return _rewrite(source, rel_path, etag, sha256, urlencode(merged))
    except S3ConditionError as exc:
        raise ChangedError(f"{name} was replaced since it was scanned") from exc


def _rewrite(source: S3Location, rel_path: str, etag: str | None, sha256: str | None,
             tagging: str) -> Rewritten:
    """PUT the scanned bytes back with `tagging`, if the object is still the scanned ETag."""
    name = source.name(rel_path)
    if etag is None or sha256 is None:
        raise ChangedError(f"{name}: no scanned version to write back")
    answer = source.get_answer(rel_path, etag, None)
    size = int(answer.get("ContentLength") or 0)
    if size > _MAX_PUT_BYTES:
        raise LocationError(f"{name} is over 5 GiB: it cannot be tagged in place on an unversioned "
                            "bucket (one PUT); turn on versioning (docs/contract.md, \"S3 in place\")")
    with source.private_copy(size) as copy:
        with contextlib.closing(answer["Body"]) as body:
            got, _ = copy_hashing(body, copy.fileno())
        if got != sha256:  # an ETag is an MD5: other bytes under it are not the ones judged
            raise ChangedError(f"{name} no longer holds the scanned bytes")
        copy.seek(0)
        kept = {k: answer[k] for k in _KEPT if answer.get(k)}
        put = source._call("PUT", "put_object", Key=source.key(rel_path), Body=copy, IfMatch=etag,
                          Tagging=tagging, **kept)
    new_etag = quoted_etag(str(put["ETag"])) if put.get("ETag") else etag
    try:  # which LastModified our write has: asked of exactly our ETag
        head = source._call("HEAD", "head_object", Key=source.key(rel_path), IfMatch=new_etag)
        last_modified: float | None = epoch(head["LastModified"])
    except (LocationError, FileNotFoundError):  # replaced at once (a new arrival), or S3 away
        last_modified = None
    return Rewritten(new_etag, last_modified)


def _version_of(source: S3Location, key: str, etag: str | None) -> str | None:
    """The VersionId of the scanned ETag where the bucket keeps versions (a listing names none).

    Asked with `IfMatch`: a version of other bytes is refused (ChangedError via the caller).
    """
    if etag is None:
        return None
    head = source._call("HEAD", "head_object", Key=key, IfMatch=etag)
    version = head.get("VersionId")
    return None if version in (None, "", "null") else str(version)
