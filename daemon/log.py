"""structlog set-up: JSON (or console) lines on stdout, with secrets redacted as a backstop."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

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


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    """Route structlog events to stdout as JSON lines (or a console layout)."""
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(),  # sys.stdout as it is at each call
        cache_logger_on_first_use=False,
    )
