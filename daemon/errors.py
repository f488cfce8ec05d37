"""Every exception scanwatch raises, in one tree.

    ScanwatchError
    ├── ConfigError                  the YAML is invalid (carries one line per problem)
    ├── ListenError                  a listen address from the config cannot be bound
    ├── WebhookRejectedError         a webhook delivery is refused (answered, logged, never journaled)
    ├── JournalError                 SQLite could not be opened or written
    │   └── JournalDamagedError      the journal file is corrupt or lost its WAL: rebuild it
    ├── QuarantineError              a quarantine command cannot be carried out
    ├── QueueUnavailableError        SQS refused or could not answer a call
    ├── MalformedMessageError        an SQS message is not an event we can read (left for redrive)
    ├── LocationError                a move, copy or sidecar write failed (retried)
    │   ├── UnsafePathError          a path component is a symlink or escapes its root
    │   ├── ChangedError             the source is not the scanned file any more: scan it again
    │   ├── S3ConditionError         an S3 write or read condition (If-Match, If-None-Match) failed
    │   ├── S3UnavailableError       S3 cannot be used now (down, throttled, denied): wait
    │   ├── StagingError             the staging directory of snapshots is unusable: wait
    │   └── TooManyTagsError         an object judged in place has no room left for our tags
    └── EngineError                  an engine gave no verdict
        ├── EngineRetryableError     unreachable, timed out, 500/502/504: try again later
        │   └── EngineUnavailableError  the engine is down: files wait, attempts not spent
        │       └── EngineThrottledError  "slow down" (429, 503): files wait, the engine is up
        ├── EnginePermanentError     rejected, too large, encrypted: fail the file now
        │   └── EngineBrokenError    every file alike (an invalid licence, a full disk): the engine is down
        └── EngineResubmitError      a poll cannot go on: submit the bytes again

Retryability comes from the class, never from message text. Engine errors carry a
reason code (`daemon.model.Reason`) that ends up in the journal and the sidecar.
"""

from __future__ import annotations

import errno

from daemon.model import Reason, RejectReason

__all__ = [
    "ChangedError",
    "ConfigError",
    "EngineBrokenError",
    "EngineError",
    "EnginePermanentError",
    "EngineResubmitError",
    "EngineRetryableError",
    "EngineThrottledError",
    "EngineUnavailableError",
    "JournalDamagedError",
    "JournalError",
    "ListenError",
    "LocationError",
    "MalformedMessageError",
    "QuarantineError",
    "QueueUnavailableError",
    "S3ConditionError",
    "S3UnavailableError",
    "ScanwatchError",
    "StagingError",
    "TooManyTagsError",
    "UnsafePathError",
    "WebhookRejectedError",
]


class ScanwatchError(Exception):
    """Root of every scanwatch error."""


class ConfigError(ScanwatchError):
    """The config file is invalid; `problems` holds one `path: message` line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


class ListenError(ScanwatchError):
    """A `listen` address of the config cannot be bound (in use, not ours, no such host)."""

    def __init__(self, key: str, listen: str, exc: OSError) -> None:
        in_use = exc.errno == errno.EADDRINUSE
        why = "address already in use" if in_use else (exc.strerror or str(exc)).lower()
        super().__init__(f"{key}: cannot listen on {listen}: {why}; "
                         "choose another address or port, or stop the other process")
        self.key = key
        self.listen = listen


class WebhookRejectedError(ScanwatchError):
    """A webhook delivery is refused: `status` is the HTTP answer, `reason` the logged code."""

    def __init__(self, status: int, reason: RejectReason) -> None:
        super().__init__(f"webhook delivery refused with {status}: {reason}")
        self.status = status
        self.reason = reason


class JournalError(ScanwatchError):
    """The journal could not be opened or written."""


class JournalDamagedError(JournalError):
    """The journal is corrupt, unreadable or lost committed history; see docs/operations.md."""


class LocationError(ScanwatchError):
    """A file could not be moved, copied or described at its destination."""


class ChangedError(LocationError):
    """The source is not the file that was scanned any more: scan it again."""


class S3ConditionError(LocationError):
    """A conditional S3 request found the object other than it required (HTTP 412)."""


class S3UnavailableError(LocationError):
    """S3 cannot be used right now (down, throttling, missing bucket, denied): wait and retry."""


class StagingError(LocationError):
    """The private staging directory of snapshots cannot be used (docs/integrity.md)."""


class QuarantineError(ScanwatchError):
    """A quarantine command cannot be carried out."""


class QueueUnavailableError(ScanwatchError):
    """SQS refused or could not answer a call: queue missing, access denied, endpoint down."""

    def __init__(self, message: str, *, action: str, code: str | None = None) -> None:
        super().__init__(message)
        self.action = action
        self.code = code


class MalformedMessageError(ScanwatchError):
    """An SQS message body is not an S3 event notification; the message says why, briefly."""


class TooManyTagsError(LocationError):
    """An object judged in place has too many tags of its own for scanwatch's (S3 allows 10)."""


class UnsafePathError(LocationError):
    """A path component is a symlink, a special file, or leaves its root; `reason` says which."""

    def __init__(self, message: str, reason: Reason = Reason.SYMLINK) -> None:
        super().__init__(message)
        self.reason = reason


class EngineError(ScanwatchError):
    """An engine could not give a verdict."""

    reason: Reason = Reason.ENGINE_ERROR

    def __init__(self, message: str, *, reason: Reason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class EngineRetryableError(EngineError):
    """A passing failure: the same request may succeed later."""

    def __init__(
        self, message: str, *, reason: Reason | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        self.retry_after_s = retry_after_s


class EngineUnavailableError(EngineRetryableError):
    """The engine is down; its files wait without spending attempts."""

    reason = Reason.ENGINE_UNAVAILABLE


class EngineThrottledError(EngineUnavailableError):
    """The engine asked us to slow down (docs/engines.md#rate-limits): its files wait for
    their turn (`retry_after_s`) without spending attempts, and the engine stays healthy."""

    reason = Reason.RATE_LIMITED


class EnginePermanentError(EngineError):
    """A definite refusal: the file fails now with this reason."""


class EngineBrokenError(EnginePermanentError):
    """A refusal that every file would get alike until an administrator acts (MetaDefender's
    invalid licence, full disk): the file fails now and the engine is marked down, which alerts."""


class EngineResubmitError(EngineError):
    """A poll found no scan to follow (lost, in doubt, about other bytes): submit again.

    `may_duplicate`: the engine may already hold a scan of this submission (an in-doubt
    submission it cannot look up), so the repeat is counted. `by_upload`: send the bytes
    themselves, not a path or link.
    """

    def __init__(self, message: str, *, may_duplicate: bool = False, by_upload: bool = False) -> None:
        super().__init__(message)
        self.may_duplicate = may_duplicate
        self.by_upload = by_upload
