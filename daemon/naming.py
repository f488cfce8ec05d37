"""Naming rules: which relative paths are safe, the local path of an S3 key, one flat file name for
a whole path, the next free name after a collision, and a name printed on one line for people.

Pure functions of names (no file system, no S3): see docs/contract.md for the rules they implement.
"""

from __future__ import annotations

import functools
import hashlib
import os
from urllib.parse import quote

from daemon.errors import UnsafePathError
from daemon.model import Reason

__all__ = ["NAME_MAX", "collision_name", "flat_name", "local_rel", "printable", "rel_parts", "split_rel"]

NAME_MAX = 255  # bytes in one file name (Linux)
_MIN_STEM_ROOM = 24  # a stem byte and `.<n>` for any n: an extension longer than the rest is no extension
_MAX_SEGMENT_BYTES = 255
_FLAT_NAME_BYTES = 200


def rel_parts(rel_path: str) -> list[str]:
    """The components of a relative path; raise UnsafePathError for `..`, absolute or empty parts."""
    parts = rel_path.split("/")
    if not rel_path or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise UnsafePathError(f"unsafe relative path {rel_path!r}", Reason.UNSAFE_PATH)
    return parts


def split_rel(rel_path: str) -> tuple[list[str], str]:
    """Directory components and basename of a safe relative path."""
    parts = rel_parts(rel_path)
    return parts[:-1], parts[-1]


@functools.lru_cache(maxsize=4096)  # a file's name is checked by each step, and for each place
def local_rel(rel_path: str) -> str:
    """The relative local path for a key's relative part, or UnsafePathError.

    Keys are not paths: a leading `/`, empty and `.` segments are dropped, while `..`,
    NUL and over-long segments cannot be made safe (reason `unsafe_key`).
    """
    parts = [p for p in rel_path.split("/") if p not in ("", ".")]
    try:
        rel_parts("/".join(parts))
    except UnsafePathError:
        raise UnsafePathError(f"S3 key part {rel_path!r} cannot be a local path") from None
    if any(len(p.encode("utf-8", "surrogateescape")) > _MAX_SEGMENT_BYTES for p in parts):
        raise UnsafePathError(f"S3 key part {rel_path!r} has a segment over 255 bytes")
    return "/".join(parts)


def flat_name(rel_path: str) -> str:
    """One safe file name standing for a whole key part or local path: every `/`, `.` and odd
    byte %-escaped (a byte that is not UTF-8, kept by `surrogateescape`, as itself)."""
    name = quote(rel_path.encode("utf-8", "surrogateescape"), safe="").replace(".", "%2E")
    if not name or len(name) > _FLAT_NAME_BYTES:  # room left for a collision suffix and the sidecar's
        digest = hashlib.sha256(rel_path.encode(errors="surrogateescape")).hexdigest()[:12]
        head = name[: _FLAT_NAME_BYTES - 13]
        cut = head.rfind("%", len(head) - 2)  # keep %-escapes whole
        name = f"{head if cut < 0 else head[:cut]}@{digest}"
    return name


def collision_name(name: str, n: int) -> str:
    """`a.tar.gz` → `a.tar.<n>.gz`, `README` → `README.<n>`; n = 0 keeps the name.

    The result fits NAME_MAX (255 bytes): a long stem is cut, by whole characters (a byte
    that is not UTF-8 counts as one, see `os.fsdecode`), to make room for the suffix. The
    extension is kept unless it alone leaves no room (then the whole name is the stem).
    Every n gives another name: all are the same stem's prefixes followed by `.<n>`.
    """
    if n == 0:
        return name
    suffix = f".{n}"
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or _nbytes(dot + ext) > NAME_MAX - _MIN_STEM_ROOM:
        stem, ext = name, ""
    else:
        ext = dot + ext
    room = NAME_MAX - _nbytes(suffix + ext)
    return _head(stem, room) + suffix + ext


def _nbytes(text: str) -> int:
    """The length of a name on disk, in bytes."""
    return len(os.fsencode(text))


def _head(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` of at most `max_bytes` bytes, cut between characters."""
    if _nbytes(text) <= max_bytes:
        return text
    used = 0
    for i, char in enumerate(text):
        used += _nbytes(char)
        if used > max_bytes:
            return text[:i]
    return text


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(name: str) -> str:
    """A name on one line for people, escaped as `ls -b` does: `\\n`, `\\\\`, `\\xff` for a
    byte that is not UTF-8 (see `os.fsdecode`), `\\x1b` or `\\u202e` for other unprintables."""
    return "".join(_escape(char) for char in name)


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable():
        return char
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the raw byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
