"""Durations, sizes, http URLs and host:port: the value types the config's keys share."""

from __future__ import annotations

import re
from typing import Annotated, TypeVar

from pydantic import AfterValidator, BeforeValidator, SecretStr

__all__ = [
    "Duration", "HttpUrl", "SecretHttpUrl", "Size", "check_host_port", "format_duration", "format_size",
    "parse_duration", "parse_size",
]

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_Url = TypeVar("_Url", str, SecretStr)


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as `30s`, `5m`, `2h`, `1d`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30, 30s, 5m, 2h or 1d")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)):
        seconds = float(m[1]) * _DURATION_UNITS[m[2] or "s"]
    else:
        raise ValueError("expected a duration such as 30, 30s, 5m, 2h or 1d")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from a number or a string such as `10MB` (decimal) or `10MiB` (binary)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1048576, 10MB or 10MiB")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)):
        unit = m[2].upper()
        if unit in _SIZE_UNITS:
            return int(float(m[1]) * _SIZE_UNITS[unit])
    raise ValueError("expected a size such as 1048576, 10MB or 10MiB")


def format_duration(seconds: float) -> str | float:
    """The shortest `parse_duration` spelling of `seconds` (`1d`, `5m`; plain seconds otherwise)."""
    for unit in ("d", "h", "m"):
        if seconds >= _DURATION_UNITS[unit] and seconds % _DURATION_UNITS[unit] == 0:
            return f"{int(seconds // _DURATION_UNITS[unit])}{unit}"
    return int(seconds) if seconds == int(seconds) else seconds


def format_size(size_bytes: int) -> str | int:
    """The shortest exact `parse_size` spelling of `size_bytes` (`5GiB`, `100MB`; bytes otherwise)."""
    for unit in ("TiB", "GiB", "MiB", "KiB", "TB", "GB", "MB", "KB"):
        factor = _SIZE_UNITS[unit.upper()]
        if size_bytes >= factor and size_bytes % factor == 0:
            return f"{size_bytes // factor}{unit}"
    return size_bytes


def check_host_port(value: str) -> str:
    """`value` if it is `host:port` with a port in 1..65535 (ValueError otherwise)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected host:port, e.g. 127.0.0.1:9477")
    return value


def _check_http_url(value: _Url) -> _Url:
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    if not text.startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// URL")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
HttpUrl = Annotated[str, AfterValidator(_check_http_url)]
SecretHttpUrl = Annotated[SecretStr, AfterValidator(_check_http_url)]
