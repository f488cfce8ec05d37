"""A strict Perception Point X-Ray files API on 127.0.0.1 (docs/engines.md, "Perception Point X-Ray").

Stricter than the real service where that is cheap: the body must be multipart, it
must carry exactly one of `data`, `path` or `download_link`, and `path` needs a known
`storage` (a directory per storage with a subdirectory per bucket, or a reader of an S3
server's objects). Scans finish on their
`polls_to_done`-th poll once `scan_delay_s` passed; with a `callback_url` they finish
after `scan_delay_s` and the callback is posted then.
"""

from __future__ import annotations

import itertools
import json
import re
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from ._server import Emulator, Logged, post_json

EICAR_MARK = b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE"
# Content markers for the verdicts EICAR cannot produce.
MARKS = {b"PP-BLK": "BLK", b"PP-SUS": "SUS", b"PP-SPM": "SPM"}
ERROR_MARK = b"PP-ERROR"
LIMIT = 500_000_000
_SOURCES = ("data", "path", "download_link")
# A storage `path` reads from: a directory (a subdirectory per bucket), or a reader of
# (bucket, key) giving the object's bytes or None (e.g. a real S3 server's objects).
Storage = Path | Callable[[str, str], bytes | None]
_PLAIN_FIELDS = ("name", "path", "storage", "download_link", "file_password",
                 "callback_url", "callback_params", "callback_headers")


def verdict_of(content: bytes) -> tuple[str, list[str], bool]:
    """(verdict, threats, is_error) the emulator gives these bytes."""
    if ERROR_MARK in content:
        return "", [], True
    if EICAR_MARK in content:
        return "MAL", ["EICAR-Test-File"], False
    for mark, verdict in MARKS.items():
        if mark in content:
            return verdict, ["Blocked.Policy"] if verdict == "BLK" else [], False
    return "CLN", [], False


class PerceptionPointEmulator(Emulator):
    """The files API with token auth, a size limit, storages and callbacks."""

    def __init__(self, token: str = "test-token", *, polls_to_done: int = 2, scan_delay_s: float = 0.0,
                 max_bytes: int = LIMIT, storages: dict[str, Storage] | None = None, port: int = 0) -> None:
        super().__init__(port)
        self.token = token
        self.forbidden_tokens: set[str] = set()
        self.polls_to_done = polls_to_done
        self.scan_delay_s = scan_delay_s
        self.max_bytes = max_bytes
        self.storages = storages or {}
        self.callback_repeats = 1
        self.submit_status = 201  # the files API answers 200 or 201 (docs/engines.md)
        self.scans: dict[int, dict[str, Any]] = {}
        self.callbacks: list[tuple[int, int]] = []  # (scan_id, status answered)
        self._ids = itertools.count(123456)

    def submissions(self) -> list[Logged]:
        """Accepted submissions (POSTs answered 200 or 201)."""
        return [e for e in self.log if e.method == "POST" and e.status in (200, 201)]

    def polls(self) -> list[Logged]:
        """Result requests for existing scans."""
        return [e for e in self.log if e.method == "GET" and e.status == 200]

    # -- handling ----------------------------------------------------------------------------

    def handle(self, handler: BaseHTTPRequestHandler, entry: Logged) -> None:
        auth = handler.headers.get("Authorization", "")
        given = auth.removeprefix("Token ") if auth.startswith("Token ") else None
        if given in self.forbidden_tokens:
            self.drain(handler)
            return self.reply(handler, entry, 403, {"detail": "You do not have permission."})
        if given != self.token:
            self.drain(handler)
            return self.reply(handler, entry, 401, {"detail": "Invalid token."})
        path = handler.path
        if handler.command == "POST" and path == "/api/v1/files/":
            return self._submit(handler, entry)
        if handler.command == "GET" and path.startswith("/api/v1/scans/") and path.endswith("/"):
            return self._show(handler, entry, path.removeprefix("/api/v1/scans/").removesuffix("/"))
        self.drain(handler)
        self.reply(handler, entry, 404, {"detail": "Not found."})

    def _submit(self, handler: BaseHTTPRequestHandler, entry: Logged) -> None:
        content_type = handler.headers.get("Content-Type", "")
        length = int(handler.headers.get("Content-Length") or 0)
        if length > self.max_bytes + 65536:
            handler.close_connection = True  # refused before reading the body
            return self.reply(handler, entry, 413, {"detail": "File too large."}, {"Connection": "close"})
        raw = self.drain(handler)
        entry.body_bytes = len(raw)
        parts = _multipart(content_type, raw)
        if parts is None:
            return self.reply(handler, entry, 415, {"detail": "multipart/form-data expected"})
        entry.fields = {k: parts[k][1].decode() for k in _PLAIN_FIELDS if k in parts}
        if "data" in parts:
            entry.fields["data_filename"] = parts["data"][0] or ""
            entry.fields["data_bytes"] = str(len(parts["data"][1]))
        sources = [k for k in _SOURCES if k in parts]
        if len(sources) != 1:
            return self.reply(handler, entry, 400, {"detail": "send exactly one of data, path, "
                                                              f"download_link (got {sources})"})
        if "storage" in parts and sources != ["path"]:
            return self.reply(handler, entry, 400, {"storage": ["only with path"]})
        callback: dict[str, Any] = {}
        for key in ("callback_params", "callback_headers"):
            if key in parts:
                try:
                    callback[key] = json.loads(entry.fields[key])
                except ValueError:
                    return self.reply(handler, entry, 400, {key: ["not JSON"]})
                if not isinstance(callback[key], dict):
                    return self.reply(handler, entry, 400, {key: ["not a JSON object"]})
        content, problem = self._content(sources[0], parts, entry.fields)
        if problem is not None:
            return self.reply(handler, entry, 422, problem)
        assert content is not None
        if len(content) > self.max_bytes:
            return self.reply(handler, entry, 413, {"detail": "File too large."})
        scan_id = self._create(content, entry.fields.get("callback_url"), callback)
        answer: dict[str, Any] = {"scan_id": scan_id}
        if "callback_params" in callback:
            answer["callback_params"] = callback["callback_params"]
        self.reply(handler, entry, self.submit_status, answer)

    def _content(self, source: str, parts: dict[str, tuple[str | None, bytes]],
                 fields: dict[str, str]) -> tuple[bytes | None, dict[str, Any] | None]:
        """The bytes to scan, or the 422 body saying why there are none."""
        if source == "data":
            return parts["data"][1], None
        if source == "download_link":
            try:
                with urllib.request.urlopen(fields["download_link"], timeout=5) as response:
                    return response.read(), None
            except (OSError, ValueError):
                return None, {"download_link": ["cannot download"]}
        root = self.storages.get(fields.get("storage", ""))
        if root is None:
            return None, {"storage": [f"unknown storage {fields.get('storage')!r}"]}
        bucket, _, key = fields["path"].partition("/")
        segments = fields["path"].split("/")
        if not bucket or not key or ".." in segments or "" in segments:
            return None, {"path": ["expected bucket/key"]}
        content = root(bucket, key) if callable(root) else _read_file(root / bucket / key)
        if content is None:
            return None, {"path": ["no such object"]}
        return content, None

    def _create(self, content: bytes, callback_url: str | None, callback: dict[str, Any]) -> int:
        verdict, threats, is_error = verdict_of(content)
        with self.lock:
            scan_id = next(self._ids)
            self.scans[scan_id] = {"verdict": verdict, "threats": threats, "error": is_error,
                                   "polls": 0, "done": False,
                                   "ready_at": time.monotonic() + self.scan_delay_s}
        if callback_url:
            self.later(self.scan_delay_s, self._call_back, scan_id, callback_url, callback)
        return scan_id

    def _show(self, handler: BaseHTTPRequestHandler, entry: Logged, scan_id: str) -> None:
        self.drain(handler)
        with self.lock:
            scan = self.scans.get(int(scan_id)) if scan_id.isdigit() else None
            if scan is None:
                return self.reply(handler, entry, 404, {"detail": "Not found."})
            scan["polls"] += 1
            if scan["polls"] >= self.polls_to_done and time.monotonic() >= scan["ready_at"]:
                scan["done"] = True
            view = self._view(int(scan_id))
        self.reply(handler, entry, 200, view)

    def _view(self, scan_id: int) -> dict[str, Any]:
        scan = self.scans[scan_id]
        if not scan["done"]:
            return {"scan_id": scan_id, "status": "pending"}
        if scan["error"]:
            return {"scan_id": scan_id, "status": "error"}
        return {"scan_id": scan_id, "status": "done", "verdict": scan["verdict"],
                "threats": scan["threats"]}

    def _call_back(self, scan_id: int, url: str, callback: dict[str, Any]) -> None:
        with self.lock:
            self.scans[scan_id]["done"] = True
            body = self._view(scan_id)
        if "callback_params" in callback:
            body["callback_params"] = callback["callback_params"]
        for _ in range(self.callback_repeats):
            status = post_json(url, json.dumps(body).encode(), callback.get("callback_headers", {}))
            with self.lock:
                self.callbacks.append((scan_id, status))


def _read_file(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]] | None:
    """name → (filename, bytes) of a multipart/form-data body; None if it is not one.

    Split by hand: the email parser needs seconds for a 100 MB upload.
    """
    boundary = re.fullmatch(r'multipart/form-data;\s*boundary="?([^";]+)"?', content_type.strip())
    if boundary is None:
        return None
    chunks = raw.split(b"--" + boundary[1].encode())
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        return None
    parts: dict[str, tuple[str | None, bytes]] = {}
    for chunk in chunks[1:-1]:
        head, blank, body = chunk.partition(b"\r\n\r\n")
        name = re.search(rb'(?:^|;)\s*name="([^"]*)"', head, re.MULTILINE)
        if not blank or name is None or not body.endswith(b"\r\n"):
            return None
        filename = re.search(rb';\s*filename="([^"]*)"', head)
        parts[name[1].decode()] = (filename[1].decode() if filename else None, body[:-2])
    return parts

