"""What every location shares: the narrow protocols the pipeline sees a place through
(`Source`, `Destination`, `QuarantineStore`, and capabilities only some places have), a
MoveRequest, and `transfer` (docs/architecture.md)."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, BinaryIO, NamedTuple, Protocol, runtime_checkable

from daemon.errors import ChangedError
from daemon.fsutil import Identity
from daemon.journal import RowChanges
from daemon.model import S3Object

__all__ = ["CHUNK", "MAX_COLLISIONS", "SIDECAR_SUFFIX", "Content", "CopySource", "Destination", "Listable",
           "Listed", "MoveRequest", "ObjectStore", "Opened", "QuarantineStore", "ReadBy", "Rewritten",
           "Source", "Tagged", "Verified", "json_bytes", "read_full", "transfer"]

SIDECAR_SUFFIX = ".scanwatch.json"
CHUNK = 1 << 20
MAX_COLLISIONS = 10_000


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
    last_modified: float | None = None  # an S3 source: with the ETag, the version when unversioned
    snapshot: str | None = None  # an S3 source's private snapshot: what was scanned, and is moved
    # Filled by the source: `(rel_path, inode)` of files it put back as new arrivals (an
    # original changed after its snapshot, docs/integrity.md), for the journal to record.
    arrivals: list[tuple[str, int]] = field(default_factory=list)

    @property
    def marker(self) -> str:
        """Tells our copy at the destination from any other object (S3 tag value)."""
        return f"{self.file_id}.{(self.sha256 or (self.etag or '').strip(chr(34)))[:16]}"


@dataclass(frozen=True)
class Listed:
    """What the journal knows of the version to scan: an S3 object's listed ETag, VersionId
    and size (None for a local file, or an object replaced since it was listed); for a
    row, its id and hash (docs/integrity.md, "Snapshot")."""

    rel_path: str
    etag: str | None = None
    version_id: str | None = None
    size: int | None = None
    file_id: int | None = None  # the journal row: names its local snapshot, or S3 staged copy and snapshot
    snapshot: str | None = None  # the row's S3 snapshot, if one was made
    sha256: str | None = None  # the row's bytes, already hashed (a local snapshot is complete)
    identity: Identity | None = None  # a local file's, when it settled: a snapshot of another is dropped


class ReadBy(StrEnum):
    """How the bytes held for scanning will be read: what `Opened.content` keeps for the reader."""

    DESCRIPTOR = "descriptor"  # a descriptor of the hashed bytes (a local file always gives one)
    VERSION = "version"  # an S3 object itself where a VersionId or a private snapshot pins it; else a copy
    KEY = "key"  # an S3 object by its key, which names no version: only ever a private snapshot


@dataclass(frozen=True)
class Content:
    """The bytes to scan, hashed: `fd` holds them (None when they are read from the S3 object
    itself, `s3` naming that exact version or snapshot)."""

    fd: int | None
    sha256: str
    size: int
    s3: S3Object | None = None


class Opened(Protocol):
    """A source file or object held for scanning."""

    path: str  # its full name: a local path or an s3:// URL

    @property
    def facts(self) -> RowChanges:
        """Which version this is, as journal columns: an inode's identity, or ETag and VersionId."""
        ...

    def content(self, *, read_by: ReadBy = ReadBy.DESCRIPTOR) -> Content:
        """Hash the bytes; an S3 object is downloaded, and kept as a copy unless `read_by`
        reads the object itself (docs/integrity.md, "Remote engines")."""
        ...


class Source(Protocol):
    """Where files come from: held for scanning, read for copies, removed once placed."""

    url: str  # as configured
    settles: bool  # its files may still be written to when they appear (local), or appear whole (S3)

    def name(self, rel_path: str) -> str:
        """The full name of `rel_path` here (a path, or an s3:// URL)."""
        ...

    def open_for_scan(self, listed: Listed) -> AbstractContextManager[Opened]:
        """Hold the file or object version for scanning (FileNotFoundError: gone)."""
        ...

    def identity_now(self, rel_path: str) -> Identity | None:
        """The identity of what `rel_path` is now (a file that could not be read, to move it)."""
        ...

    def open_bytes(self, req: MoveRequest) -> AbstractContextManager[BinaryIO]:
        """A reader of the scanned bytes of `req.rel_path` (ChangedError if they changed)."""
        ...

    def remove(self, req: MoveRequest) -> None:
        """Remove `req.rel_path` if it is still the scanned version (else leave it)."""
        ...


class Destination(Protocol):
    """Where files go: a name planned, the scanned bytes received, a sidecar beside them."""

    url: str  # as configured

    def name(self, rel_path: str) -> str:
        """The full name of `rel_path` here (a path, or an s3:// URL)."""
        ...

    def plan(self, rel_path: str, *, taken: bool = False, placing: MoveRequest | None = None) -> str:
        """The first free name for `rel_path` here: itself, else `<stem>.<n><ext>`.

        `taken`: a `receive` found the name taken, so look again. Where `receive` never
        overwrites and looking costs a request (S3), the first plan is the name itself.
        `placing`: the request looking again; a name already holding its very source version
        (placed by another member of a fleet, docs/fleet.md) is planned, not passed over.
        """
        ...

    def receive(self, req: MoveRequest, source: Source) -> bool:
        """Place the scanned bytes at `req.dest_rel`; FileExistsError if the name is taken,
        FileNotFoundError if the source no longer has them (a half-done move is finished).
        True when another daemon of a fleet had placed these very bytes there already."""
        ...

    def holds(self, req: MoveRequest) -> bool:
        """True when `req.dest_rel` holds the copy this request placed."""
        ...

    def write_sidecar(self, rel_path: str, facts: Mapping[str, object]) -> None:
        """Write `<name>.scanwatch.json` beside `rel_path`."""
        ...


class QuarantineStore(Protocol):
    """What `scanwatch quarantine` asks of the place holding a quarantined file (a release
    moves it out as from a `Source`)."""

    url: str  # as configured

    def name(self, rel_path: str) -> str:
        """The full name of `rel_path` here (a path, or an s3:// URL)."""
        ...

    def read_sidecar(self, rel_path: str) -> Any:
        """The sidecar beside `rel_path`."""
        ...

    def delete(self, rel_path: str) -> None:
        """Delete `rel_path` and its sidecar for good (quarantine delete)."""
        ...


# -- what only some places can do (S3): asked with isinstance, never of a concrete class ---------


class Rewritten(NamedTuple):
    """The object version an in-place rewrite made: its ETag and LastModified (None: unknown)."""

    etag: str
    last_modified: float | None


@runtime_checkable
class Tagged(Protocol):
    """A place whose objects carry tags: a verdict is put on the scanned version itself
    (docs/contract.md, "S3 in place")."""

    settles: bool

    def name(self, rel_path: str) -> str: ...

    def tags(self, rel_path: str) -> dict[str, str]:
        """The tags of `rel_path` ({} if there is no such object)."""
        ...

    def tag_in_place(self, rel_path: str, etag: str | None, version_id: str | None,
                     tags: Mapping[str, str], sha256: str | None) -> Rewritten | None:
        """Put `tags` on exactly that version; the version it is now if it was written again."""
        ...


@runtime_checkable
class Listable(Protocol):
    """A place listed by asking it (an S3 prefix), not by walking a directory."""

    def listing(self, keep: Callable[[str], bool]) -> Iterator[Listed]:
        """What is there now, as listed (folder markers left out; `keep` filters names)."""
        ...


@runtime_checkable
class ObjectStore(Protocol):
    """Objects by name with conditional writes: the fleet's shared verdicts, a held object's ETag."""

    def name(self, rel_path: str) -> str: ...

    def head(self, rel_path: str) -> dict[str, Any] | None:
        """HeadObject of `rel_path`, or None if there is no such object."""
        ...

    def read_object(self, rel_path: str) -> bytes:
        """The bytes of `rel_path` (FileNotFoundError: none)."""
        ...

    def create_object(self, rel_path: str, body: bytes) -> bool:
        """Write `rel_path` unless it exists (False: it did, left as it was)."""
        ...


@runtime_checkable
class CopySource(Protocol):
    """A source a destination of its kind copies from server-side (S3 to S3)."""

    def copy_source(self, req: MoveRequest) -> tuple[dict[str, str], dict[str, str]] | None:
        """What a server-side copy of the scanned bytes copies and its conditions (None: upload)."""
        ...

    def head_key(self, key: str) -> dict[str, Any]:
        """HeadObject of `key` ({} if there is no such object)."""
        ...


def transfer(req: MoveRequest, source: Source, dest: Destination, *, resumed: bool = False) -> bool:
    """Move the scanned file from `source` to `dest` at `req.dest_rel`.

    `resumed`: a move of this request may have been cut off; finish it. Raises
    FileNotFoundError when the file is in neither place, ChangedError when the source
    is not the scanned file, FileExistsError when `dest_rel` was taken (plan again). True when
    another daemon of a fleet had placed it (docs/fleet.md).
    """
    if resumed and dest.holds(req):
        source.remove(req)
        return False
    already_placed = dest.receive(req, source)
    source.remove(req)
    return already_placed


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
