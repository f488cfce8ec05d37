"""structlog set-up: JSON (or console) lines on stdout, with secrets redacted as a backstop."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from daemon.fsutil import printable

__all__ = ["SENSITIVE_KEYS", "configure_logging", "redact"]

SENSITIVE_KEYS = frozenset({
    "api_key", "apikey", "token", "secret", "password", "archivepwd", "file_password",
    "authorization", "auth", "signature", "presigned_url", "download_link", "callback_headers",
    "aws_secret_access_key", "credentials",
})
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace the value of every sensitive key, at any depth, with `***`."""
    for key, value in event.items():
        if key.lower() in SENSITIVE_KEYS:
            event[key] = "***"
        elif isinstance(value, dict):
            event[key] = redact(None, "", dict(value))
    return event


def _printable(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Console lines: names with control characters or bytes that are not UTF-8, escaped."""
    for key, value in event.items():
        if isinstance(value, str) and not value.isprintable():
            event[key] = (value.encode("utf-8", "backslashreplace").decode() if key == "exception"
                          else printable(value))
    return event


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    """Route structlog events to stdout as JSON lines (or a console layout)."""
    # JSON lines are ASCII: a name's byte that is not UTF-8 (U+DC80-U+DCFF after
    # `os.fsdecode`) is the escape `\\udcff`, as in `--json` output (README.md, "What happens to a file").
    renderer: Any = (structlog.processors.JSONRenderer(ensure_ascii=True) if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            *([] if fmt == "json" else [_printable]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(),  # sys.stdout as it is at each call
        cache_logger_on_first_use=False,
    )
