"""What every location shares: the Location protocol, a MoveRequest, and `transfer`."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from daemon.errors import LocationError
from daemon.fsutil import Identity

__all__ = ["CHUNK", "MAX_COLLISIONS", "SIDECAR_SUFFIX", "ChangedError", "Location", "MoveRequest", "Verified",
           "json_bytes", "read_full", "transfer"]

SIDECAR_SUFFIX = ".scanwatch.json"
CHUNK = 1 << 20
MAX_COLLISIONS = 10_000


class ChangedError(LocationError):
    """The source is not the file that was scanned any more: scan it again."""


@dataclass(frozen=True)
class MoveRequest:
    """Move the scanned version of `rel_path` to `dest_rel` (planned and journaled)."""

    file_id: int
    rel_path: str
    dest_rel: str
    size: int
    sha256: str | None  # the scanned bytes' hash (None if they could not be read)
    verify: bool  # check the bytes against sha256 before they become visible (clean)
    private: bool  # quarantine: 0600 files, 0700 directories
    identity: Identity | None = None  # a local source
    etag: str | None = None  # an S3 source
    version_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)  # for S3 destinations

    @property
    def marker(self) -> str:
        """Tells our copy at the destination from any other object (S3 tag value)."""
        return f"{self.file_id}.{(self.sha256 or (self.etag or '').strip(chr(34)))[:16]}"


class Location(Protocol):
    """A local directory or an S3 prefix, as one side of a move."""

    url: str  # as configured

    def name(self, rel_path: str) -> str:
        """The full name of `rel_path` here (a path, or an s3:// URL)."""
        ...

    def plan(self, rel_path: str, *, taken: bool = False) -> str:
        """The first free name for `rel_path` here: itself, else `<stem>.<n><ext>`.

        `taken`: a `receive` found the name taken, so look again. Where `receive` never
        overwrites and looking costs a request (S3), the first plan is the name itself.
        """
        ...

    def receive(self, req: MoveRequest, source: Location) -> None:
        """Place the scanned bytes at `req.dest_rel`; FileExistsError if the name is taken,
        FileNotFoundError if the source no longer has them (a half-done move is finished)."""
        ...

    def holds(self, req: MoveRequest) -> bool:
        """True when `req.dest_rel` holds the copy this request placed."""
        ...

    def remove(self, req: MoveRequest) -> None:
        """Remove `req.rel_path` if it is still the scanned version (else leave it)."""
        ...

    def open_bytes(self, req: MoveRequest) -> AbstractContextManager[BinaryIO]:
        """A reader of the scanned bytes of `req.rel_path` (ChangedError if they changed)."""
        ...

    def write_sidecar(self, rel_path: str, facts: Mapping[str, object]) -> None:
        """Write `<name>.scanwatch.json` beside `rel_path`."""
        ...

    def read_sidecar(self, rel_path: str) -> Any:
        """The sidecar beside `rel_path`."""
        ...

    def delete(self, rel_path: str) -> None:
        """Delete `rel_path` and its sidecar for good (quarantine delete)."""
        ...


def transfer(req: MoveRequest, source: Location, dest: Location, *, resumed: bool = False) -> None:
    """Move the scanned file from `source` to `dest` at `req.dest_rel`.

    `resumed`: a move of this request may have been cut off; finish it. Raises
    FileNotFoundError when the file is in neither place, ChangedError when the source
    is not the scanned file, FileExistsError when `dest_rel` was taken (plan again).
    """
    if resumed and dest.holds(req):
        source.remove(req)
        return
    dest.receive(req, source)
    source.remove(req)


class Verified(io.RawIOBase):
    """Reads a stream and, at its end, checks the bytes against the expected sha256."""

    def __init__(self, raw: Any, req: MoveRequest, what: str) -> None:
        self._raw = raw
        self._digest = hashlib.sha256() if req.verify else None
        self._expected = req.sha256
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        if self._digest is not None:
            if data:
                self._digest.update(data)
            elif self._digest.hexdigest() != self._expected:
                raise ChangedError(f"{self._what} has other bytes than were scanned")
        buffer[: len(data)] = data
        return len(data)


def read_full(reader: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes (fewer only at the end of the stream)."""
    parts: list[bytes] = []
    while size > 0 and (chunk := reader.read(size)):
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def json_bytes(facts: Mapping[str, object]) -> bytes:
    try:
        return json.dumps(facts, indent=2, ensure_ascii=False).encode() + b"\n"
    except UnicodeEncodeError:  # a file name that is not UTF-8: escape it
        return json.dumps(facts, indent=2).encode() + b"\n"
