"""At start, the staging directories are reconciled with the journal (docs/integrity.md).

Every name in staging carries its row's id (`<id>.snap`, `<id>.orig`). A row still being
handled keeps what it has there: its move finishes it, and a row past its snapshot whose
snapshot is gone has it made again from the original. What no live row owns goes: a
snapshot is removed; a captured original is unlinked only when its row is done and its
bytes are the ones that row placed, and otherwise put back into its source as a new
arrival. Cheap: one listing of each staging directory, one journal read per entry.
"""

from __future__ import annotations

import contextlib
import os
import re

import structlog

from daemon.config import Config
from daemon.errors import LocationError
from daemon.fsutil import same_bytes
from daemon.journal import FileRow, Journal
from daemon.locations import MoveRequest
from daemon.locations.original import return_original
from daemon.model import FileState
from daemon.s3url import is_s3
from daemon.staging import Staging, StagingDirs

__all__ = ["reconcile"]

log = structlog.get_logger("scanwatch.pipeline")

_SETTLED = (FileState.DONE, FileState.GONE, FileState.HELD)
# Only our own names: `<state_dir>/staging` also holds S3's staged copies (`s3/`,
# daemon/locations/s3staging.py), which that module reconciles.
_OURS = re.compile(r"[0-9]+\.(snap|orig)")


def reconcile(config: Config, journal: Journal, stagings: StagingDirs, now: float) -> None:
    """Tidy each local source's staging directory against the journal."""
    roots = {w.source: w.name for w in config.watches if not is_s3(w.source)}
    seen: set[int] = set()
    for root in roots:
        try:
            staging = stagings.for_source(root)
        except (OSError, LocationError) as exc:
            log.warning("staging.unavailable", source=root, error=str(exc))
            continue
        if staging.fd in seen:  # shared by sources on one filesystem
            continue
        seen.add(staging.fd)
        for name in os.listdir(staging.fd):
            if _OURS.fullmatch(name) is None:
                continue
            _reconcile_one(config, journal, staging, (root, roots[root]), name, now)


def _reconcile_one(config: Config, journal: Journal, staging: Staging, home: tuple[str, str],
                   name: str, now: float) -> None:
    """`home`: the source and watch an original without any row goes back to."""
    stem, _, kind = name.partition(".")
    row = journal.get(int(stem)) if stem.isdigit() else None
    if row is not None and row.state not in _SETTLED:
        return  # its move (or scan) goes on from here
    if kind == "orig" and row is None:
        _put_back(journal, staging, home, name, None, now)
        return
    if kind != "orig" or row is None:
        staging.unlink(name)
        log.info("staging.removed", name=name, file_id=row.id if row else None)
        return
    fd = staging.open(name)
    if fd is None:
        return
    try:
        same = row.state is FileState.DONE and same_bytes(fd, row.size, row.sha256)
    finally:
        os.close(fd)
    if same:
        staging.unlink(name)
        return
    _put_back(journal, staging, (config.watch(row.watch).source, row.watch), name, row, now)


def _put_back(journal: Journal, staging: Staging, home: tuple[str, str], name: str,
              row: FileRow | None, now: float) -> None:
    """An original whose row is over but whose bytes were not placed: back to its source."""
    source, watch = home
    rel_path = row.rel_path if row is not None else name  # no row left: at the watch root
    req = MoveRequest(file_id=row.id if row else 0, rel_path=rel_path, dest_rel=rel_path, size=0,
                      sha256=None, verify=False, private=False)
    with contextlib.suppress(FileNotFoundError):
        return_original(source, req, staging, name, "left in staging by a crash")
    journal.discover(watch, req.arrivals, now)
