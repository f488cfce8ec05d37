"""OPSWAT MetaDefender Core: by path where Core can read the file, else uploaded.

The wire protocol: docs/engines.md#opswat-metadefender-core.

Path mode sends the path as Core sees it (`filepath_map`) and no body; upload mode
streams the bytes from the request's fd, in chunks of `max_request_bytes` above that
size. Core has no idempotency key: its `data_id` is the only handle on a scan, so the
pipeline journals it as soon as `scan` returns Pending, and `poll` follows it (at
`rest_ip` while Core says so) without ever submitting again. A submission whose answer
was lost is repeated (Core cannot be asked by reference); with `hash_lookup` a finished
scan of the same bytes is found instead, unless Core says it ran another workflow than
the configured `rule`. Core reports the sha256 of what it scanned: a
verdict about other bytes (a file that changed after it was hashed, a `filepath_map`
that points at another tree) is never used.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import structlog

from daemon.config import MetadefenderEngineConfig
from daemon.engines._http import USER_AGENT, PacedClient, check_status, json_object
from daemon.engines._pacing import Pacer
from daemon.engines.base import ScanHandle, ScanRequest, Signatures, refuse_too_large
from daemon.errors import EnginePermanentError, EngineResubmitError, EngineRetryableError
from daemon.model import Pending, Reason, Verdict, VerdictKind

__all__ = ["MetadefenderEngine"]

log = structlog.get_logger("scanwatch.engines.metadefender")

_READ_BYTES = 256 * 1024
# scan_all_result_i (docs/engines.md#metadefender-results). Every other code (3, 9-16, 19,
# 23, or one this table does not know), and a 0/7 that is neither Allowed nor Blocked, is no verdict: failed.
_INFECTED = frozenset({1, 2, 4, 6, 8, 20, 21, 22})
_CLEAN = frozenset({0, 7})
_FAILED_REASONS = {12: Reason.ENCRYPTED, 13: Reason.TOO_LARGE, 15: Reason.TOO_LARGE}
# What h11 sends as a header value; anything else it refuses with the value in the message.
_HEADER_VALUE = re.compile(rb"[^\x00\s]+(?:[ \t]+[^\x00\s]+)*")
# What Core's original_file_path cannot hold: `<` `>`, and what no header value can.
_NOT_IN_PATH = re.compile(r"[<>\x00-\x1f\x7f]")


@dataclass(frozen=True)
class _ScanRef:
    """The journaled engine_scan_id: `[path:]<data_id>[@<rest_ip>]`."""

    data_id: str
    rest_ip: str = ""
    by_path: bool = False

    def encode(self) -> str:
        return ("path:" if self.by_path else "") + self.data_id + (f"@{self.rest_ip}" if self.rest_ip else "")

    @classmethod
    def parse(cls, value: str) -> _ScanRef:
        by_path = value.startswith("path:")
        data_id, _, rest_ip = value.removeprefix("path:").partition("@")
        return cls(data_id, rest_ip, by_path)


class MetadefenderEngine:
    """MetaDefender Core's REST API: `POST /file`, then `GET /file/{data_id}` until it is done."""

    remote = True
    reads_s3 = False

    def __init__(self, name: str, config: MetadefenderEngineConfig, pacer: Pacer | None = None) -> None:
        self.name = name
        self._config = config
        self._url = config.url.rstrip("/")
        self._scheme = httpx.URL(self._url).scheme
        self._path_map = sorted(config.filepath_map.items(), key=lambda item: len(item[0]), reverse=True)
        self._source = socket.gethostname()
        credentials = {} if config.apikey is None else {"apikey": config.apikey.get_secret_value()}
        self._client = PacedClient(name, self._url, config.timeout, credentials,
                                   pacer or Pacer(name, config.rate_limit), is_throttled=_is_busy)

    # -- Engine ------------------------------------------------------------------------------

    def scan(self, request: ScanRequest) -> Verdict | Pending:
        """A known result of these bytes (`hash_lookup`), else submit by path or upload."""
        refuse_too_large(self.name, self._config.max_size, request)
        if self._config.hash_lookup and (known := self._known(request)) is not None:
            return known
        core_path = None if request.by_upload else self._core_path(request)
        return self._upload(request) if core_path is None else self._submit_path(request, core_path)

    def poll(self, scan: ScanHandle) -> Verdict | Pending:
        """Follow a submitted scan, never submitting it again.

        A data_id Core does not know (not yet visible on its node, purged, lost with its
        node) is asked again later: attempts are spent, so it ends in failed, not in a loop.
        An in-doubt submission is found by `hash_lookup` where enabled, else it raises
        `EngineResubmitError`; so does a scan by path that saw other bytes (then uploaded).
        """
        if scan.engine_scan_id is None:
            return self._in_doubt(scan)
        ref = _ScanRef.parse(scan.engine_scan_id)
        response = self._get(f"/file/{quote(ref.data_id, safe='')}", ref.rest_ip)
        if response.status_code == 404:
            raise EngineRetryableError(f"engine {self.name!r}: Core does not know data_id {ref.data_id} "
                                       f"of {scan.path}")
        self._check(response)
        body = json_object(response)
        if not _is_about(body, scan.sha256):
            return self._other_bytes(scan, ref, body)
        if not _is_finished(body):
            return Pending(scan.engine_scan_id, self._config.poll_interval)
        return _verdict(body, ref.data_id)

    def signatures(self) -> Signatures:
        """No signature version is reported; the workflow `rule` changes what a verdict is."""
        return Signatures(f"metadefender:rule={self._config.rule or ''}", is_versioned=False)

    def probe(self) -> str:
        """`GET /version` with the apikey: proves Core answers and takes the key."""
        response = self._get("/version")
        self._check(response)
        version = json_object(response).get("version", "?")
        return f"metadefender {version} at {self._url}"

    def close(self) -> None:
        """Close the HTTP connection pool and the pacing state."""
        self._client.close()

    # -- submitting ---------------------------------------------------------------------------

    def _core_path(self, request: ScanRequest) -> str | None:
        """The file's path as Core sees it, when `filepath_map` maps it (longest prefix wins)."""
        if request.s3 is not None:
            return None
        for local, core in self._path_map:
            root = local.rstrip("/")
            if request.path.startswith(root + "/"):
                path = core.rstrip("/") + request.path[len(root):]
                # Core drops `<` `>` from names: such a path would name another file. Upload it.
                return None if "<" in path or ">" in path else path
        return None

    def _submit_path(self, request: ScanRequest, core_path: str) -> Pending:
        headers = {**self._headers(request), "filepath": _encoded(core_path, safe="/")}
        answer = self._post(headers, b"", 0,
                            hint=f"Core could not take {core_path}; check engines.{self.name}.filepath_map")
        return self._pending(answer, by_path=True)

    def _upload(self, request: ScanRequest) -> Pending:
        """Stream the bytes in one request, or in chunks above `max_request_bytes`."""
        if request.size == 0:  # Core answers 422 to an empty upload
            raise EnginePermanentError(f"engine {self.name!r}: Core takes no empty uploads "
                                       f"({request.original_name})", reason=Reason.BAD_REQUEST)
        fd, size = request.bytes_fd, request.size
        chunk = self._config.max_request_bytes or size
        if size <= chunk:
            return self._pending(self._post(self._headers(request), _read_range(fd, 0, size), size))
        first = self._post({**self._headers(request), "X-File-Size": str(size)},
                           _read_range(fd, 0, chunk), chunk)
        data_id = _data_id(first, self.name)
        answer = first
        for offset in range(chunk, size, chunk):
            length = min(chunk, size - offset)
            answer = self._post({"X-File-ID": data_id}, _read_range(fd, offset, length), length)
        # The last chunk may name an older data_id: Core knew these bytes
        # (docs/engines.md#opswat-metadefender-core).
        return self._pending({"data_id": data_id, **answer})

    def _headers(self, request: ScanRequest) -> dict[str, str]:
        headers = {
            "filename": _encoded(request.name, safe=""),
            "original_file_path": _plain(request.original_name),
            "source": self._source,
        }
        # `rule` supersedes `user_agent`; Core wants only one of them
        # (docs/engines.md#opswat-metadefender-core).
        if self._config.rule is not None:
            headers["rule"] = self._config.rule
        else:
            headers["user_agent"] = USER_AGENT
        if request.archive_password:
            headers["archivepwd"] = self._password(request)
        return headers

    def _password(self, request: ScanRequest) -> str:
        value = request.archive_password or ""
        if not _HEADER_VALUE.fullmatch(value.encode()):
            raise EnginePermanentError(
                f"watch {request.watch!r}: archivepwd cannot be sent as an HTTP header (leading or "
                "trailing spaces, or control characters); check the watch's archivepwd",
                reason=Reason.BAD_REQUEST)
        return value

    def _post(self, headers: dict[str, str], body: bytes | Iterator[bytes], length: int,
              hint: str = "") -> dict[str, Any]:
        """POST /file with exactly `length` bytes of `body` (Core answers 411 without a length)."""
        # UTF-8 header values: a workflow name or an archive password need not be ASCII.
        sent = httpx.Headers({**headers, "Content-Length": str(length)}, encoding="utf-8")
        response = self._client.request("POST", "/file", content=body, headers=sent)
        self._check(response, hint)
        return json_object(response)

    def _pending(self, answer: dict[str, Any], by_path: bool = False) -> Pending:
        ref = _ScanRef(_data_id(answer, self.name), str(answer.get("rest_ip") or ""), by_path)
        return Pending(ref.encode(), self._config.poll_interval)

    # -- results ------------------------------------------------------------------------------

    def _known(self, request: ScanRequest | ScanHandle, *, running: bool = False) -> Verdict | Pending | None:
        """Core's last finished clean or infected result of these bytes, if it has one
        (`running`: or its scan of them still running, followed by its data_id)."""
        response = self._get(f"/hash/{request.sha256}")
        if response.status_code == 404:
            return None
        self._check(response)
        body = json_object(response)
        if not _is_about(body, request.sha256):
            return None
        workflow = _section(body, "process_info").get("profile")
        if self._config.rule is not None and workflow is not None and workflow != self._config.rule:
            return None  # judged by another workflow (one that skips archives, say): not ours
        if not _is_finished(body):
            data_id = body.get("data_id")
            if running and isinstance(data_id, str) and data_id and "@" not in data_id:
                return Pending(data_id, self._config.poll_interval)
            return None
        verdict = _verdict(body, str(body.get("data_id", "")), hash_lookup=True)
        return None if verdict.kind is VerdictKind.FAILED else verdict

    def _in_doubt(self, scan: ScanHandle) -> Verdict | Pending:
        """A submission that may have happened: Core's scan of these bytes, found by hash."""
        found = self._known(scan, running=True) if self._config.hash_lookup else None
        if found is None:
            raise EngineResubmitError(f"engine {self.name!r}: a submission of {scan.path} may have "
                                      "happened and Core cannot be asked by reference: submitting again",
                                      may_duplicate=True)
        return found

    def _other_bytes(self, scan: ScanHandle, ref: _ScanRef, body: dict[str, Any]) -> Pending:
        """Core scanned other bytes than those hashed: a scan by path is redone by upload; an
        upload's mismatch is an error (retried until the file's attempts run out)."""
        scanned = _section(body, "file_info").get("sha256")
        if not ref.by_path:
            raise EngineRetryableError(f"engine {self.name!r}: Core scanned bytes with sha256 {scanned}, "
                                       f"not {scan.sha256} of {scan.path}")
        log.warning("scan.path_mismatch", engine=self.name, path=scan.path, data_id=ref.data_id,
                    sha256=scan.sha256, core_sha256=scanned,
                    hint=f"check engines.{self.name}.filepath_map; uploading the file instead")
        raise EngineResubmitError(f"engine {self.name!r}: Core read other bytes at the path of "
                                  f"{scan.path}: uploading it", by_upload=True)

    # -- wire ---------------------------------------------------------------------------------

    def _get(self, path: str, rest_ip: str = "") -> httpx.Response:
        # Core may name the node that runs the scan (`rest_ip`): ask there, same scheme.
        base = "" if not rest_ip else rest_ip if "://" in rest_ip else f"{self._scheme}://{rest_ip}"
        url = base.rstrip("/") + path if base else path
        return self._client.request("GET", url)

    def _check(self, response: httpx.Response, hint: str = "") -> None:
        """docs/engines.md#metadefender-errors on top of the common rules; `hint` explains a 400."""
        status = response.status_code
        if status < 300:
            return
        error = str(json_object(response).get("err") or response.text[:200])
        lowered = error.lower()
        # Core tells its 403s and 500s apart only by their text (docs/engines.md#metadefender-errors);
        # a busy 403 never gets here: the paced client raises it as throttling (`_is_busy`).
        is_broken = (status == 403 and "license" in lowered) or (
            status == 500 and any(word in lowered for word in ("license", "disk", "space")))
        if is_broken:
            error += "; the Core server needs its administrator"
        if status == 400 and hint:
            error += f" ({hint})"
        check_status(response, self.name, error, reason=Reason.ENGINE_ERROR if is_broken else None)


def _is_busy(response: httpx.Response) -> bool:
    """Core's 403 "scan limit reached" or "exceeded number of allowed clients": slow down."""
    if response.status_code != 403:
        return False
    error = str(json_object(response).get("err") or response.text[:200]).lower()
    return "limit" in error or "clients" in error


def _read_range(fd: int, offset: int, length: int) -> Iterator[bytes]:
    """`length` bytes from `offset`, read as sent (pread: the fd's offset is untouched)."""
    end = offset + length
    while offset < end:
        data = os.pread(fd, min(_READ_BYTES, end - offset), offset)
        if not data:  # the file shrank: the short body fails the request, which is retried
            return
        offset += len(data)
        yield data


def _encoded(text: str, safe: str) -> str:
    """Percent-encoded UTF-8 (space as %20, never +) without `<` `>`, as Core's headers want."""
    raw = os.fsencode(text).replace(b"<", b"").replace(b">", b"")
    return quote(raw, safe=safe)


def _plain(text: str) -> str:
    """`text` as the plain UTF-8 header value Core's `original_file_path` wants: not URL-encoded,
    without `<` `>` and control characters (which Core would remove), outer blanks stripped."""
    return _NOT_IN_PATH.sub("", os.fsencode(text).decode("utf-8", "replace")).strip(" ")


def _data_id(answer: dict[str, Any], engine: str) -> str:
    data_id = answer.get("data_id")
    if not isinstance(data_id, str) or not data_id or "@" in data_id:
        raise EnginePermanentError(f"engine {engine!r}: Core answered without a data_id: {answer!r:.200}",
                                   reason=Reason.ENGINE_ERROR)
    return data_id


def _section(body: dict[str, Any], key: str) -> dict[str, Any]:
    value = body.get(key)
    return value if isinstance(value, dict) else {}


def _is_about(body: dict[str, Any], sha256: str) -> bool:
    """False when Core says it scanned other bytes than these (no sha256 given: assume these)."""
    scanned = _section(body, "file_info").get("sha256")
    return not isinstance(scanned, str) or scanned.lower() == sha256.lower()


def _is_finished(body: dict[str, Any]) -> bool:
    scan, process = _section(body, "scan_results"), _section(body, "process_info")
    progress = scan.get("progress_percentage", process.get("progress_percentage"))
    return progress == 100 and process.get("result") != "Processing"


def _verdict(body: dict[str, Any], data_id: str, hash_lookup: bool = False) -> Verdict:
    """`scan_all_result_i` first, then the workflow's Allowed/Blocked.

    docs/engines.md#metadefender-results has the table.
    """
    scan, process = _section(body, "scan_results"), _section(body, "process_info")
    given = scan.get("scan_all_result_i")
    code = given if isinstance(given, int) and not isinstance(given, bool) else -1
    raw: dict[str, object] = {
        "data_id": data_id, "scan_all_result_i": given, "scan_all_result_a": scan.get("scan_all_result_a"),
        "result": process.get("result"), "blocked_reason": process.get("blocked_reason")}
    if hash_lookup:
        raw["hash_lookup"] = True
    if code in _INFECTED:
        threats = _threats(scan) or (str(scan.get("scan_all_result_a") or "unnamed"),)
        return Verdict(VerdictKind.INFECTED, threats=threats, engine_scan_id=data_id, raw=raw)
    if code in _CLEAN and process.get("result") == "Allowed":
        return Verdict(VerdictKind.CLEAN, engine_scan_id=data_id, raw=raw)
    if code in _CLEAN and process.get("result") == "Blocked":
        reason = f"blocked:{process.get('blocked_reason') or 'unspecified'}"
        return Verdict(VerdictKind.INFECTED, reason=reason, engine_scan_id=data_id, raw=raw)
    reason = _FAILED_REASONS.get(code, Reason.ENGINE_FAILED)
    return Verdict(VerdictKind.FAILED, reason=reason, engine_scan_id=data_id, raw=raw)


def _threats(scan: dict[str, Any]) -> tuple[str, ...]:
    """Each engine's threat name once, in Core's order."""
    details = _section(scan, "scan_details")
    names = (d.get("threat_found") for d in details.values() if isinstance(d, dict))
    return tuple(dict.fromkeys(n for n in names if isinstance(n, str) and n))
