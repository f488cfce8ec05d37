"""Perception Point X-Ray: upload, or an S3 object by path (`storage`) or presigned link.

The wire protocol: docs/engines.md#perception-point-x-ray.

One multipart `POST /api/v1/files/` carries exactly one of `data` (the bytes, streamed
from the fd), `path` with `storage`, or `download_link`. `path` names no object version,
so it only ever names a private server-side snapshot of the object, which nobody but
scanwatch can write (docs/integrity.md, "Remote engines"). The answer's `scan_id` is
journaled and polled at `GET /api/v1/scans/{scan_id}/` (**assumed** in docs/engines.md#perception-point-x-ray:
the public docs name no result endpoint).

The files API has no external reference: a scan is known only by its `scan_id`. Once
journaled, a restart polls it and never submits again. A submission whose answer was
lost cannot be looked up, so it is submitted again (counted in
`scanwatch_resubmissions_total`): the vendor then holds one extra scan of the same
bytes, and the verdict comes from the scan we know.

With `callback:` configured, each submission asks for a callback that carries our
secret in `X-Scanwatch-Callback-Secret`; the callback's `scan_id` makes the next poll
due at once (daemon/webhooks.py receives them), and polls slow down while they arrive.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import Message
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

from daemon.config import PerceptionPointEngineConfig
from daemon.engines._http import PacedClient, check_status, json_object
from daemon.engines._pacing import Pacer
from daemon.engines._webhook import WebhookHealth, json_body, secret_bytes, webhook_address, webhook_path
from daemon.engines.base import ScanHandle, ScanRequest, Signatures, refuse_too_large
from daemon.errors import EnginePermanentError, EngineResubmitError, WebhookRejectedError
from daemon.model import Pending, Reason, RejectReason, Verdict, VerdictKind

__all__ = ["CALLBACK_SECRET_HEADER", "PerceptionPointEngine"]

CALLBACK_SECRET_HEADER = "X-Scanwatch-Callback-Secret"

_SUBMIT = "/api/v1/files/"
_INFECTED = frozenset({"MAL", "BLK"})
_SUSPICIOUS = frozenset({"SUS", "SPM"})
_SUSPICIOUS_KIND = {"quarantine": VerdictKind.INFECTED, "clean": VerdictKind.CLEAN,
                    "failed": VerdictKind.FAILED}
# A multipart part: (filename, value) for a plain field, (filename, file, type) for the upload.
_Part = tuple[str, tuple[str | None, str] | tuple[str, BinaryIO, str]]


class PerceptionPointEngine:
    """The X-Ray files API; S3 sources by snapshot path (`storage`) or pinned link (`download_link`)."""

    remote = True

    def __init__(self, name: str, config: PerceptionPointEngineConfig, pacer: Pacer | None = None) -> None:
        self.name = name
        self.reads_s3 = config.storage is not None or config.download_link
        self.webhook_address = webhook_address(name, "callback", config.callback)
        self.webhook_health = WebhookHealth()
        self._config = config
        self._url = config.url.rstrip("/")
        self._client = PacedClient(name, self._url, config.timeout,
                                   {"Authorization": f"Token {config.token.get_secret_value()}"},
                                   pacer or Pacer(name, config.rate_limit))

    # -- Engine ------------------------------------------------------------------------------

    def scan(self, request: ScanRequest) -> Verdict | Pending:
        """Submit the file (by path, by link, or uploaded) and return its scan to poll."""
        refuse_too_large(self.name, self._config.max_size, request)
        with self._source_parts(request) as source:
            response = self._request("POST", _SUBMIT, files=[*self._fields(request), *source])
        check_status(response, self.name)
        scan_id = json_object(response).get("scan_id")
        if not isinstance(scan_id, int | str) or not str(scan_id):
            raise EnginePermanentError(f"engine {self.name!r}: no scan_id in {response.text[:200]!r}",
                                       reason=Reason.ENGINE_FAILED)
        return self._pending(str(scan_id))

    def poll(self, scan: ScanHandle) -> Verdict | Pending:
        """The scan's verdict, or Pending while it runs.

        A scan the service lost, and an in-doubt submission (the files API cannot be
        asked by reference), raise `EngineResubmitError`: the bytes are submitted again.
        """
        if scan.engine_scan_id is None:
            raise EngineResubmitError(f"engine {self.name!r}: a submission of {scan.path} may have "
                                      "happened and cannot be looked up: submitting again",
                                      may_duplicate=True)
        response = self._request("GET", f"/api/v1/scans/{quote(scan.engine_scan_id, safe='')}/")
        if response.status_code == 404:
            raise EngineResubmitError(f"engine {self.name!r}: scan {scan.engine_scan_id} is gone: "
                                      f"submitting {scan.path} again")
        check_status(response, self.name)
        return self._verdict(scan.engine_scan_id, json_object(response))

    def signatures(self) -> Signatures:
        """No signature version is reported; `suspicious` changes what a verdict is."""
        return Signatures(f"perception_point:suspicious={self._config.suspicious}", is_versioned=False)

    def probe(self) -> str:
        """An authenticated look at scan 0, which never exists: 404 means the token works.

        **Assumed** (docs/engines.md#perception-point-x-ray): no health endpoint is documented;
        the result endpoint answers 401/403 to a bad token before it looks for the scan.
        """
        response = self._request("GET", "/api/v1/scans/0/")
        if response.status_code != 404:
            check_status(response, self.name)
        return f"perception_point at {self._url}"

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    # -- WebhookSource -------------------------------------------------------------------------

    def verify_webhook(self, headers: Message, body: bytes, now: float) -> None:
        """Accept a callback that carries the secret we asked for; raise `WebhookRejectedError`."""
        given = headers.get(CALLBACK_SECRET_HEADER)
        if not given:
            raise WebhookRejectedError(401, RejectReason.MISSING_HEADERS)
        if not hmac.compare_digest(secret_bytes(self._config.callback), given.encode()):
            raise WebhookRejectedError(401, RejectReason.BAD_SECRET)

    def webhook_scan_ids(self, body: bytes) -> list[str]:
        """The scan id of a callback."""
        scan_id = json_body(body).get("scan_id")
        return [str(scan_id)] if isinstance(scan_id, int | str) and str(scan_id) else []

    # -- wire ---------------------------------------------------------------------------------

    def _fields(self, request: ScanRequest) -> list[_Part]:
        """The plain fields of a submission: name, password, callback."""
        fields: dict[str, str] = {"name": request.name}
        if request.archive_password is not None:
            fields["file_password"] = request.archive_password
        if (callback := self._config.callback) is not None:
            base = callback.public_url or f"http://{callback.listen}"
            fields["callback_url"] = base.rstrip("/") + webhook_path(self.name)
            fields["callback_params"] = json.dumps({"engine": self.name})
            fields["callback_headers"] = json.dumps(
                {CALLBACK_SECRET_HEADER: callback.secret.get_secret_value()})
        # Plain fields as parts without a file name keep the body multipart in every mode.
        return [(key, (None, value)) for key, value in fields.items()]

    @contextmanager
    def _source_parts(self, request: ScanRequest) -> Iterator[list[_Part]]:
        """What names the bytes: a snapshot's `path`, a pinned `download_link`, or the streamed `data`."""
        s3 = request.s3
        if s3 is not None and self.reads_s3 and not request.by_upload:
            # Only what nobody else can change may be read by name (docs/integrity.md, "Remote
            # engines"): `path` names no version, so it only ever names a private snapshot; a
            # link is presigned with the VersionId, or of a snapshot. Else the hashed copy is uploaded.
            if self._config.storage is not None and s3.is_snapshot:
                yield [("path", (None, f"{s3.bucket}/{s3.key}")), ("storage", (None, self._config.storage))]
                return
            if s3.version_id is not None or s3.is_snapshot:
                yield [("download_link", (None, s3.url))]
                return
        # A duplicate of the fd: httpx streams the part from it, never reading it whole.
        with os.fdopen(os.dup(request.bytes_fd), "rb") as body:
            body.seek(0)
            yield [("data", (request.name, body, "application/octet-stream"))]

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self._client.request(method, path, **kw)

    def _pending(self, scan_id: str) -> Pending:
        return Pending(scan_id, self.webhook_health.poll_after_s(self._config.poll_interval))

    def _verdict(self, scan_id: str, result: dict[str, Any]) -> Verdict | Pending:
        """Map a scan result: CLN clean, MAL/BLK infected, SUS/SPM per `suspicious`, error failed."""
        status, verdict = result.get("status"), result.get("verdict")
        if status == "pending":
            return self._pending(scan_id)
        threats = tuple(str(t) for t in result.get("threats") or [] if t)
        raw = {"scan_id": scan_id, "status": status, "verdict": verdict, "threats": list(threats)}
        if status == "error":
            return Verdict.failed(Reason.ENGINE_FAILED, engine_scan_id=scan_id, raw=raw)
        if status == "done" and verdict == "CLN":
            return Verdict(VerdictKind.CLEAN, engine_scan_id=scan_id, raw=raw)
        if status == "done" and verdict in _INFECTED:
            return Verdict(VerdictKind.INFECTED, threats=threats or (verdict,), engine_scan_id=scan_id,
                           raw=raw)
        if status == "done" and verdict in _SUSPICIOUS:
            kind = _SUSPICIOUS_KIND[self._config.suspicious]
            return Verdict(kind, threats=(threats or (verdict,)) if kind is VerdictKind.INFECTED else (),
                           reason=None if kind is VerdictKind.CLEAN else Reason.SUSPICIOUS,
                           engine_scan_id=scan_id, raw=raw)
        raise EnginePermanentError(f"engine {self.name!r}: unexpected scan result {result!r:.200}",
                                   reason=Reason.ENGINE_FAILED)
