"""Blazelock (docs/engines.md#blazelock): upload only, async or sync, resumed by external reference ID.

A submission that may have happened (a lost answer, a crash before the scan id was
journaled) is never repeated blindly: submitting the same external reference ID again
answers 409, and the scan is looked up by that ID and followed. A found scan that
failed, or is older than `reuse_max_age`, is submitted again as `<id>.2`, `.3`...
With `webhook:` configured, running scans are polled slower while events arrive, and
an event makes the next poll due at once (daemon/webhooks.py receives them). Events
(docs/engines.md#blazelock-webhooks): `X-Blazelock-Webhook-Signature` is the hex HMAC-SHA256 of
`"{X-Blazelock-Webhook-Timestamp}.{raw body}"` with the secret; stale timestamps are
refused. `file_scan.completed|failed` name their scan; `submitted` is only acknowledged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from datetime import datetime
from email.message import Message
from typing import Any
from urllib.parse import quote

import httpx
import structlog

from daemon.config import BlazelockEngineConfig
from daemon.engines._http import PacedClient, check_status, json_object
from daemon.engines._pacing import Pacer
from daemon.engines._webhook import WebhookHealth, json_body, secret_bytes, webhook_address
from daemon.engines.base import ScanHandle, ScanRequest, refuse_too_large
from daemon.errors import EnginePermanentError, EngineResubmitError, WebhookRejectedError
from daemon.model import Pending, Reason, RejectReason, Verdict, VerdictKind
from daemon.refid import build_ref_id
from daemon.timefmt import parse_iso

__all__ = ["SYNC_LIMIT_BYTES", "BlazelockEngine"]

log = structlog.get_logger("scanwatch.engines.blazelock")

SYNC_LIMIT_BYTES = 10_000_000
_MAX_GENERATIONS = 20
# docs/engines.md#blazelock-webhooks: refuse timestamps older than 5 minutes (and as far ahead).
_MAX_SKEW_S = 300.0
_FINISHED_EVENTS = ("file_scan.completed", "file_scan.failed")


class BlazelockEngine:
    """Blazelock's file-scans API with `mode: async` (default) or `sync`."""

    remote = True
    reads_s3 = False

    def __init__(self, name: str, config: BlazelockEngineConfig, pacer: Pacer | None = None) -> None:
        self.name = name
        self._config = config
        self._url = config.url.rstrip("/")
        self.webhook_address = webhook_address(name, "webhook", config.webhook)
        self.webhook_health = WebhookHealth()
        self._client = PacedClient(name, self._url, config.timeout,
                                   {"Authorization": f"Bearer {config.api_key.get_secret_value()}"},
                                   pacer or Pacer(name, config.rate_limit))

    # -- Engine ------------------------------------------------------------------------------

    def scan(self, request: ScanRequest) -> Verdict | Pending:
        """Upload the file (streamed from its fd); follow an existing scan of its ID instead."""
        refuse_too_large(self.name, self._config.max_size, request)
        sync = self._config.mode == "sync" and request.size <= SYNC_LIMIT_BYTES
        if self._config.mode == "sync" and not sync:  # logged so (docs/engines.md#blazelock)
            log.info("scan.sync_too_large", engine=self.name, path=request.path, size=request.size,
                     sync_limit=SYNC_LIMIT_BYTES, endpoint="/file-scans")
        ref_id = request.ref_id
        for generation in range(2, _MAX_GENERATIONS + 2):
            response = self._submit(request, ref_id, sync)
            if response.status_code != 409:
                return self._answer(response, ref_id)
            found = self._lookup(ref_id)
            if found is None:  # not visible yet: look again later, never resubmit blindly
                return self._pending(f"ref:{ref_id}")
            if not self._is_stale(found):
                return self._follow(found, ref_id)
            ref_id = build_ref_id(request.watch, request.rel_path, request.sha256, generation)
        raise EnginePermanentError(f"{_MAX_GENERATIONS} generations of {request.ref_id} all failed",
                                   reason=Reason.ENGINE_FAILED)

    def poll(self, scan: ScanHandle) -> Verdict | Pending:
        """Follow a submitted scan; a scan known only by reference (or in doubt) is looked up.

        A scan the service lost, or an in-doubt submission it never saw, raises
        `EngineResubmitError`: submitting the same reference again answers 409 if it
        did arrive, so the repeat is a lookup, never a second scan.
        """
        scan_id = scan.engine_scan_id
        if scan_id is None or scan_id.startswith("ref:"):
            ref_id = scan.ref_id if scan_id is None else scan_id.removeprefix("ref:")
            found = self._lookup(ref_id)
            if found is not None and (scan_id is not None or not self._is_stale(found)):
                return self._follow(found, ref_id)
            if scan_id is not None:
                return self._pending(scan_id)
            raise EngineResubmitError(f"engine {self.name!r}: no usable scan of {ref_id}: submitting "
                                      "again by the same reference")
        response = self._get(f"/file-scans/{quote(scan_id, safe='')}")
        if response.status_code == 404:  # the scan is gone: start over, by reference
            raise EngineResubmitError(f"engine {self.name!r}: scan {scan_id} is gone: submitting "
                                      f"{scan.ref_id} again")
        check_status(response, self.name)
        return self._follow(_scan_object(response), scan.ref_id)

    def probe(self) -> str:
        """An authenticated lookup of a reference that does not exist: 404 means all is well."""
        response = self._get("/file-scans/external-reference/scanwatch-probe")
        if response.status_code != 404:
            check_status(response, self.name)
        return f"blazelock at {self._url}"

    def close(self) -> None:
        """Close the HTTP connection pool and the pacing state."""
        self._client.close()

    # -- WebhookSource -------------------------------------------------------------------------

    def verify_webhook(self, headers: Message, body: bytes, now: float) -> None:
        """Accept an event signed with our secret at a fresh timestamp; raise `WebhookRejectedError`."""
        timestamp = headers.get("X-Blazelock-Webhook-Timestamp")
        signature = headers.get("X-Blazelock-Webhook-Signature")
        if not timestamp or not signature:
            raise WebhookRejectedError(401, RejectReason.MISSING_HEADERS)
        if not timestamp.isdigit():
            raise WebhookRejectedError(400, RejectReason.BAD_TIMESTAMP)
        secret = secret_bytes(self._config.webhook)
        expected = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), signature.strip().lower().encode()):
            raise WebhookRejectedError(401, RejectReason.BAD_SIGNATURE)
        if abs(now - int(timestamp)) > _MAX_SKEW_S:
            raise WebhookRejectedError(401, RejectReason.STALE_TIMESTAMP)

    def webhook_scan_ids(self, body: bytes) -> list[str]:
        """The journal's ids of the scan a finished-scan event names (none for other events)."""
        event = json_body(body)
        if event.get("event") not in _FINISHED_EVENTS:
            return []
        scan = event.get("data")
        if isinstance(scan, dict) and isinstance(scan.get("data"), dict):
            scan = scan["data"]  # the scan object's own envelope is optional (docs/engines.md#blazelock)
        if not isinstance(scan, dict):
            return []
        ids = [str(scan["id"])] if scan.get("id") else []
        attributes = scan.get("attributes")
        if isinstance(attributes, dict) and attributes.get("external_reference_id"):
            # A scan the engine could not see yet is journaled by reference (`scan`, `_pending`).
            ids.append(f"ref:{attributes['external_reference_id']}")
        return ids

    # -- wire ---------------------------------------------------------------------------------

    def _submit(self, request: ScanRequest, ref_id: str, sync: bool) -> httpx.Response:
        attributes = json.dumps({"file_name": request.name, "external_reference_id": ref_id})
        path = "/file-scans/sync" if sync else "/file-scans"
        # A duplicate of the fd: httpx streams the body from it, never reading it whole.
        with os.fdopen(os.dup(request.bytes_fd), "rb") as body:
            body.seek(0)
            return self._client.request(
                "POST", path, files={"file": (request.name, body, "application/octet-stream")},
                data={"attributes": attributes},
                timeout=self._config.timeout if not sync else max(self._config.timeout, 60.0))

    def _get(self, path: str) -> httpx.Response:
        return self._client.request("GET", path)

    def _lookup(self, ref_id: str) -> dict[str, Any] | None:
        """The scan with this external reference ID, or None if the service has none (yet)."""
        response = self._get(f"/file-scans/external-reference/{quote(ref_id, safe='')}")
        if response.status_code == 404:
            return None
        check_status(response, self.name)
        return _scan_object(response)

    def _is_stale(self, scan: dict[str, Any]) -> bool:
        if scan.get("status") == "failed":
            return True
        created = parse_iso(scan.get("created_at"))
        return created is not None and datetime.now().timestamp() - created > self._config.reuse_max_age

    def _answer(self, response: httpx.Response, ref_id: str) -> Verdict | Pending:
        if response.status_code == 408:
            body = json_object(response)
            if body.get("code") == "sync_scan_timeout" and body.get("file_scan_id"):
                # The scan exists and goes on: poll it, never resubmit (docs/engines.md#blazelock).
                return self._pending(str(body["file_scan_id"]))
        check_status(response, self.name)
        return self._follow(_scan_object(response), ref_id)

    def _pending(self, scan_id: str) -> Pending:
        return Pending(scan_id, self.webhook_health.poll_after_s(self._config.poll_interval))

    def _follow(self, scan: dict[str, Any], ref_id: str) -> Verdict | Pending:
        scan_id = str(scan.get("id", ""))
        status = scan.get("status")
        if status == "processing" or status == "submitted":
            return self._pending(scan_id)
        raw = {"status": status, "result": scan.get("result"), "external_reference_id": ref_id}
        if (duration_s := _duration_s(scan)) is not None:
            raw["scan_duration_s"] = duration_s
        if status == "failed":
            return Verdict(VerdictKind.FAILED, reason=Reason.ENGINE_FAILED, engine_scan_id=scan_id, raw=raw)
        result = scan.get("result") or {}
        if status != "completed" or not isinstance(result.get("safe"), bool):
            raise EnginePermanentError(f"engine {self.name!r}: unexpected scan object {scan!r:.200}",
                                       reason=Reason.ENGINE_FAILED)
        if result["safe"]:
            return Verdict(VerdictKind.CLEAN, engine_scan_id=scan_id, raw=raw)
        threats = tuple(str(f.get("name")) for f in result.get("findings") or [] if f.get("name"))
        return Verdict(VerdictKind.INFECTED, threats=threats or ("unnamed",), engine_scan_id=scan_id,
                       raw=raw)


def _duration_s(scan: dict[str, Any]) -> float | None:
    """The scan's duration: Blazelock sends `scan_duration` (seconds) or `scan_duration_ms`."""
    for key, scale in (("scan_duration", 1.0), ("scan_duration_ms", 0.001)):
        value = scan.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value * scale
    return None


def _scan_object(response: httpx.Response) -> dict[str, Any]:
    """The scan object, with or without its `data` envelope."""
    body = json_object(response)
    inner = body.get("data", body)
    return inner if isinstance(inner, dict) else {}
