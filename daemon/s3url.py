"""S3's own names for things: `s3://bucket/prefix/` locations, ETags, tag values (no boto3 here).

`daemon.config` parses watch locations with this module, so loading a config never loads boto3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["S3Url", "bare_etag", "is_s3", "quoted_etag", "tag_value"]

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# What S3 allows in a tag value everywhere (letters, digits, spaces, `+ - = . _ : / @`): ASCII only,
# as some services that read tags refuse the rest.
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9 +\-=._:/@]")
_TAG_VALUE_CHARS = 256


def is_s3(location: str) -> bool:
    """True for an `s3://bucket/prefix/` location."""
    return location.startswith("s3://")


@dataclass(frozen=True)
class S3Url:
    """`s3://bucket/prefix/`: a bucket and a key prefix that is empty or ends with `/`."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, text: str) -> S3Url:
        """Parse and check a location; ValueError says what is wrong."""
        bucket, _, prefix = text.removeprefix("s3://").partition("/")
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise ValueError(f"{bucket!r} is not a valid S3 bucket name (3-63 of a-z 0-9 . -)")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        if "//" in prefix or prefix.startswith("/"):
            raise ValueError("the key prefix has an empty segment")
        return cls(bucket, prefix)

    def key(self, rel_path: str) -> str:
        """The object key of `rel_path` under this prefix."""
        return self.prefix + rel_path

    def contains(self, other: S3Url) -> bool:
        """True when every key under `other` is also under this prefix."""
        return self.bucket == other.bucket and other.prefix.startswith(self.prefix)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def quoted_etag(etag: str) -> str:
    """An ETag as listings and HEAD give it, quoted (events and some copies leave the quotes off);
    the journal keeps ETags this way."""
    return f'"{bare_etag(etag)}"'


def bare_etag(etag: str) -> str:
    """An ETag without its quotes, as S3 event notifications spell it."""
    return etag.strip('"')


def tag_value(text: str) -> str:
    """`text` as an S3 tag value: each character S3 may refuse becomes `_`, cut to 256 characters."""
    return _TAG_UNSAFE.sub("_", text)[:_TAG_VALUE_CHARS]
