"""The S3 client and its error boundaries: the one module where boto3 and botocore are met.

`s3_boundary` and `sqs_boundary` turn what boto3 raises into scanwatch's errors (docs/contract.md);
`list_objects` is the one listing loop of the watchers, the fleet's safety net, rescans and the
staged-copy cleanup.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from daemon.errors import LocationError, QueueUnavailableError, S3ConditionError, S3UnavailableError
from daemon.s3url import S3Url

if TYPE_CHECKING:
    from botocore.exceptions import BotoCoreError, ClientError

    from daemon.config import EventsConfig, S3Config

__all__ = ["S3Clients", "epoch", "error_code", "list_objects", "make_client", "make_sqs_client",
           "profile_names", "s3_boundary", "s3_errors", "sqs_boundary"]

# boto3 and botocore are imported when first needed: a daemon whose watches are all local
# never loads them, in the parent or in a worker (a start-up is mostly imports, ~0.1 s of
# CPU per process for these: bench/RESULTS.md, "Issue 21: performance, local YARA burst").


def _botocore_errors() -> tuple[type[ClientError], type[BotoCoreError]]:
    """botocore's ClientError and BotoCoreError (no call raised them if it is not loaded yet)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return ClientError, BotoCoreError


# Codes that say "this will not work until someone changes something": wait, don't fail.
_MISSING = frozenset({"404", "NoSuchKey", "NoSuchVersion", "NotFound"})
_CONDITION = frozenset({"412", "PreconditionFailed"})
_UNAVAILABLE = {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500"}


def make_client(config: S3Config) -> Any:
    """A thread-safe S3 client with the usual credential chain and `s3:` overrides.

    Made once per endpoint, region and profile (`S3Clients`) and shared by every thread. At
    loopback speed botocore's CPU per request is what bounds a backlog (bench/RESULTS.md,
    "Issue 21: S3 and the fleet"), so the calls each object makes take a lean path with the
    same signing, credentials, endpoint, TLS settings, retries and errors (`LeanS3`,
    daemon/s3requests.py); every other call is this boto3 client's, which does no work that
    scanwatch does itself:
    - no parameter validation: the bucket is checked when the config is loaded
      (`S3Url.parse`), a key is either one S3 listed or sent, or checked before it is planned
      (`_check_key`, daemon/locations/s3.py), every other parameter is written in this code;
    - CRC checksums only where S3 requires one (`when_required`): every byte scanwatch reads
      is hashed (sha256) on the way and what is promoted is checked against the scanned
      sha256 (docs/integrity.md); a write is covered by TLS and, on plain HTTP, by SigV4's
      signed payload hash.
    """
    import boto3
    import botocore.session
    from botocore.config import Config as BotoConfig

    from daemon.s3requests import MAX_ATTEMPTS, LeanS3
    from daemon.s3transport import CONNECT_TIMEOUT_S, READ_TIMEOUT_S

    core = botocore.session.get_session()
    # Timestamps (LastModified, ...) stay strings, as the AWS CLI keeps them: nothing here
    # reads them, and parsing them was a tenth of the daemon's CPU in a backlog.
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    client = boto3.session.Session(botocore_session=core, profile_name=config.profile).client(
        "s3", endpoint_url=config.endpoint_url, region_name=config.region,
        config=BotoConfig(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                          max_pool_connections=64,
                          retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
                          parameter_validation=False, request_checksum_calculation="when_required",
                          response_checksum_validation="when_required",
                          s3={"addressing_style": "path"} if config.endpoint_url else None))
    # The very credentials (refreshable) and CA bundle the boto3 client was made with.
    return LeanS3(client, core.get_credentials(), core.get_config_variable("ca_bundle"))


def make_sqs_client(events: EventsConfig, s3_config: S3Config) -> Any:
    """A boto3 SQS client for a watch's `events:` queue (its region: the queue's own, else `s3:`'s)."""
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.session.Session(profile_name=s3_config.profile).client(
        "sqs", endpoint_url=events.endpoint_url,
        region_name=events.region or s3_config.region or _queue_region(events.sqs_queue_url),
        config=BotoConfig(connect_timeout=5, read_timeout=40,
                          retries={"mode": "standard", "max_attempts": 3}))


def _queue_region(url: str) -> str | None:
    """`https://sqs.eu-west-1.amazonaws.com/123/q` → `eu-west-1`."""
    host = url.split("/")[2] if url.count("/") >= 2 else ""
    parts = host.split(".")
    return parts[1] if len(parts) > 3 and parts[0] == "sqs" else None


def profile_names() -> list[str]:
    """The named profiles of the AWS config files."""
    import boto3

    return list(boto3.session.Session().available_profiles)


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
    except Exception as exc:
        client_error, core_error = _botocore_errors()
        if isinstance(exc, client_error):
            code = error_code(exc)
            if code in _MISSING:
                raise FileNotFoundError(errno.ENOENT, f"no such object ({code})", what) from exc
            if code in _CONDITION:
                raise S3ConditionError(f"{what}: {code}") from exc
            raise s3_errors(what, exc) from exc
        if isinstance(exc, (core_error, OSError)) and not isinstance(exc, FileNotFoundError):
            raise S3UnavailableError(f"{what}: {exc}") from exc
        raise


@contextmanager
def sqs_boundary(action: str, queue: str) -> Iterator[None]:
    """What boto3 raises for an SQS call becomes QueueUnavailableError, naming `action` and `queue`."""
    try:
        yield
    except Exception as exc:
        client_error, core_error = _botocore_errors()
        if isinstance(exc, client_error):
            error = exc.response.get("Error", {})
            code = error.get("Code")
            raise QueueUnavailableError(
                f"SQS {action} on queue {queue!r} failed: {code}: {error.get('Message', '')}; check "
                f"events.sqs_queue_url and that the daemon may receive, delete and change the "
                f"visibility of its messages", action=action, code=code) from exc
        if isinstance(exc, core_error):
            raise QueueUnavailableError(f"SQS {action} on queue {queue!r} failed: {exc}",
                                        action=action) from exc
        raise


def s3_errors(what: str, exc: Exception) -> LocationError:
    """A LocationError for a failed S3 call; S3UnavailableError when waiting may help."""
    client_error, core_error = _botocore_errors()
    if isinstance(exc, client_error):
        code = error_code(exc)
        message = f"{what}: {code} {exc.response.get('Error', {}).get('Message', '')}".strip()
        return S3UnavailableError(message) if code in _UNAVAILABLE else LocationError(message)
    if isinstance(exc, core_error):
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


def list_objects(client: Any, where: S3Url, *, page_size: int | None = None) -> Iterator[list[Any]]:
    """The objects under `where`, one list per page of `list_objects_v2` (each object as S3 lists
    it: Key, ETag, Size, LastModified); what boto3 raises leaves as `s3_boundary` says."""
    paging = {"PaginationConfig": {"PageSize": page_size}} if page_size else {}
    paginator = client.get_paginator("list_objects_v2")
    pages = paginator.paginate(Bucket=where.bucket, Prefix=where.prefix, **paging)
    with s3_boundary(f"LIST {where}"):
        for page in pages:
            yield list(page.get("Contents", ()))
