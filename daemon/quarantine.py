"""`scanwatch quarantine`: list, show, release and delete quarantined files, audited."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import time
from typing import Any

import structlog

from daemon.config import Config
from daemon.errors import LocationError, ScanwatchError
from daemon.fsutil import DirCache, Identity, open_dir
from daemon.journal import FileRow, Journal
from daemon.model import FileState, VerdictKind
from daemon.mover import MoveRequest, move, plan
from daemon.pipeline import iso

__all__ = ["QuarantineError", "delete", "describe", "list_quarantined", "release"]

log = structlog.get_logger("scanwatch.quarantine")


class QuarantineError(ScanwatchError):
    """A quarantine command cannot be carried out."""


def _actor() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


def list_quarantined(journal: Journal, *, watch: str | None = None, since: float | None = None,
                     threat: str | None = None) -> list[FileRow]:
    """Files in quarantine now (not released or deleted), newest last."""
    where = ["state = 'done'", "verdict = 'infected'", "disposition IS NULL"]
    params: list[object] = []
    if watch:
        where.append("watch = ?")
        params.append(watch)
    if since is not None:
        where.append("done_at >= ?")
        params.append(since)
    if threat:
        where.append("threats LIKE ?")
        params.append(f"%{threat}%")
    return journal.select(" AND ".join(where), params, order="done_at", limit=100_000)


def _quarantined(journal: Journal, file_id: int) -> FileRow:
    row = journal.get(file_id)
    if row is None or row.verdict != VerdictKind.INFECTED or row.state is not FileState.DONE:
        raise QuarantineError(f"no quarantined file with id {file_id}")
    if row.disposition is not None:
        raise QuarantineError(f"file {file_id} was already {row.disposition}")
    return row


def describe(journal: Journal, file_id: int) -> dict[str, Any]:
    """Journal facts, sidecar and audit trail of one quarantined (or once quarantined) file."""
    row = journal.get(file_id)
    if row is None or row.verdict != VerdictKind.INFECTED:
        raise QuarantineError(f"no quarantined file with id {file_id}")
    sidecar: Any = None
    if row.destination and row.disposition is None:
        try:
            with open(f"{row.destination}.scanwatch.json", encoding="utf-8") as f:
                sidecar = json.load(f)
        except (OSError, ValueError) as exc:
            sidecar = {"error": f"cannot read the sidecar: {exc}"}
    return {
        "id": row.id, "watch": row.watch, "rel_path": row.rel_path,
        "destination": row.destination, "disposition": row.disposition,
        "threats": row.threats or [], "reason": row.reason, "sha256": row.sha256,
        "size": row.size, "external_reference_id": row.ref_id, "engine": row.engine,
        "engine_scan_id": row.engine_scan_id, "detected_at": iso(row.discovered_at),
        "scanned_at": iso(row.scanned_at), "quarantined_at": iso(row.done_at),
        "sidecar": sidecar,
        "audit": [{"at": iso(a.at), "action": a.action, "actor": a.actor, "reason": a.reason,
                   "detail": a.detail} for a in journal.audit_trail(row.id)],
    }


def release(config: Config, journal: Journal, file_id: int, *, reason: str,
            to: str | None = None, force: bool = False) -> str:
    """Move a quarantined file to its watch's clean location (or `to`); returns where it went."""
    row = _quarantined(journal, file_id)
    if not force:
        raise QuarantineError(f"file {file_id} was found infected ({', '.join(row.threats or [])}); "
                              "releasing it needs --force")
    assert row.destination is not None
    target_root = os.path.abspath(to) if to else config.watch(row.watch).clean
    src_root, name = os.path.split(row.destination)
    try:
        st = os.lstat(row.destination)
        dest_rel = plan(target_root, row.rel_path)
        with DirCache() as dirs:
            move(MoveRequest(file_id=row.id, src_root=src_root, rel_path=name,
                             dest_root=target_root, dest_rel=dest_rel, identity=Identity.of(st),
                             sha256=row.sha256, private=False), dirs)
    except (OSError, LocationError) as exc:
        raise QuarantineError(f"cannot release file {file_id} from {row.destination}: {exc}") from exc
    destination = os.path.join(target_root, dest_rel)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(destination, 0o666 & ~umask, follow_symlinks=False)
    _remove_sidecar(row.destination)
    actor = _actor()
    journal.audit(row.id, "release", actor, reason, f"to {destination}",
                  {"destination": destination, "disposition": "released"}, time.time())
    log.warning("quarantine.released", file_id=row.id, watch=row.watch, rel_path=row.rel_path,
                destination=destination, actor=actor, reason=reason)
    return destination


def delete(journal: Journal, file_id: int, *, reason: str) -> None:
    """Delete a quarantined file and its sidecar for good."""
    row = _quarantined(journal, file_id)
    assert row.destination is not None
    directory, name = os.path.split(row.destination)
    dir_fd = open_dir(directory, [])
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    finally:
        os.close(dir_fd)
    _remove_sidecar(row.destination)
    actor = _actor()
    journal.audit(row.id, "delete", actor, reason, None, {"disposition": "deleted"}, time.time())
    log.warning("quarantine.deleted", file_id=row.id, watch=row.watch, rel_path=row.rel_path,
                actor=actor, reason=reason)


def _remove_sidecar(destination: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{destination}.scanwatch.json")
