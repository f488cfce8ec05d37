"""`scanwatch quarantine`: list, show, release and delete quarantined files, audited."""

from __future__ import annotations

import getpass
import os
import time
from typing import Any

import structlog

from daemon.config import IN_PLACE, Config, WatchConfig
from daemon.errors import ChangedError, LocationError, QuarantineError
from daemon.fsutil import DirCache, Identity
from daemon.journal import FileRow, Journal
from daemon.locations import Locations, MoveRequest, ObjectStore, Source, Tagged, transfer
from daemon.locations.inplace import verdict_tags
from daemon.model import FileState, VerdictKind
from daemon.outcome_facts import iso, outcome_facts
from daemon.s3url import is_s3

__all__ = ["actor", "delete", "describe", "list_quarantined", "release"]

log = structlog.get_logger("scanwatch.quarantine")


def actor() -> str:
    """Who runs this command (the user behind sudo), for the audit trail."""
    return os.environ.get("SUDO_USER") or getpass.getuser()


def list_quarantined(journal: Journal, *, watch: str | None = None, since: float | None = None,
                     threat: str | None = None) -> list[FileRow]:
    """Files in quarantine now (not released or deleted), newest last.

    `threat` is a substring of a threat name (ASCII case-insensitive), taken literally.
    """
    return journal.rows(watch=watch or None, states=[FileState.DONE], verdict=VerdictKind.INFECTED,
                        has_disposition=False, done_since=since, threat=threat or None,
                        order="done_at", limit=100_000)


def _quarantined(journal: Journal, file_id: int) -> FileRow:
    row = journal.get(file_id)
    if row is None or row.verdict != VerdictKind.INFECTED or row.state is not FileState.DONE:
        raise QuarantineError(f"no quarantined file with id {file_id}")
    if row.disposition is not None:
        raise QuarantineError(f"file {file_id} was already {row.disposition}")
    return row


def _in_quarantine(row: FileRow, watch: WatchConfig, locations: Locations) -> tuple[str, str]:
    """The URL of the quarantine holding the row's file, and its name there."""
    assert row.destination is not None
    url = watch.quarantine
    if not row.destination.startswith(locations.store(url, watch).name("")):
        # The watch's quarantine moved since: the file's own directory.
        parent = row.destination.rsplit("/", 1)[0] + "/"
        url = parent if is_s3(parent) else os.path.dirname(row.destination)
    return url, row.destination.removeprefix(locations.store(url, watch).name(""))


def describe(config: Config, journal: Journal, file_id: int) -> dict[str, Any]:
    """Journal facts, sidecar and audit trail of one quarantined (or once quarantined) file."""
    row = journal.get(file_id)
    if row is None or row.verdict != VerdictKind.INFECTED:
        raise QuarantineError(f"no quarantined file with id {file_id}")
    facts = outcome_facts(config.watch(row.watch), row, row.destination)
    sidecar: Any = None
    # An object judged in place has no sidecar: these facts are its (docs/contract.md, "S3 in place").
    if row.destination and row.disposition is None and row.destination != facts["source"]:
        try:
            with DirCache() as dirs:
                locations, watch = Locations(config, dirs), config.watch(row.watch)
                url, name = _in_quarantine(row, watch, locations)
                sidecar = locations.store(url, watch).read_sidecar(name)
        except (OSError, ValueError, LocationError) as exc:
            sidecar = {"error": f"cannot read the sidecar: {exc}"}
    return {
        "id": row.id, "watch": row.watch, "rel_path": row.rel_path, **facts,
        "disposition": row.disposition, "quarantined_at": iso(row.done_at), "sidecar": sidecar,
        "audit": [{"at": iso(a.at), "action": a.action, "actor": a.actor, "reason": a.reason,
                   "detail": a.detail} for a in journal.audit_trail(row.id)],
    }


def release(config: Config, journal: Journal, file_id: int, *, reason: str,
            to: str | None = None) -> str:
    """Move a quarantined file to its watch's clean location (or `to`); returns where it went.

    `scanwatch quarantine release ID` takes no other argument (docs/contract.md): the audit
    row and `quarantine.released` name who did it, with `reason` (may be empty)."""
    row = _quarantined(journal, file_id)
    target_root = (to if is_s3(to) else os.path.abspath(to)) if to else config.watch(row.watch).clean
    if target_root == IN_PLACE:
        destination, changes = _release_in_place(config, row)
        return _audit_release(journal, row, reason, destination, changes)
    try:
        with DirCache() as dirs:
            locations, watch = Locations(config, dirs), config.watch(row.watch)
            url, name = _in_quarantine(row, watch, locations)
            source, target = locations.source(url, watch), locations.destination(target_root, watch)
            request = MoveRequest(
                file_id=row.id, rel_path=name, dest_rel=target.plan(row.rel_path, taken=True),
                size=row.size or 0, sha256=row.sha256, verify=True, private=False,
                identity=_identity(source, name), etag=_etag(source, name),
                tags={"scanwatch-verdict": "released"})
            transfer(request, source, target)
            destination = target.name(request.dest_rel)
            if not is_s3(target_root):
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(destination, 0o666 & ~umask, follow_symlinks=False)
            locations.store(url, watch).delete(name)  # the sidecar (the file has left)
    except (OSError, LocationError) as exc:
        raise QuarantineError(f"cannot release file {file_id} from {row.destination}: {exc}") from exc
    return _audit_release(journal, row, reason, destination, {})


def _release_in_place(config: Config, row: FileRow) -> tuple[str, dict[str, object]]:
    """Release an object judged in place (`clean: in_place`) where it is: exactly the version
    judged is tagged `scanwatch-verdict=released`, its own tags kept; the journal's changes."""
    watch = config.watch(row.watch)
    try:
        with DirCache() as dirs:
            source = Locations(config, dirs).source(watch.source, watch)
            assert isinstance(source, Tagged)  # in_place needs an s3:// source (config)
            tags = verdict_tags("released", None, iso(row.scanned_at) or "", None)
            rewritten = source.tag_in_place(row.rel_path, row.etag, row.version_id, tags, row.sha256)
    except (OSError, LocationError, ChangedError) as exc:
        raise QuarantineError(f"cannot release file {row.id} at {row.destination}: {exc}") from exc
    # A rewrite (unversioned bucket) is the version judged from now on, as the mover records it.
    changes: dict[str, object] = {} if rewritten is None else {"etag": rewritten.etag}
    if rewritten is not None and rewritten.last_modified is not None:
        changes["last_modified"] = rewritten.last_modified
    return source.name(row.rel_path), changes


def _audit_release(journal: Journal, row: FileRow, reason: str, destination: str,
                   changes: dict[str, object]) -> str:
    """Journal and log a release; returns where the file is now."""
    actor_name = actor()
    journal.audit(row.id, "release", actor_name, reason, f"to {destination}",
                  {**changes, "destination": destination, "disposition": "released"}, time.time())
    log.warning("quarantine.released", file_id=row.id, watch=row.watch, rel_path=row.rel_path,
                destination=destination, actor=actor_name, reason=reason)
    return destination


def delete(config: Config, journal: Journal, file_id: int, *, reason: str) -> None:
    """Delete a quarantined file and its sidecar for good."""
    row = _quarantined(journal, file_id)
    try:
        with DirCache() as dirs:
            locations, watch = Locations(config, dirs), config.watch(row.watch)
            url, name = _in_quarantine(row, watch, locations)
            locations.store(url, watch).delete(name)
    except (OSError, LocationError) as exc:
        raise QuarantineError(f"cannot delete file {file_id} at {row.destination}: {exc}") from exc
    actor_name = actor()
    journal.audit(row.id, "delete", actor_name, reason, None, {"disposition": "deleted"}, time.time())
    log.warning("quarantine.deleted", file_id=row.id, watch=row.watch, rel_path=row.rel_path,
                actor=actor_name, reason=reason)


def _identity(location: Source, name: str) -> Identity | None:
    """The identity of a local quarantined file as it is now (released as it is)."""
    if is_s3(location.url):
        return None
    return Identity.of(os.lstat(location.name(name)))


def _etag(location: Source, name: str) -> str | None:
    """The ETag of a quarantined S3 object as it is now."""
    head = location.head(name) if isinstance(location, ObjectStore) else None
    return None if head is None else str(head["ETag"])
