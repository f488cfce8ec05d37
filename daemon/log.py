"""structlog set-up: JSON (or console) lines on stdout, with secrets redacted as a backstop.

Every record is one whole line (docs/operations.md, "Logging"): a process writes each
record in one go under one lock, a JSON line is kept below journald's `LineMax=`, and
worker processes (daemon/workers/pool.py) write to a pipe whose whole lines the daemon copies
to its own stdout, so records of different processes never cut into each other.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog

from daemon.naming import printable

__all__ = ["MAX_LINE_CHARS", "SENSITIVE_KEYS", "configure_logging", "enabled", "file_context", "info_each",
           "redact", "write_lines"]

SENSITIVE_KEYS = frozenset({
    "api_key", "apikey", "token", "secret", "password", "archivepwd", "file_password",
    "authorization", "auth", "signature", "presigned_url", "download_link", "callback_headers",
    "aws_secret_access_key", "credentials",
})
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
# journald cuts a line of a service's stdout into several entries past `LineMax=` (48K by
# default); JSON lines are ASCII, so characters are bytes.
MAX_LINE_CHARS = 32 * 1024
_CUT_MIN_CHARS = 64  # values shorter than this are not worth cutting
_KEPT = ("timestamp", "level", "event", "worker", "watch", "file_id")
_WRITE = threading.Lock()
# The filtering wrappers `configure_logging` can set, by their lowest level let through.
_FLOORS = {structlog.make_filtering_bound_logger(level): level
           for level in (logging.NOTSET, *_LEVELS.values())}
# The fields of the file a pipeline thread is working on, one variable for all of them.
_FILE: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("scanwatch_file",
                                                                                 default=None)


def enabled(level: int) -> bool:
    """Whether a record at `level` would be written, asked without building a logger (a
    module's logger is built anew on each call, so that a new configuration applies)."""
    floor = _FLOORS.get(structlog.get_config()["wrapper_class"])
    return floor is None or level >= floor


@contextmanager
def file_context(fields: Mapping[str, Any]) -> Iterator[None]:
    """Every record of this thread (or task) carries `fields` within the block: the per-file
    fields, set once per step (structlog's own contextvars cost one variable per field)."""
    token = _FILE.set(fields)
    try:
        yield
    finally:
        _FILE.reset(token)


# Where `info_each` puts each of its values in the record it renders once (no name has a NUL),
# and that place as the JSON renderer writes it.
_SLOT = "\x00scanwatch:each\x00"
_SLOT_JSON = json.dumps(_SLOT)


class _Kept:
    """A structlog logger that keeps the rendered record instead of writing it."""

    line = ""

    def info(self, message: str) -> None:
        self.line = message


def info_each(logger: Any, event: str, key: str, values: Iterable[str], **fields: Any) -> None:
    """`logger.info(event, **{key: value}, **fields)` for each of `values`, one record each:
    as JSON lines, a record rendered once with each value put in its place, and written in
    one go. For a record per file of a batch in the daemon's own process (the watchers'
    `file.discovered`), where structlog's chain, ~12 µs a record, is serial work
    (bench/RESULTS.md, "Issue 21")."""
    values = list(values)
    if not values or not enabled(logging.INFO):
        return
    if (lines := _rendered_each(event, key, values, fields)) is None:
        for value in values:
            logger.info(event, **{**fields, key: value})
    else:
        structlog.get_config()["logger_factory"]().info("\n".join(lines))


def _rendered_each(event: str, key: str, values: list[str], fields: Mapping[str, Any]) -> list[str] | None:
    """The JSON lines of `info_each`'s records; None where they go one at a time: lines not
    rendered by `configure_logging`'s JSON (console lines, a test's capture), or one to cut."""
    if not isinstance(structlog.get_config()["processors"][-1], _Fitted):
        return None
    kept = _Kept()
    structlog.wrap_logger(kept).info(event, **{**fields, key: _SLOT})
    before, slot, after = kept.line.partition(_SLOT_JSON)
    lines = [before + json.dumps(value) + after for value in values]
    return lines if slot and max(map(len, lines)) <= MAX_LINE_CHARS else None


def _merge_file(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """`file_context`'s fields, under the record's own (which win, as with contextvars)."""
    fields = _FILE.get()
    return event if fields is None else {**fields, **event}


def write_lines(text: str, *, to_stderr: bool = False) -> None:
    """Write whole lines to stdout (or stderr), as it is at this call, in one go; thread-safe."""
    stream = sys.stderr if to_stderr else sys.stdout
    with _WRITE:
        stream.write(text)
        stream.flush()


class _LineLogger:
    """structlog's logger: each rendered record is one whole line on stdout (the daemon's log),
    or on stderr (a one-shot command's, whose stdout is its output)."""

    def __init__(self, to_stderr: bool) -> None:
        self._to_stderr = to_stderr

    def msg(self, message: str) -> None:
        write_lines(message + "\n", to_stderr=self._to_stderr)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


_LINE_LOGGERS = {False: _LineLogger(to_stderr=False), True: _LineLogger(to_stderr=True)}


class _Fitted:
    """The JSON renderer, with the longest text values halved until the line fits `max_chars`.

    The cut keys are listed under `truncated`; a record with nothing left to cut keeps
    only its `_KEPT` keys.
    """

    def __init__(self, render: structlog.typing.Processor, max_chars: int = MAX_LINE_CHARS) -> None:
        self._render = render
        self._max_chars = max_chars

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        line = str(self._render(logger, name, event))
        cut: set[str] = set()
        while len(line) > self._max_chars:
            longest = max((k for k, v in event.items() if isinstance(v, str)),
                          key=lambda k: len(event[k]), default=None)
            if longest is None or len(event[longest]) < _CUT_MIN_CHARS:
                event = {k: event[k] for k in _KEPT if k in event}
                cut = {"*"}
            else:
                event[longest] = event[longest][:len(event[longest]) // 2] + "..."
                cut.add(longest)
            event["truncated"] = sorted(cut)
            line = str(self._render(logger, name, event))
        return line


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


def configure_logging(fmt: str = "json", level: str = "info", *, to_stderr: bool = False) -> None:
    """Route structlog events to stdout as JSON lines (or a console layout); to stderr for the
    commands whose stdout is their output (`scan`, `status`, ...: docs/contract.md)."""
    # JSON lines are ASCII: a name's byte that is not UTF-8 (U+DC80-U+DCFF after
    # `os.fsdecode`) is the escape `\\udcff`, as in `--json` output (README.md, "What happens to a file").
    renderer: Any = (_Fitted(structlog.processors.JSONRenderer(ensure_ascii=True)) if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=(sys.stderr if to_stderr
                                                                else sys.stdout).isatty()))
    structlog.configure(
        processors=[
            _merge_file,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            *([] if fmt == "json" else [_printable]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *_: _LINE_LOGGERS[to_stderr],
        cache_logger_on_first_use=False,
    )
