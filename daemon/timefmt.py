"""Times as sidecars, logs and vendors write them: ISO 8601 UTC."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["iso", "parse_iso"]


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC with a Z, as sidecars and status print times."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(value: object) -> float | None:
    """The POSIX time of an ISO 8601 string (a `Z` or an offset), or None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
