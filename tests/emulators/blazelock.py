"""A strict Blazelock file-scans API on 127.0.0.1 (docs/engines.md, "Blazelock").

Given a `webhook_url` and `webhook_secret`, it also posts signed `file_scan.*` events:
`submitted` at once, `completed`/`failed` when the scan finishes.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import re
import time
from datetime import UTC, datetime
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote

from ._server import Emulator, Logged, post_json

EICAR_MARK = b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE"
FAIL_MARK = b"BLZ-FAIL"
ASYNC_LIMIT = 100_000_000
SYNC_LIMIT = 10_000_000
_REF = re.compile(r"[A-Za-z0-9._:/#@-]{1,255}")


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """`X-Blazelock-Webhook-Signature`: hex HMAC-SHA256 of `"{timestamp}.{raw_body}"`."""
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


class BlazelockEmulator(Emulator):
    """Scans finish `scan_delay_s` after submission; sync requests wait up to `sync_timeout_s`."""

    def __init__(self, api_key: str = "test-key", *, scan_delay_s: float = 0.0,
                 sync_timeout_s: float = 1.0, rate_limit: int = 10_000, envelope: bool = True,
                 webhook_url: str | None = None, webhook_secret: str = "") -> None:
        super().__init__()
        self.api_key = api_key
        self.forbidden_keys: set[str] = set()
        self.scan_delay_s = scan_delay_s
        self.sync_timeout_s = sync_timeout_s
        self.rate_limit = rate_limit
        self.envelope = envelope
        self.duration_in_seconds = False  # `scan_duration` (s) instead of `scan_duration_ms`
        self.async_status = 201  # Blazelock answers an async upload 201, 200 or 202 (docs/engines.md)
        self.scans: dict[str, dict[str, Any]] = {}
        self.by_ref: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._window: list[float] = []
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.webhook_repeats = 1  # deliveries of each event (Blazelock repeats them)
        self.webhook_bad_signature = False  # sign with another secret
        self.deliveries: list[tuple[str, str, int]] = []  # (event, scan id, status answered)

    def submissions(self) -> list[Logged]:
        """Accepted uploads (POSTs answered 200, 201 or 202)."""
        return [e for e in self.log if e.method == "POST" and e.status in (200, 201, 202)]

    # -- handling ----------------------------------------------------------------------------

    def handle(self, handler: BaseHTTPRequestHandler, entry: Logged) -> None:
        auth = handler.headers.get("Authorization", "")
        if auth != f"Bearer {self.api_key}" and auth.removeprefix("Bearer ") not in self.forbidden_keys:
            self.drain(handler)
            return self.reply(handler, entry, 401, {"code": "unauthenticated", "message": "bad key"})
        if auth.removeprefix("Bearer ") in self.forbidden_keys:
            self.drain(handler)
            return self.reply(handler, entry, 403, {"code": "forbidden", "message": "key revoked"})
        limited = self._rate_headers()
        if limited is None:
            self.drain(handler)
            return self.reply(handler, entry, 429, {"code": "throttle_requests", "message": "slow down"},
                              {"Retry-After": "1", "X-RateLimit-Limit": str(self.rate_limit),
                               "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1"})
        path = handler.path
        if handler.command == "POST" and path in ("/file-scans", "/file-scans/sync"):
            return self._submit(handler, entry, sync=path.endswith("/sync"), headers=limited)
        # The ID is one path segment: its `/` comes as %2F, its `#` as %23 (a raw `/` is
        # another path, a raw `#` a fragment); nothing else is found.
        if handler.command == "GET" and path.startswith("/file-scans/external-reference/"):
            segment = path.removeprefix("/file-scans/external-reference/")
            scan_id = None if "/" in segment else self.by_ref.get(unquote(segment))
            return self._show(handler, entry, scan_id, limited)
        if handler.command == "GET" and path.startswith("/file-scans/"):
            segment = path.removeprefix("/file-scans/")
            return self._show(handler, entry, None if "/" in segment else unquote(segment), limited)
        self.drain(handler)
        self.reply(handler, entry, 404, {"code": "resource_not_found", "message": path})

    def _rate_headers(self) -> dict[str, str] | None:
        now = time.monotonic()
        with self.lock:
            self._window = [t for t in self._window if now - t < 60]
            if len(self._window) >= self.rate_limit:
                return None
            self._window.append(now)
            remaining = self.rate_limit - len(self._window)
        return {"X-RateLimit-Limit": str(self.rate_limit), "X-RateLimit-Remaining": str(remaining),
                "X-RateLimit-Reset": "60"}

    def _submit(self, handler: BaseHTTPRequestHandler, entry: Logged, *, sync: bool,
                headers: dict[str, str]) -> None:
        limit = SYNC_LIMIT if sync else ASYNC_LIMIT
        length = int(handler.headers.get("Content-Length") or 0)
        if length > limit + 65536:
            handler.close_connection = True  # refused before reading the body
            return self.reply(handler, entry, 413, {"code": "file_too_large", "message": f"> {limit}"},
                              {"Connection": "close"})
        raw = self.drain(handler)
        entry.body_bytes = len(raw)
        content_type = handler.headers.get("Content-Type", "")
        message = BytesParser(policy=HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        parts = {p.get_param("name", header="content-disposition"): p for p in message.iter_parts()} \
            if message.is_multipart() else {}
        file_part, attributes_part = parts.get("file"), parts.get("attributes")
        if file_part is None or attributes_part is None or not file_part.get_filename():
            return self.reply(handler, entry, 422, {"code": "validation_failed", "message": "file and "
                              "attributes are required", "validation": {"file": ["required"]}})
        data = file_part.get_payload(decode=True) or b""
        try:
            attributes = json.loads(attributes_part.get_payload(decode=True) or b"")
        except ValueError:
            attributes = None
        ref = attributes.get("external_reference_id") if isinstance(attributes, dict) else None
        entry.fields = {"file_name": str(attributes.get("file_name")) if attributes else "",
                        "external_reference_id": str(ref), "filename": file_part.get_filename()}
        if not isinstance(ref, str) or not _REF.fullmatch(ref):
            return self.reply(handler, entry, 422, {"code": "validation_failed", "message": "bad id",
                              "validation": {"external_reference_id": ["invalid"]}})
        if not isinstance(attributes.get("file_name"), str) or not attributes["file_name"]:
            return self.reply(handler, entry, 422, {"code": "validation_failed", "message": "no name",
                              "validation": {"file_name": ["required"]}})
        if len(data) > limit:
            return self.reply(handler, entry, 413, {"code": "file_too_large", "message": f"> {limit}"})
        with self.lock:
            if ref in self.by_ref:
                return self.reply(handler, entry, 409, {"code": "duplicate_external_reference_id",
                                                        "message": ref})
            scan_id = f"fs_{next(self._ids):06d}"
            self.by_ref[ref] = scan_id
            self.scans[scan_id] = {
                "id": scan_id, "attributes": {"file_name": attributes["file_name"],
                                              "external_reference_id": ref},
                "created_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "_ready_at": time.monotonic() + self.scan_delay_s,
                "_failed": FAIL_MARK in data, "_safe": EICAR_MARK not in data,
            }
        if self.webhook_url:
            self.later(0.0, self._deliver, "file_scan.submitted", scan_id)
            self.later(self.scan_delay_s, self._deliver,
                       "file_scan.failed" if FAIL_MARK in data else "file_scan.completed", scan_id)
        if sync:
            if self.scan_delay_s > self.sync_timeout_s:
                time.sleep(self.sync_timeout_s)
                return self.reply(handler, entry, 408, {"code": "sync_scan_timeout",
                                                        "file_scan_id": scan_id})
            time.sleep(self.scan_delay_s)
        self.reply(handler, entry, 200 if sync else self.async_status, self._view(scan_id), headers)

    def _show(self, handler: BaseHTTPRequestHandler, entry: Logged, scan_id: str | None,
              headers: dict[str, str]) -> None:
        self.drain(handler)
        if scan_id is None or scan_id not in self.scans:
            return self.reply(handler, entry, 404, {"code": "resource_not_found", "message": "no scan"})
        self.reply(handler, entry, 200, self._view(scan_id), headers)

    def _view(self, scan_id: str) -> dict[str, Any]:
        scan = self.scans[scan_id]
        view = {k: v for k, v in scan.items() if not k.startswith("_")}
        if time.monotonic() < scan["_ready_at"]:
            view["status"] = "processing"
        elif scan["_failed"]:
            view["status"] = "failed"
        else:
            view["status"] = "completed"
            findings = [] if scan["_safe"] else [{"name": "EICAR-Test-File", "severity": "high"}]
            view["result"] = {"safe": scan["_safe"], "detailed": "", "findings": findings}
            if self.duration_in_seconds:
                view["scan_duration"] = self.scan_delay_s
            else:
                view["scan_duration_ms"] = int(self.scan_delay_s * 1000)
        return {"data": view} if self.envelope else view

    # -- webhooks -----------------------------------------------------------------------------

    def _deliver(self, event: str, scan_id: str) -> None:
        assert self.webhook_url is not None
        with self.lock:
            scan = self._view(scan_id)
        body = json.dumps({"event": event, "integration_id": "int_emulator",
                           "occurred_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                           "data": scan.get("data", scan)}).encode()
        for _ in range(self.webhook_repeats):
            timestamp = str(int(time.time()))
            secret = "not-the-secret" if self.webhook_bad_signature else self.webhook_secret
            status = post_json(self.webhook_url, body, {"X-Blazelock-Webhook-Timestamp": timestamp,
                                                        "X-Blazelock-Webhook-Signature": sign(
                                                            secret, timestamp, body)})
            with self.lock:
                self.deliveries.append((event, scan_id, status))
