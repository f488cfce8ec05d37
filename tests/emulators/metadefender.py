"""A strict MetaDefender Core REST API on 127.0.0.1 (docs/engines.md, "OPSWAT MetaDefender Core").

Results come from the bytes: EICAR → 1 (infected); `MD-ENCRYPTED` → 12 unless the
`archivepwd` header is the emulator's `archive_password`; `MD-BLOCKED` → 0 but Blocked
by the workflow; `MD-RESULT:<n>` → code n. A scan answers "in progress" to `polls`
GETs first (forever while `hold` is set). Bodies are hashed as they arrive, never kept.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ._server import Emulator, Logged

EICAR_MARK = b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE"
ENCRYPTED_MARK = b"MD-ENCRYPTED"
BLOCKED_MARK = b"MD-BLOCKED"
_RESULT_MARK = re.compile(rb"MD-RESULT:(\d+)")
_TAIL = 64
_PIECE = 64 * 1024
# Percent-encoded header text: no raw space, `+`, `<`, `>` or non-ASCII
# (docs/engines.md, "OPSWAT MetaDefender Core").
_ENCODED = re.compile(r"[A-Za-z0-9%._~!$&'()*,;=:@/-]*")
_RESULT_TEXT = {0: "No Threat Detected", 1: "Infected", 2: "Suspicious", 3: "Failed", 7: "Skipped Clean",
                12: "Encrypted", 13: "Exceeded Archive Size", 15: "Password Protected Document"}


class _Digest:
    """sha256, size and the test markers of bytes fed piece by piece (keeps only a short tail)."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.marks: set[bytes] = set()
        self.code: int | None = None
        self._tail = b""

    def feed(self, data: bytes) -> None:
        self.sha256.update(data)
        self.size += len(data)
        window = self._tail + data
        self.marks.update(m for m in (EICAR_MARK, ENCRYPTED_MARK, BLOCKED_MARK) if m in window)
        if self.code is None and (match := _RESULT_MARK.search(window)):
            self.code = int(match[1])
        self._tail = window[-_TAIL:]


@dataclass
class _Scan:
    data_id: str
    sha256: str
    size: int
    display_name: str
    code: int
    result: str
    blocked_reason: str = ""
    threat: str | None = None
    polls_left: int = 0
    node: bool = False  # polled at rest_ip while it runs
    finished_at: float | None = None
    workflow: str = "File process"  # Core's default workflow when no `rule` is sent


@dataclass
class _Upload:
    """A chunked upload: its first chunk's headers and what arrived so far."""

    total: int
    headers: dict[str, str]
    digest: _Digest = field(default_factory=_Digest)


class _Node(Emulator):
    """The Core node a scan runs on: the `rest_ip` that answers its progress."""

    def __init__(self, core: MetadefenderEmulator) -> None:
        super().__init__()
        self.core = core
        self.log = core.log  # one request log; the `host` header tells the two apart

    def handle(self, handler: BaseHTTPRequestHandler, entry: Logged) -> None:
        self.core.handle_node(handler, entry)


class MetadefenderEmulator(Emulator):
    """Core with an optional apikey, `views` (Core's path → this machine's) and an optional node."""

    def __init__(self, apikey: str | None = "test-key", *, polls: int = 1,
                 max_request_bytes: int = 1 << 31, views: dict[str, Path] | None = None,
                 rest_ip: bool = False, archive_password: str = "hunter2", port: int = 0) -> None:
        super().__init__(port)
        self.apikey = apikey
        self.polls = polls
        self.max_request_bytes = max_request_bytes
        self.views = dict(views or {})
        self.archive_password = archive_password
        self.hold = False
        # False: progress only in process_info, as Core may report it (docs/engines.md results).
        self.scan_results_progress = True
        self.scans: dict[str, _Scan] = {}
        self.uploads: dict[str, _Upload] = {}
        self._ids = itertools.count(1)
        self.node = _Node(self) if rest_ip else None

    def start(self) -> MetadefenderEmulator:
        if self.node is not None:
            self.node.start()
        super().start()
        return self

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
        super().stop()

    def submissions(self) -> list[Logged]:
        """POST /file requests that Core accepted."""
        return [e for e in self.log if e.method == "POST" and e.status == 200]

    # -- handling ----------------------------------------------------------------------------

    def _authorized(self, handler: BaseHTTPRequestHandler, entry: Logged) -> bool:
        if self.apikey is None or handler.headers.get("apikey") == self.apikey:
            return True
        self.drain(handler)
        self.reply(handler, entry, 401, {"err": "Invalid API key"})
        return False

    def handle(self, handler: BaseHTTPRequestHandler, entry: Logged) -> None:
        if not self._authorized(handler, entry):
            return
        path = handler.path
        if handler.command == "POST" and path == "/file":
            return self._submit(handler, entry)
        self.drain(handler)
        if handler.command == "GET" and path.startswith("/file/"):
            return self._show(handler, entry, unquote(path.removeprefix("/file/")), at_node=False)
        if handler.command == "GET" and path.startswith("/hash/"):
            return self._by_hash(handler, entry, path.removeprefix("/hash/"))
        if handler.command == "GET" and path == "/version":
            return self.reply(handler, entry, 200, {"product_id": "MSCL", "version": "5.10.1"})
        self.reply(handler, entry, 404, {"err": f"Endpoint not found: {path}"})

    def handle_node(self, handler: BaseHTTPRequestHandler, entry: Logged) -> None:
        if not self._authorized(handler, entry):
            return
        self.drain(handler)
        if handler.command == "GET" and handler.path.startswith("/file/"):
            return self._show(handler, entry, unquote(handler.path.removeprefix("/file/")), at_node=True)
        self.reply(handler, entry, 404, {"err": f"Endpoint not found: {handler.path}"})

    def _submit(self, handler: BaseHTTPRequestHandler, entry: Logged) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        length_text = headers.get("content-length")
        if length_text is None or "transfer-encoding" in headers:
            handler.close_connection = True  # the body cannot be framed: refuse it unread
            return self.reply(handler, entry, 411, {"err": "Length Required"}, {"Connection": "close"})
        length = int(length_text)
        entry.body_bytes = length
        if length > self.max_request_bytes:
            handler.close_connection = True
            return self.reply(handler, entry, 413, {"err": "Request entity too large"},
                              {"Connection": "close"})
        problem = _header_problem(headers)
        if problem:
            self.drain(handler)
            return self.reply(handler, entry, 400, {"err": problem})
        if "filepath" in headers:
            return self._by_path(handler, entry, headers, length)
        if "x-file-id" in headers:
            return self._next_chunk(handler, entry, headers["x-file-id"], length)
        if length == 0:
            return self.reply(handler, entry, 422, {"err": "Failed to upload - empty file"})
        digest = self._read(handler, length)
        if "x-file-size" in headers:
            return self._first_chunk(handler, entry, headers, digest)
        data_id = self._new_id()
        self._add_scan(data_id, digest, headers)
        self.reply(handler, entry, 200, self._accepted(data_id))

    def _by_path(self, handler: BaseHTTPRequestHandler, entry: Logged, headers: dict[str, str],
                 length: int) -> None:
        if length:
            self.drain(handler)
            return self.reply(handler, entry, 400, {"err": "filepath takes no request body"})
        local = self._local(unquote(headers["filepath"], errors="strict"))
        if local is None or not local.is_file():
            return self.reply(handler, entry, 400, {"err": "Failed to access file"})
        digest = _Digest()
        with local.open("rb") as f:
            while piece := f.read(_PIECE):
                digest.feed(piece)
        data_id = self._new_id()
        self._add_scan(data_id, digest, headers)
        self.reply(handler, entry, 200, self._accepted(data_id))

    def _first_chunk(self, handler: BaseHTTPRequestHandler, entry: Logged, headers: dict[str, str],
                     digest: _Digest) -> None:
        total = int(headers["x-file-size"])
        if digest.size > total:
            return self.reply(handler, entry, 400, {"err": "chunk larger than X-File-Size"})
        data_id = self._new_id()
        upload = _Upload(total, headers, digest)
        with self.lock:
            self.uploads[data_id] = upload
        self.reply(handler, entry, 200, self._accepted(self._complete(data_id, upload)))

    def _next_chunk(self, handler: BaseHTTPRequestHandler, entry: Logged, data_id: str, length: int) -> None:
        with self.lock:
            upload = self.uploads.get(data_id)
        if upload is None:
            self.drain(handler)
            return self.reply(handler, entry, 400, {"err": f"Unknown X-File-ID {data_id}"})
        if upload.digest.size + length > upload.total:
            self.drain(handler)
            return self.reply(handler, entry, 400, {"err": "more bytes than X-File-Size"})
        self._read(handler, length, upload.digest)
        self.reply(handler, entry, 200, self._accepted(self._complete(data_id, upload)))

    def _complete(self, data_id: str, upload: _Upload) -> str:
        """Once every byte arrived: scan, or answer the data_id of the same bytes scanned before."""
        if upload.digest.size < upload.total:
            return data_id
        with self.lock:
            del self.uploads[data_id]
        known = self._latest(upload.digest.sha256.hexdigest())
        if known is not None:
            return known.data_id
        self._add_scan(data_id, upload.digest, upload.headers)
        return data_id

    def _show(self, handler: BaseHTTPRequestHandler, entry: Logged, data_id: str, at_node: bool) -> None:
        with self.lock:
            scan = self.scans.get(data_id)
            in_progress = scan is not None and scan.finished_at is None
            # While a scan runs on a node, only that node knows it (docs/engines.md: `rest_ip`).
            if scan is None or (in_progress and scan.node != at_node):
                return self.reply(handler, entry, 404, {data_id: "Not Found"})
            if in_progress and not self.hold:
                if scan.polls_left:
                    scan.polls_left -= 1
                else:
                    scan.finished_at = time.time()
            view = _view(scan)
        if not self.scan_results_progress:
            del view["scan_results"]["progress_percentage"]
        self.reply(handler, entry, 200, view)

    def _by_hash(self, handler: BaseHTTPRequestHandler, entry: Logged, sha256: str) -> None:
        scan = self._latest(sha256.lower())
        if scan is None:
            return self.reply(handler, entry, 404, {sha256: "Not Found"})
        self.reply(handler, entry, 200, _view(scan))

    # -- state -------------------------------------------------------------------------------

    def _read(self, handler: BaseHTTPRequestHandler, length: int, into: _Digest | None = None) -> _Digest:
        """Hash `length` bytes of body as they arrive (into an upload's digest, for a chunk)."""
        digest = into or _Digest()
        left = length
        while left:
            piece = handler.rfile.read(min(_PIECE, left))
            if not piece:
                raise ConnectionError("client closed the connection mid-body")
            digest.feed(piece)
            left -= len(piece)
        return digest

    def _local(self, core_path: str) -> Path | None:
        """Where a path as Core sees it is on this machine, by `views`."""
        for prefix, local in self.views.items():
            root = prefix.rstrip("/")
            if core_path.startswith(root + "/"):
                return local / core_path[len(root) + 1:]
        return None

    def _new_id(self) -> str:
        return f"{next(self._ids):08x}{'0' * 24}"

    def _accepted(self, data_id: str) -> dict[str, Any]:
        if self.node is None:
            return {"data_id": data_id}
        return {"data_id": data_id, "rest_ip": self.node.url.removeprefix("http://")}

    def _add_scan(self, data_id: str, digest: _Digest, headers: dict[str, str]) -> None:
        # http.server reads header bytes as latin-1; the password was sent as UTF-8.
        password = headers.get("archivepwd", "").encode("latin-1").decode("utf-8")
        code, result, blocked_reason, threat = self._outcome(digest, password)
        scan = _Scan(data_id, digest.sha256.hexdigest(), digest.size, unquote(headers.get("filename", "")),
                     code, result, blocked_reason, threat, self.polls, node=self.node is not None,
                     workflow=headers.get("rule") or "File process")
        with self.lock:
            self.scans[data_id] = scan

    def _outcome(self, digest: _Digest, archivepwd: str) -> tuple[int, str, str, str | None]:
        """(scan_all_result_i, Allowed|Blocked, blocked_reason, threat) of these bytes."""
        if EICAR_MARK in digest.marks:
            return 1, "Blocked", "Infected", "Eicar-Test-Signature"
        if digest.code is not None:
            allowed = digest.code in (0, 7)
            return digest.code, "Allowed" if allowed else "Blocked", "" if allowed else "Failed", None
        if ENCRYPTED_MARK in digest.marks and archivepwd != self.archive_password:
            return 12, "Blocked", "Encrypted Archive", None
        if BLOCKED_MARK in digest.marks:
            return 0, "Blocked", "Blocked file type", None
        return 0, "Allowed", "", None

    def _latest(self, sha256: str) -> _Scan | None:
        with self.lock:
            done = [s for s in self.scans.values() if s.sha256 == sha256 and s.finished_at is not None]
            running = [s for s in self.scans.values() if s.sha256 == sha256 and s.finished_at is None]
        # A finished result first; else a running scan's progress (**assumed** of Core, whose
        # lookup answers with the latest processing result of the hash).
        return max(done, key=lambda s: s.finished_at or 0.0, default=running[-1] if running else None)


def _header_problem(headers: dict[str, str]) -> str | None:
    """Why Core would refuse these headers (docs/engines.md's header rules, enforced
    more strictly than Core itself may)."""
    for name in ("filename", "filepath"):
        if name in headers and not _ENCODED.fullmatch(headers[name]):
            return f"{name} must be URL-encoded without < and >"
    if "%2f" in headers.get("filepath", "").lower():
        return "filepath keeps its / (a %2F is part of a name)"
    if any(c in headers.get("original_file_path", "") for c in "<>"):
        return "original_file_path must not contain < or >"
    if "rule" in headers and "user_agent" in headers:
        return "rule supersedes user_agent: send one of them"
    if "x-file-size" in headers and ("x-file-id" in headers or "filepath" in headers):
        return "X-File-Size starts a chunked upload: no X-File-ID or filepath with it"
    if "x-file-size" in headers and not headers["x-file-size"].isdigit():
        return "X-File-Size must be a byte count"
    return None


def _view(scan: _Scan) -> dict[str, Any]:
    """GET /file/{data_id}'s answer (docs/engines.md, "MetaDefender results")."""
    done = scan.finished_at is not None
    details = {"ClamAV": {"scan_result_i": scan.code if done else 255,
                          "threat_found": scan.threat or "" if done else ""}}
    return {
        "data_id": scan.data_id,
        "file_info": {"sha256": scan.sha256.upper(), "display_name": scan.display_name,
                      "file_size": scan.size},
        "process_info": {"progress_percentage": 100 if done else 50, "profile": scan.workflow,
                         "result": scan.result if done else "Processing",
                         "blocked_reason": scan.blocked_reason if done else ""},
        "scan_results": {"progress_percentage": 100 if done else 50,
                         "scan_all_result_i": scan.code if done else 255,
                         "scan_all_result_a": _RESULT_TEXT.get(scan.code, "Other") if done else "In Progress",
                         "scan_details": details},
    }
