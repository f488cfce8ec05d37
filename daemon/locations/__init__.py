"""Locations: where files come from and go to (a local directory or an S3 prefix).

The pipeline moves a file with `transfer(request, source, dest)` without knowing
which kinds the two are. Every move is "place a verified copy, then remove the
source if it is still the scanned file", with the planned name journaled first,
so a move cut off at any point is finished by `transfer(..., resumed=True)`:

- local → local: an atomic rename that never overwrites (a copy across filesystems);
- S3 → S3: a server-side copy of an immutable version or private snapshot, or an upload of
  the very bytes that were scanned (unversioned buckets: daemon/locations/s3staging.py);
- S3 → local: the scanned bytes (staged copy, snapshot or version) written to a temp name,
  fsync, a no-overwrite rename;
- local → S3: an upload (multipart above one part) that completes only when the bytes
  are the scanned ones, never overwriting (`IfNoneMatch`).

A copy meant for `clean` is checked against the scanned sha256 before it becomes
visible; anything else (the source changed) raises ChangedError: scan it again.
"""

from __future__ import annotations

from collections.abc import Mapping

from daemon.config import IN_PLACE, Config, WatchConfig
from daemon.fsutil import DirCache
from daemon.locations.base import (
    SIDECAR_SUFFIX,
    Content,
    CopySource,
    Destination,
    Listable,
    Listed,
    MoveRequest,
    ObjectStore,
    Opened,
    QuarantineStore,
    ReadBy,
    Rewritten,
    Source,
    Tagged,
    transfer,
)
from daemon.locations.local import LocalLocation
from daemon.locations.s3 import S3Location
from daemon.s3client import S3Clients
from daemon.s3url import is_s3
from daemon.staging import StagingDirs

__all__ = [
    "Content",
    "CopySource",
    "Destination",
    "Listable",
    "Listed",
    "LocalLocation",
    "Locations",
    "MoveRequest",
    "ObjectStore",
    "Opened",
    "Place",
    "QuarantineStore",
    "ReadBy",
    "Rewritten",
    "S3Location",
    "Source",
    "Tagged",
    "SIDECAR_SUFFIX",
    "transfer",
]


# A configured place: a local directory or an S3 prefix, either side of a move. The pipeline
# sees it only through one narrow protocol at a time (tests give fakes of those protocols).
Place = LocalLocation | S3Location


class Locations:
    """Places by configured URL for one batch of work, seen as a `Source`, a `Destination` or
    a `QuarantineStore`: local ones share `dirs`, S3 ones use the client for their watch's S3
    settings, local sources their staging directory of snapshots (`daemon/staging.py`)."""

    def __init__(self, config: Config, dirs: DirCache, clients: S3Clients | None = None,
                 places: Mapping[str, Place] | None = None,
                 staging: StagingDirs | None = None) -> None:
        self._config = config
        self._staging = staging or StagingDirs(config.state_dir)
        self.dirs = dirs
        self._clients = clients or S3Clients()
        self._places = places or {}  # URL → a place given from outside (tests' fakes)
        self._made: dict[tuple[str, str], Place] = {}  # once per batch: asked for several times per file

    def source(self, url: str, watch: WatchConfig) -> Source:
        return self._place(url, watch)

    def destination(self, url: str, watch: WatchConfig) -> Destination:
        return self._place(url, watch)

    def store(self, url: str, watch: WatchConfig) -> QuarantineStore:
        return self._place(url, watch)

    def refuses(self, url: str, watch: WatchConfig, rel_path: str) -> str | None:
        """Why a name from another source cannot be placed at `url`, before it is scanned."""
        return self._place(url, watch).refuses(rel_path)

    def _place(self, url: str, watch: WatchConfig) -> Place:
        if (place := self._places.get(url)) is not None:
            return place
        if (made := self._made.get((url, watch.name))) is None:
            made = self._made[url, watch.name] = self._make(url, watch)
        return made

    def _make(self, url: str, watch: WatchConfig) -> Place:
        if not is_s3(url):
            return LocalLocation(url, self.dirs, self._staging)
        s3 = self._config.s3_for(watch)
        return S3Location(url, self._clients(s3), s3, self._config.state_dir / "work",
                          state_dir=self._config.state_dir,
                          stages=IN_PLACE not in watch.destinations.values())
