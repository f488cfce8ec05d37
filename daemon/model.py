"""The vocabulary shared by the journal, the pipeline and the engines."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypedDict, TypeVar

__all__ = ["FileState", "Pending", "Reason", "RejectReason", "RowChanges", "S3Object", "ScanChanges",
           "ScanRecord", "Verdict", "VerdictKind", "replaced"]


class FileState(enum.StrEnum):
    """Where a journal row stands. Rows mostly move down this list, but go back too: a file changed
    since its scan goes back to `discovered` or `stable` (pipeline/outcome.py, `changed`), a
    retried scan back to `stable`, and `Journal.release` hands unfinished scans back as `stable`."""

    DISCOVERED = "discovered"  # seen; waiting to settle
    STABLE = "stable"  # settled; waiting for a scan slot
    SCANNING = "scanning"  # claimed by a worker, or submitted and waiting for the engine
    VERDICT = "verdict"  # verdict known; waiting to be moved (after a failed move)
    MOVING = "moving"  # destination chosen; the move may be half done
    DONE = "done"  # in exactly one destination
    HELD = "held"  # left in place on purpose (symlink, hardlink, special file)
    GONE = "gone"  # vanished from the source before it could be moved


class VerdictKind(enum.StrEnum):
    """The three outcomes a file can have."""

    CLEAN = "clean"
    INFECTED = "infected"
    FAILED = "failed"


class Reason(enum.StrEnum):
    """Reason codes: journal, sidecars, logs and metrics use these values."""

    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    SPECIAL_FILE = "special_file"
    UNREADABLE = "unreadable"
    TOO_LARGE = "too_large"
    TIMEOUT = "timeout"
    ENCRYPTED = "encrypted"
    ENGINE_ERROR = "engine_error"
    ENGINE_FAILED = "engine_failed"
    SUSPICIOUS = "suspicious"  # the engine's verdict was only suspicious (Perception Point SUS/SPM)
    ENGINE_UNAVAILABLE = "engine_unavailable"
    RATE_LIMITED = "rate_limited"  # the engine kept saying "slow down" past max_pending_age
    AUTH = "auth"
    BAD_REQUEST = "bad_request"
    INTERNAL_ERROR = "internal_error"
    UNSAFE_PATH = "unsafe_path"
    UNSAFE_KEY = "unsafe_key"
    TOO_MANY_TAGS = "too_many_tags"  # an object judged in place has no room for the verdict's tags
    UNSAFE_NAME = "unsafe_name"  # a file name its destination cannot hold (e.g. not UTF-8, for S3)
    IGNORED = "ignored"  # an S3 key an `ignore` glob matches: reported, never scanned
    DIRECTORY_MARKER = "directory_marker"  # an S3 key ending in `/`: reported, never scanned
    PERMISSION_DENIED = "permission_denied"  # the daemon cannot write or enter the file's folder


class RejectReason(enum.StrEnum):
    """Why a webhook delivery was refused: the `reason` of `webhook.rejected` log lines."""

    MISSING_HEADERS = "missing_headers"
    BAD_TIMESTAMP = "bad_timestamp"
    BAD_SIGNATURE = "bad_signature"
    STALE_TIMESTAMP = "stale_timestamp"
    BAD_SECRET = "bad_secret"
    TRANSFER_ENCODING = "transfer_encoding"
    NO_LENGTH = "no_length"
    BAD_LENGTH = "bad_length"
    TOO_LARGE = "too_large"
    BAD_JSON = "bad_json"
    BUSY = "busy"


@dataclass(frozen=True)
class Verdict:
    """What an engine concluded about one file's bytes."""

    kind: VerdictKind
    threats: tuple[str, ...] = ()
    reason: str | None = None
    engine_scan_id: str | None = None
    raw: dict[str, object] = field(default_factory=dict)

    @classmethod
    def failed(cls, reason: str, **kw: object) -> Verdict:
        """A failed verdict with a reason code."""
        return cls(VerdictKind.FAILED, reason=reason, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Pending:
    """The engine accepted the file and will answer later: poll `engine_scan_id`."""

    engine_scan_id: str
    poll_after_s: float = 1.0


@dataclass(frozen=True)
class S3Object:
    """The exact S3 object version being scanned, for engines that read S3 themselves."""

    bucket: str
    key: str
    etag: str
    version_id: str | None
    url: str  # a presigned GET URL of this object (Perception Point `download_link`)
    # `key` is a private snapshot only scanwatch can write: pinned without a version, so an
    # engine may read it by `path` (docs/integrity.md, "Remote engines").
    is_snapshot: bool = False


class SeenObject(NamedTuple):
    """An S3 object version as a listing or an event names it (rel_path relative to the source)."""

    rel_path: str
    etag: str
    version_id: str | None
    size: int
    last_modified: float | None = None  # epoch seconds; events carry none


class RowChanges(TypedDict, total=False):
    """The columns a step may change, with their types: what `Journal.apply` writes."""

    state: FileState
    dev: int
    inode: int
    size: int | None
    mtime_ns: int
    ctime_ns: int
    sha256: str | None
    ref_id: str | None
    engine: str
    engine_scan_id: str | None
    attempts: int
    move_attempts: int
    next_attempt_at: float
    verdict: VerdictKind | None
    reason: str | None
    threats: list[str]
    raw_result: dict[str, object] | None
    destination: str | None
    dest_root: str | None
    dest_rel: str | None
    disposition: str
    owner: str | None
    last_error: str | None
    stable_at: float | None
    scanned_at: float
    done_at: float
    etag: str | None
    version_id: str | None
    submitting_at: float | None
    last_modified: float | None
    snapshot: str | None


@dataclass(frozen=True)
class ScanRecord:
    """One engine's scan of one file's bytes, on a watch with several engines (journal `scans`)."""

    file_id: int
    engine: str
    sha256: str  # the bytes this record is about: a record of other bytes does not count
    ref_id: str | None = None
    engine_scan_id: str | None = None
    verdict: VerdictKind | None = None
    reason: str | None = None
    threats: list[str] | None = None
    attempts: int = 0
    submitting_at: float | None = None  # a remote submission may have happened: in doubt
    next_attempt_at: float = 0.0
    last_error: str | None = None
    scanned_at: float | None = None
    abandoned: bool = False  # another engine decided the file first: not followed any more
    cached_from: dict[str, Any] | None = None  # the verdict cache's: the scan it reuses

    @property
    def is_final(self) -> bool:
        """Answered (or given up on): nothing more is asked of this engine for these bytes."""
        return self.verdict is not None or self.abandoned


class ScanChanges(TypedDict, total=False):
    """The columns of a scan record a step may change."""

    sha256: str
    ref_id: str | None
    engine_scan_id: str | None
    verdict: VerdictKind | None
    reason: str | None
    threats: list[str]
    attempts: int
    submitting_at: float | None
    next_attempt_at: float
    last_error: str | None
    scanned_at: float
    abandoned: bool
    cached_from: dict[str, Any] | None


_Frozen = TypeVar("_Frozen")


def replaced(frozen: _Frozen, changes: Mapping[str, Any]) -> _Frozen:
    """`dataclasses.replace` of a frozen dataclass without its `__init__` (one frozen
    `__setattr__` per field): ~2 µs instead of ~13, for what a step does per file."""
    if unknown := changes.keys() - frozen.__dict__.keys():
        raise TypeError(f"not {type(frozen).__name__} fields: {sorted(unknown)}")
    copy = object.__new__(type(frozen))
    copy.__dict__.update(frozen.__dict__)
    copy.__dict__.update(changes)
    return copy
