"""Every exception scanwatch raises, in one tree.

    ScanwatchError
    ├── ConfigError                  the YAML is invalid (carries one line per problem)
    ├── JournalError                 SQLite could not be opened or written
    │   └── JournalDamagedError      the journal file is corrupt or lost its WAL: rebuild it
    ├── LocationError                a move, copy or sidecar write failed (retried)
    │   └── UnsafePathError          a path component is a symlink or escapes its root
    └── EngineError                  an engine gave no verdict
        ├── EngineRetryableError     unreachable, timed out, 5xx, 429: try again later
        │   └── EngineUnavailableError  the engine is down: files wait, attempts not spent
        └── EnginePermanentError     rejected, too large, encrypted: fail the file now

Retryability comes from the class, never from message text. Engine errors carry a
reason code (`daemon.model.Reason`) that ends up in the journal and the sidecar.
"""

from __future__ import annotations

from daemon.model import Reason

__all__ = [
    "ConfigError",
    "EngineError",
    "EnginePermanentError",
    "EngineRetryableError",
    "EngineUnavailableError",
    "JournalDamagedError",
    "JournalError",
    "LocationError",
    "ScanwatchError",
    "UnsafePathError",
]


class ScanwatchError(Exception):
    """Root of every scanwatch error."""


class ConfigError(ScanwatchError):
    """The config file is invalid; `problems` holds one `path: message` line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


class JournalError(ScanwatchError):
    """The journal could not be opened or written."""


class JournalDamagedError(JournalError):
    """The journal is corrupt, unreadable or lost committed history; see docs/operations.md."""


class LocationError(ScanwatchError):
    """A file could not be moved, copied or described at its destination."""


class UnsafePathError(LocationError):
    """A path component is a symlink, a special file, or leaves its root."""


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


class EnginePermanentError(EngineError):
    """A definite refusal: the file fails now with this reason."""
