"""S3 plumbing shared by the S3 watcher and S3 locations: URLs, clients, keys, errors."""

from __future__ import annotations

import errno
import hashlib
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import boto3
import botocore.session
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from daemon.errors import (
    LocationError,
    QueueUnavailableError,
    S3ConditionError,
    S3UnavailableError,
    UnsafePathError,
)
from daemon.fsutil import rel_parts

if TYPE_CHECKING:  # config imports this module for S3Url
    from daemon.config import S3Config

__all__ = ["S3Clients", "S3Url", "epoch", "error_code", "flat_name", "is_s3", "local_rel", "make_client",
           "s3_boundary", "s3_errors", "sqs_boundary"]

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_MAX_SEGMENT_BYTES = 255
_FLAT_NAME_BYTES = 200
# Codes that say "this will not work until someone changes something": wait, don't fail.
_MISSING = frozenset({"404", "NoSuchKey", "NoSuchVersion", "NotFound"})
_CONDITION = frozenset({"412", "PreconditionFailed"})
_UNAVAILABLE = {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500"}


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


def local_rel(rel_path: str) -> str:
    """The relative local path for a key's relative part, or UnsafePathError.

    Keys are not paths: a leading `/`, empty and `.` segments are dropped, while `..`,
    NUL and over-long segments cannot be made safe (reason `unsafe_key`).
    """
    parts = [p for p in rel_path.split("/") if p not in ("", ".")]
    try:
        rel_parts("/".join(parts))
    except UnsafePathError:
        raise UnsafePathError(f"S3 key part {rel_path!r} cannot be a local path") from None
    if any(len(p.encode("utf-8", "surrogateescape")) > _MAX_SEGMENT_BYTES for p in parts):
        raise UnsafePathError(f"S3 key part {rel_path!r} has a segment over 255 bytes")
    return "/".join(parts)


def flat_name(rel_path: str) -> str:
    """One safe file name standing for a whole key part or local path: every `/`, `.` and odd
    byte %-escaped (a byte that is not UTF-8, kept by `surrogateescape`, as itself)."""
    name = quote(rel_path.encode("utf-8", "surrogateescape"), safe="").replace(".", "%2E")
    if not name or len(name) > _FLAT_NAME_BYTES:  # room left for a collision suffix and the sidecar's
        digest = hashlib.sha256(rel_path.encode(errors="surrogateescape")).hexdigest()[:12]
        head = name[: _FLAT_NAME_BYTES - 13]
        cut = head.rfind("%", len(head) - 2)  # keep %-escapes whole
        name = f"{head if cut < 0 else head[:cut]}@{digest}"
    return name


def make_client(config: S3Config) -> Any:
    """A thread-safe boto3 S3 client with the usual credential chain and `s3:` overrides."""
    core = botocore.session.get_session()
    # Timestamps (LastModified, ...) stay strings, as the AWS CLI keeps them: nothing here
    # reads them, and parsing them was a tenth of the daemon's CPU in a backlog.
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    return boto3.session.Session(botocore_session=core, profile_name=config.profile).client(
        "s3", endpoint_url=config.endpoint_url, region_name=config.region,
        config=BotoConfig(connect_timeout=5, read_timeout=60, max_pool_connections=64,
                          retries={"mode": "standard", "max_attempts": 3},
                          s3={"addressing_style": "path"} if config.endpoint_url else None))


class S3Clients:
    """One S3 client per distinct endpoint, region and profile (watches may override them)."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str | None, ...], Any] = {}
        self._lock = threading.Lock()

    def __call__(self, config: S3Config) -> Any:
        key = (config.endpoint_url, config.region, config.profile)
        with self._lock:
            if key not in self._clients:
                self._clients[key] = make_client(config)
            return self._clients[key]


def error_code(exc: ClientError) -> str:
    """The S3 error code of a ClientError (`NoSuchKey`, `PreconditionFailed`, ...)."""
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextmanager
def s3_boundary(what: str) -> Iterator[None]:
    """Translate what boto3 raises inside into scanwatch's errors; `what` names the call and object.

    A missing key or version is FileNotFoundError, a failed condition S3ConditionError,
    S3 down, throttling or denying S3UnavailableError (wait), anything else LocationError.
    Nothing above this module (and the watchers' listing) catches a botocore error.
    """
    try:
        yield
    except ClientError as exc:
        code = error_code(exc)
        if code in _MISSING:
            raise FileNotFoundError(errno.ENOENT, f"no such object ({code})", what) from exc
        if code in _CONDITION:
            raise S3ConditionError(f"{what}: {code}") from exc
        raise s3_errors(what, exc) from exc
    except (BotoCoreError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise S3UnavailableError(f"{what}: {exc}") from exc


@contextmanager
def sqs_boundary(action: str, queue: str) -> Iterator[None]:
    """What boto3 raises for an SQS call becomes QueueUnavailableError, naming `action` and `queue`."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code")
        raise QueueUnavailableError(
            f"SQS {action} on queue {queue!r} failed: {code}: {error.get('Message', '')}; check "
            f"events.sqs_queue_url and that the daemon may receive, delete and change the "
            f"visibility of its messages", action=action, code=code) from exc
    except BotoCoreError as exc:
        raise QueueUnavailableError(f"SQS {action} on queue {queue!r} failed: {exc}",
                                    action=action) from exc


def s3_errors(what: str, exc: Exception) -> LocationError:
    """A LocationError for a failed S3 call; S3UnavailableError when waiting may help."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        message = f"{what}: {code} {exc.response.get('Error', {}).get('Message', '')}".strip()
        return S3UnavailableError(message) if code in _UNAVAILABLE else LocationError(message)
    if isinstance(exc, BotoCoreError):
        return S3UnavailableError(f"{what}: {exc}")
    return LocationError(f"{what}: {exc}")


def epoch(last_modified: Any) -> float:
    """LastModified as whole epoch seconds: from a datetime, or the string our clients keep it as
    (ISO 8601 in listings, RFC 7231 in the headers of HEAD and GET). Whole seconds, as headers
    carry it, so that a listing's and a GET's LastModified of one version are equal."""
    if isinstance(last_modified, datetime):
        return float(int(last_modified.timestamp()))
    text = str(last_modified)
    if text[:1].isdigit():
        return float(int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()))
    return float(int(parsedate_to_datetime(text).timestamp()))
