"""The per-object S3 requests on a lean path: botocore's signer and retry rules, stdlib HTTP.

At loopback speed botocore's CPU per request bounds an S3 backlog: 1.1 - 1.5 ms per request,
of which SigV4 signing is ~0.07 ms (bench/RESULTS.md, "Issue 21: S3 and the fleet"). The
calls each object makes (GetObject, HeadObject, PutObject of bytes, DeleteObject,
CopyObject) with the parameters scanwatch sends are built, signed, sent and read here:
- signed by botocore's `S3SigV4Auth` with the credentials the boto3 client resolved
  (refreshed as botocore refreshes them), for the URL and signing region botocore resolves
  for the bucket (asked once, from a presigned URL: endpoint, addressing style, region);
- retried as the boto3 client is configured (botocore's standard mode, 3 attempts: its own
  retry conditions and backoff are used);
- answered in boto3's shape: a dict with the same keys, `ClientError` carrying the S3 error
  code, botocore's connection errors; so `s3_boundary` and every caller read them unchanged.
Everything else (listing, tagging, multipart, presigning, bucket checks, SQS) is the boto3
client's, and so is a call with any other parameter, a bucket in another region than
botocore guessed (it follows the redirect), or an endpoint reached through an HTTP proxy.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
import time
import urllib.request
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

from botocore.auth import S3SigV4Auth, _host_from_url
from botocore.awsrequest import AWSRequest
from botocore.exceptions import BotoCoreError, ClientError
from botocore.retries.quota import RetryQuota
from botocore.retries.standard import (
    ExponentialBackoff,
    RetryContext,
    RetryEventAdapter,
    RetryPolicy,
    RetryQuotaChecker,
    StandardRetryConditions,
    ThrottlingErrorDetector,
)

from daemon.s3transport import Body, Pools

__all__ = ["MAX_ATTEMPTS", "USER_AGENT", "LeanS3"]

USER_AGENT = "scanwatch"  # not signed (SigV4 leaves it out); tells these requests from boto3's
MAX_ATTEMPTS = 3  # as the boto3 client's `retries` (daemon/s3client.py, `make_client`)
_OPERATIONS = {"get_object": ("GetObject", "GET"), "head_object": ("HeadObject", "HEAD"),
               "put_object": ("PutObject", "PUT"), "delete_object": ("DeleteObject", "DELETE"),
               "copy_object": ("CopyObject", "PUT")}
_HEADERS = {"IfMatch": "If-Match", "IfNoneMatch": "If-None-Match", "ContentType": "Content-Type",
            "Tagging": "x-amz-tagging", "TaggingDirective": "x-amz-tagging-directive",
            "CopySourceIfMatch": "x-amz-copy-source-if-match"}
_KNOWN = frozenset({"Bucket", "Key", "VersionId", "Body", "CopySource", *_HEADERS})
# Answer headers as boto3 names them (and types them), for the calls above.
_ANSWER: dict[str, tuple[str, Callable[[str], Any]]] = {
    "etag": ("ETag", str), "x-amz-version-id": ("VersionId", str), "last-modified": ("LastModified", str),
    "content-length": ("ContentLength", int), "content-type": ("ContentType", str),
    "content-encoding": ("ContentEncoding", str), "content-disposition": ("ContentDisposition", str),
    "content-language": ("ContentLanguage", str), "cache-control": ("CacheControl", str),
    "x-amz-tagging-count": ("TagCount", int), "x-amz-delete-marker": ("DeleteMarker", lambda v: v == "true"),
    "x-amz-copy-source-version-id": ("CopySourceVersionId", str),
    "x-amz-server-side-encryption": ("ServerSideEncryption", str),
    "x-amz-storage-class": ("StorageClass", str)}
_META = "x-amz-meta-"
# S3 telling that the bucket is in another region than the one signed for: boto3 follows it.
_ELSEWHERE = frozenset({"PermanentRedirect", "TemporaryRedirect", "AuthorizationHeaderMalformed",
                        "IllegalLocationConstraintException", "301", "307"})


class _Place(NamedTuple):
    """Where a bucket's objects are: the URL before `/<key>`, its Host header, the SigV4 scope."""

    base_url: str
    host: str
    region: str
    service: str


class _Answer(NamedTuple):
    """What botocore's retry rules read of an HTTP answer."""

    status_code: int
    headers: Mapping[str, str]


class LeanS3:
    """A boto3 S3 client whose per-object calls take the lean path; thread-safe.

    Every attribute other than those calls is the boto3 client's own.
    """

    def __init__(self, client: Any, credentials: Any, ca_bundle: str | None) -> None:
        self._client = client
        self._credentials = credentials
        self._pools = Pools(ca_bundle)
        self._places: dict[str, _Place | None] = {}
        self._lock = threading.Lock()
        # What botocore's retry rules read of each call (its modelled errors).
        model = client.meta.service_model
        self._models = {name: model.operation_model(name) for name, _ in _OPERATIONS.values()}
        self._seen = threading.local()  # a request boto3 sent for `_learning`
        client.meta.events.register("before-send.s3", self._sending)
        throttling = ThrottlingErrorDetector(RetryEventAdapter())
        self._retry = RetryPolicy(StandardRetryConditions(max_attempts=MAX_ATTEMPTS),
                                  ExponentialBackoff(throttling_detector=throttling))
        self._quota = RetryQuotaChecker(RetryQuota(), throttling)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_object(self, **params: Any) -> dict[str, Any]:
        return self._call("get_object", params)

    def head_object(self, **params: Any) -> dict[str, Any]:
        return self._call("head_object", params)

    def put_object(self, **params: Any) -> dict[str, Any]:
        return self._call("put_object", params)

    def delete_object(self, **params: Any) -> dict[str, Any]:
        return self._call("delete_object", params)

    def copy_object(self, **params: Any) -> dict[str, Any]:
        return self._call("copy_object", params)

    def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """One call, on the lean path where it can take it, else boto3's."""
        if not _is_lean(params):
            return dict(getattr(self._client, method)(**params))
        bucket = params["Bucket"]
        with self._lock:
            known, place = bucket in self._places, self._places.get(bucket)
        if not known:
            return self._learning(method, params)
        if place is None:
            return dict(getattr(self._client, method)(**params))
        operation, verb = _OPERATIONS[method]
        url, headers, body = _request(place, params)
        try:
            return self._send(operation, verb, url, headers, body, place)
        except ClientError as exc:
            if str(exc.response["Error"].get("Code")) not in _ELSEWHERE:
                raise
        with self._lock:  # boto3 follows the bucket's region from now on
            self._places[bucket] = None
        return dict(getattr(self._client, method)(**params))

    def _learning(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Make a bucket's first call with boto3, and learn from the request it sent where the
        bucket is: its URL (endpoint, addressing style) and SigV4 scope (region, service)."""
        self._seen.request = None
        try:
            return dict(getattr(self._client, method)(**params))
        finally:
            sent = self._seen.request
            del self._seen.request
            if sent is not None:
                with self._lock:
                    self._places.setdefault(params["Bucket"], _place_of(sent, params["Key"]))

    def _sending(self, request: Any, **_: Any) -> None:
        """botocore's `before-send`: keep this thread's last request while a bucket is learnt."""
        if hasattr(self._seen, "request"):
            authorization = request.headers.get("Authorization", b"")
            if isinstance(authorization, bytes):
                authorization = authorization.decode("latin-1")
            self._seen.request = (str(request.url), str(authorization))

    def _send(self, operation: str, verb: str, url: str, headers: dict[str, str], body: bytes | None,
              place: _Place) -> dict[str, Any]:
        """Sign and send, retried as botocore's standard mode (its conditions, backoff and
        retry quota); the answer, or what failed."""
        spent: dict[str, Any] = {}  # the retry quota this call took
        for attempt in range(1, MAX_ATTEMPTS + 1):
            answer: _Answer | None = None
            error: dict[str, Any] | None = None
            caught: BotoCoreError | None = None
            try:
                answer, result, error = self._attempt(verb, url, headers, body, place)
                if result is not None:
                    self._quota.release_retry_quota(spent, answer)
                    return result
            except BotoCoreError as exc:
                caught = exc
            context = RetryContext(attempt, operation_model=self._models[operation], parsed_response=error,
                                   http_response=answer, caught_exception=caught, request_context=spent)
            if attempt == MAX_ATTEMPTS or not self._retry.should_retry(context) \
                    or not self._quota.acquire_retry_quota(context):
                if caught is not None:
                    raise caught
                raise ClientError(error, operation)
            time.sleep(self._retry.compute_retry_delay(context))
        raise AssertionError("unreachable")

    def _attempt(self, verb: str, url: str, headers: dict[str, str], body: bytes | None,
                 place: _Place) -> tuple[_Answer, dict[str, Any] | None, dict[str, Any] | None]:
        """One try: the HTTP answer, and the call's result or its parsed error."""
        response, done = self._pools.send(verb, url, self._signed(verb, url, headers, body, place), body)
        answer = _Answer(response.status, {k.lower(): v for k, v in response.getheaders()})
        if verb == "GET" and response.status < 300:
            return answer, _result(answer, Body(response, done, url), b"", verb), None
        with contextlib.ExitStack() as ending:
            ending.callback(done)
            data = Body(response, lambda: None, url).read()
        error = _error(answer, data, verb)
        if error is None:
            return answer, _result(answer, None, data, verb), None
        return answer._replace(status_code=error["ResponseMetadata"]["HTTPStatusCode"]), None, error

    def _signed(self, verb: str, url: str, headers: dict[str, str], body: bytes | None,
                place: _Place) -> dict[str, str]:
        """The headers of the request, signed with the current credentials."""
        credentials = self._credentials.get_frozen_credentials() if self._credentials else None
        request = AWSRequest(method=verb, url=url, headers=headers, data=body or b"")
        S3SigV4Auth(credentials, place.service, place.region).add_auth(request)
        return dict(request.headers.items())


def _place_of(sent: tuple[str, str], key: str) -> _Place | None:
    """Where a request boto3 sent for `key` went, and its SigV4 scope; None when that is not
    one the lean path can send (not SigV4, proxied)."""
    url, authorization = sent
    address = url.partition("?")[0]
    suffix = "/" + quote(key, safe="/~")
    algorithm, _, rest = authorization.partition(" Credential=")
    scope = rest.partition(",")[0].split("/")
    if algorithm != "AWS4-HMAC-SHA256" or len(scope) != 5 or not address.endswith(suffix) \
            or _proxied(address):
        return None
    base_url = address.removesuffix(suffix)
    return _Place(base_url, _host_from_url(base_url), scope[2], scope[3])


def _is_lean(params: Mapping[str, Any]) -> bool:
    """True for the parameters the lean path sends as botocore would."""
    body, source = params.get("Body", b""), params.get("CopySource", {})
    return params.keys() <= _KNOWN and isinstance(body, bytes) and isinstance(source, dict) \
        and source.keys() <= {"Bucket", "Key", "VersionId"}


def _request(place: _Place, params: Mapping[str, Any]) -> tuple[str, dict[str, str], bytes | None]:
    """URL, headers and body of the call, serialised as botocore does for S3."""
    url = f"{place.base_url}/{quote(params['Key'], safe='/~')}"
    if params.get("VersionId"):
        url += f"?versionId={quote(params['VersionId'], safe='-_.~')}"
    headers = {_HEADERS[name]: str(value) for name, value in params.items() if name in _HEADERS}
    headers["User-Agent"] = USER_AGENT
    # The Host botocore signs and http.client would send, given: the signer need not derive
    # it from the URL twice per request (a quarter of its CPU).
    headers["Host"] = place.host
    if source := params.get("CopySource"):
        copied = quote(f"{source['Bucket']}/{source['Key']}", safe="/~")
        if source.get("VersionId"):
            copied += f"?versionId={quote(source['VersionId'], safe='-_.~')}"
        headers["x-amz-copy-source"] = copied
    body = params.get("Body")
    if body is not None:
        headers["Content-Length"] = str(len(body))
    return url, headers, body


def _result(answer: _Answer, body: Body | None, data: bytes, verb: str) -> dict[str, Any]:
    """The call's answer as boto3 gives it."""
    result: dict[str, Any] = {"ResponseMetadata": {"HTTPStatusCode": answer.status_code,
                                                   "HTTPHeaders": dict(answer.headers)}}
    metadata = {}
    for name, value in answer.headers.items():
        if name in _ANSWER:
            key, kind = _ANSWER[name]
            result[key] = kind(value)
        elif name.startswith(_META):
            metadata[name.removeprefix(_META)] = value
    if metadata or verb in ("GET", "HEAD"):
        result["Metadata"] = metadata
    if body is not None:
        result["Body"] = body
    if data:  # CopyObject's CopyObjectResult
        fields = {_local(e.tag): e.text or "" for e in ElementTree.fromstring(data)}
        result["CopyObjectResult"] = {k: fields[k] for k in ("ETag", "LastModified") if k in fields}
    return result


def _error(answer: _Answer, data: bytes, verb: str) -> dict[str, Any] | None:
    """The parsed error of an answer as botocore parses it; None for a success.

    A 200 answer to a copy may carry an error (S3 sends its status before the copy ends).
    """
    root = None
    if data and verb != "HEAD" and (answer.status_code >= 300 or b"<Error>" in data[:512]):
        with contextlib.suppress(ElementTree.ParseError):
            root = ElementTree.fromstring(data)
    if root is not None and _local(root.tag) == "Error":
        fields = {_local(e.tag): e.text or "" for e in root}
        error = {"Code": fields.get("Code", str(answer.status_code)), "Message": fields.get("Message", "")}
    elif answer.status_code >= 300:
        reason = http.client.responses.get(answer.status_code, "")
        error = {"Code": str(answer.status_code), "Message": reason}
    else:
        return None
    status = 500 if answer.status_code < 300 else answer.status_code
    return {"Error": error, "ResponseMetadata": {"HTTPStatusCode": status,
                                                 "HTTPHeaders": dict(answer.headers)}}


def _local(tag: str) -> str:
    """An XML tag without its namespace."""
    return tag.rpartition("}")[2]


def _proxied(url: str) -> bool:
    """True when the environment sends `url` through an HTTP proxy (boto3 honours it; this path not)."""
    parts = urlsplit(url)
    return parts.scheme in urllib.request.getproxies() \
        and not urllib.request.proxy_bypass(parts.hostname or "")
