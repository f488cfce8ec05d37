"""The Engine protocol every scan engine implements; retries, journaling and moves live above it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from email.message import Message
from typing import Protocol, cast, runtime_checkable

from daemon.engines._webhook import WebhookAddress, WebhookHealth
from daemon.errors import EnginePermanentError
from daemon.model import Pending, Reason, S3Object, Verdict

__all__ = ["Engine", "S3Object", "ScanHandle", "ScanRequest", "SendingEngine", "Sent", "SignatureSource",
           "Signatures", "WebhookSource", "refuse_too_large", "signatures_of"]


@dataclass(frozen=True)
class ScanRequest:
    """One file to scan: an open read-only fd of exactly the hashed bytes, and its names.

    For an S3 source, `s3` names the object; `fd` is then a local copy of its bytes,
    or None when the engine reads S3 itself (`Engine.reads_s3`) and nothing was downloaded.
    """

    watch: str
    rel_path: str
    # Absolute local path (or s3://bucket/key), for engines that read the file themselves;
    # for a watched local file, its snapshot in the staging directory (docs/integrity.md).
    path: str
    fd: int | None
    size: int
    sha256: str
    ref_id: str  # the external reference ID (docs/contract.md#external-reference-ids)
    s3: S3Object | None = None
    archive_password: str | None = field(default=None, repr=False)  # the watch's `archivepwd`
    by_upload: bool = False  # send the bytes themselves: a scan by path or link saw other bytes
    # The file's name as its users know it, to tell a vendor (never to read): its absolute path
    # in the watched folder, or its s3:// URL; "" when that is `path` itself.
    original: str = ""

    def handle(self, engine_scan_id: str | None) -> ScanHandle:
        """The handle to poll a submission of these bytes by."""
        return ScanHandle(self.watch, self.rel_path, self.path, self.sha256, self.ref_id, engine_scan_id)

    @property
    def bytes_fd(self) -> int:
        """The fd of the bytes; always set for engines that do not read S3 themselves."""
        if self.fd is None:
            raise RuntimeError(f"{self.path}: no local copy was made for this engine")
        return self.fd

    @property
    def name(self) -> str:
        """The file's basename."""
        return self.rel_path.rpartition("/")[2]

    @property
    def original_name(self) -> str:
        """The file's full name as its users know it, not its snapshot's (docs/engines.md)."""
        return self.original or self.path


def refuse_too_large(engine: str, max_size: int | None, request: ScanRequest) -> None:
    """Raise `EnginePermanentError` `too_large` for a file over the engine's `max_size`.

    Every engine calls it before sending or reading anything: an engine that would read
    only part of the file must never judge it (docs/engines.md#file-size-limits).
    """
    if max_size is None:
        return
    size = max(request.size, os.fstat(request.fd).st_size if request.fd is not None else 0)
    if size > max_size:
        raise EnginePermanentError(f"{size} bytes is over engines.{engine}.max_size ({max_size} bytes)",
                                   reason=Reason.TOO_LARGE)


@dataclass(frozen=True)
class ScanHandle:
    """A submitted scan, as `poll` follows it: names and hashes only, never the bytes.

    `engine_scan_id` None is a submission in doubt (journaled as submitting, no answer
    journaled): `poll` finds it by reference or hash where the engine can, else raises
    `EngineResubmitError`. See docs/integrity.md, "Remote engines".
    """

    watch: str
    rel_path: str
    path: str
    sha256: str
    ref_id: str
    engine_scan_id: str | None


class Engine(Protocol):
    """A scan engine: gives a verdict now, or a Pending to poll later.

    `scan` and `poll` raise `EngineRetryableError` (try again later),
    `EngineUnavailableError` (engine down: wait) or `EnginePermanentError` (fail the
    file); `poll` raises `EngineResubmitError` when only a new submission of the bytes
    can give a verdict. They must be thread-safe: the pipeline calls them from `concurrency` threads.
    """

    @property
    def name(self) -> str: ...

    @property
    def remote(self) -> bool:
        """Scans outlive this process: journal the reference ID before submitting."""
        ...

    @property
    def reads_s3(self) -> bool:
        """Scans S3 sources by path or link itself: the pipeline does not download them."""
        ...

    def scan(self, request: ScanRequest) -> Verdict | Pending:
        """Scan the file, or submit it and return the scan to poll."""
        ...

    def poll(self, scan: ScanHandle) -> Verdict | Pending:
        """The verdict of a submitted scan, or Pending while it runs; reads no bytes."""
        ...

    def probe(self) -> str:
        """Check the engine answers; return a one-line description (raises if not)."""
        ...

    def close(self) -> None:
        """Release connections and threads."""
        ...


class Sent(Protocol):
    """A scan sent to its engine, its answer not read yet (`SendingEngine.send`)."""

    def reply(self) -> Verdict | Pending:
        """The answer, read once; raises what `Engine.scan` raises."""
        ...

    def cancel(self) -> None:
        """The answer will not be read: drop what carries it (it must never answer another scan)."""
        ...


@runtime_checkable
class SendingEngine(Protocol):
    """An engine that takes several scans at once from one thread: `send` returns once the
    scan is sent, before its answer, so a worker sends a few and then reads their answers
    (clamd: docs/engines.md, "Concurrency"). `send` raises what `scan` raises before sending."""

    def send(self, request: ScanRequest) -> Sent:
        ...


@runtime_checkable
class WebhookSource(Protocol):
    """An engine whose vendor announces finished scans to the receiver (daemon/webhooks.py).

    The vendor's wire format (signature, event shape, which scan ids an event names)
    lives here, in the engine; the receiver routes, refuses and makes scans due. Both
    methods are called from the receiver's threads and must be thread-safe.
    """

    name: str
    webhook_address: WebhookAddress | None  # None: the config asks for no deliveries
    webhook_health: WebhookHealth  # polls slow down while verified deliveries arrive

    def verify_webhook(self, headers: Message, body: bytes, now: float) -> None:
        """Check a delivery is the vendor's (and fresh); raises `WebhookRejectedError` if not."""
        ...

    def webhook_scan_ids(self, body: bytes) -> list[str]:
        """The engine scan ids a verified delivery says are finished (often none).

        Raises `WebhookRejectedError` for a body that is not the vendor's shape at all.
        """
        ...


@dataclass(frozen=True)
class Signatures:
    """What an engine's verdicts depend on, for the verdict cache (docs/engines.md, "Verdict cache").

    `fingerprint` changes when the verdict on the same bytes may change (a database version, a
    rules hash, verdict-changing settings). `is_versioned` False: the engine cannot tell when its
    signatures are updated (the HTTP vendors), so a clean verdict is reused for `cache.clean_ttl` only.
    """

    fingerprint: str
    is_versioned: bool


@runtime_checkable
class SignatureSource(Protocol):
    """An engine that can say which signatures it judges with (not every engine can)."""

    def signatures(self) -> Signatures:
        """The current signatures; may ask the engine (raises its errors, like `scan`)."""
        ...


def signatures_of(engine: object) -> Signatures:
    """The engine's signatures; one that cannot tell is unversioned, named by its class."""
    # `isinstance(engine, SignatureSource)` without the runtime protocol check's cost (asked
    # for every file, by the verdict cache): the protocol is this one method.
    if callable(signatures := getattr(engine, "signatures", None)):
        return cast(Signatures, signatures())
    return Signatures(type(engine).__name__, is_versioned=False)
