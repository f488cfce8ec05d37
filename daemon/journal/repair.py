"""`scanwatch journal check|rebuild`: find a damaged journal, and rebuild one from the disk.

Rebuild moves the journal and its `-wal`/`-shm` aside under a timestamped name (never
deleting them; the kept verdicts' file too if it is damaged) and starts a fresh journal
with one `done` row per file found in each watch's local clean, quarantine and failed
folders: quarantined and failed files take their facts from their `<name>.scanwatch.json`
sidecars (docs/dropfolder.md), clean files from `lstat` (not hashed: clean folders can hold
terabytes, and nothing reads a done row's sha256 but `quarantine`). Files still in a source
are not touched: the daemon's start-up sweep finds them and scans them. S3 destinations
are not rebuilt.

A running daemon holds `state_dir/scanwatch.lock` shared; rebuild takes it exclusively,
so the two never overlap.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.config import Config, WatchConfig
from daemon.errors import JournalDamagedError, JournalError, LocationError
from daemon.fsutil import DirCache
from daemon.journal import VERDICTS_FILE, open_journal, state_dir_error
from daemon.journal.cache import VerdictStore
from daemon.locations import SIDECAR_SUFFIX, LocalLocation
from daemon.model import FileState, VerdictKind
from daemon.s3url import is_s3
from daemon.timefmt import parse_iso
from daemon.watchers.tree import walk

__all__ = ["Rebuilt", "check", "hold_daemon_lock", "rebuild"]

LOCK_NAME = "scanwatch.lock"
_VERDICT_OF = {"clean": VerdictKind.CLEAN, "quarantine": VerdictKind.INFECTED,
               "failed": VerdictKind.FAILED}


@dataclass
class Rebuilt:
    """What a rebuild did."""

    journal: Path
    aside: list[Path] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # "watch destination" → rows
    skipped: list[str] = field(default_factory=list)  # S3 destinations, not rebuilt


def _lock(state_dir: Path, how: int) -> int:
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise state_dir_error(state_dir, exc) from exc
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    return fd


def hold_daemon_lock(state_dir: Path) -> int:
    """Hold the daemon's shared lock on `state_dir` for the life of the process."""
    try:
        return _lock(state_dir, fcntl.LOCK_SH)
    except BlockingIOError:
        raise JournalError(f"a journal rebuild is running in state_dir {state_dir}; "
                           "start the daemon when it has finished") from None


def check(state_dir: Path) -> str | None:
    """What is wrong with the journal under `state_dir`, or None when it is sound.

    Raises `JournalError` when state_dir itself cannot be used.
    """
    try:
        journal = open_journal(state_dir)
    except JournalDamagedError as exc:
        return str(exc)
    try:
        problem = journal.quick_check()
    finally:
        journal.close()
    return None if problem is None else f"the journal {journal.path} is damaged: {problem}"


def rebuild(config: Config, now: float | None = None) -> Rebuilt:
    """Move the journal aside and rebuild history from the destinations; safe to repeat."""
    now = time.time() if now is None else now
    try:
        lock_fd = _lock(config.state_dir, fcntl.LOCK_EX)
    except BlockingIOError:
        raise JournalError(f"a daemon (or another rebuild) is using state_dir {config.state_dir}; "
                           "stop it first (systemctl stop scanwatch)") from None
    try:
        path = config.state_dir / "journal.sqlite3"
        done = Rebuilt(path, aside=_move_aside(path, now))
        # The kept verdicts stay unless damaged too (then the cache starts empty).
        if _is_damaged(verdicts := config.state_dir / VERDICTS_FILE):
            done.aside += _move_aside(verdicts, now)
        journal = open_journal(config.state_dir)
        try:
            seen: set[str] = set()
            for watch in config.watches:
                for key, root in watch.destinations.items():
                    if is_s3(root):
                        done.skipped.append(root)
                    elif os.path.realpath(root) not in seen:
                        seen.add(os.path.realpath(root))
                        done.rows[f"{watch.name} {key}"] = journal.restore(
                            _rows(watch, key, root, now))
        finally:
            journal.close()
    finally:
        os.close(lock_fd)
    return done


def _is_damaged(verdicts: Path) -> bool:
    try:
        store = VerdictStore(verdicts)
    except JournalDamagedError:
        return True
    try:
        return store.quick_check() is not None
    finally:
        store.close()


def _move_aside(path: Path, now: float) -> list[Path]:
    """Rename a database file (the journal, the kept verdicts) and its WAL files to
    `<name>.damaged-<UTC time>[-wal|-shm]`."""
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
    base = Path(f"{path}.damaged-{stamp}")
    n = 1
    while any(Path(f"{base}{s}").exists() for s in ("", "-wal", "-shm")):
        base, n = Path(f"{path}.damaged-{stamp}-{n}"), n + 1
    moved = []
    # The WAL first: a WAL left beside a fresh journal would be replayed into it.
    for suffix in ("-wal", "-shm", ""):
        try:
            os.rename(f"{path}{suffix}", f"{base}{suffix}")
        except FileNotFoundError:
            continue
        moved.append(Path(f"{base}{suffix}"))
    return moved


def _rows(watch: WatchConfig, key: str, root: str, now: float) -> Iterator[dict[str, object]]:
    """One done row per file in one local destination (sidecars and temp files left out)."""
    if not os.path.isdir(root):
        return
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with DirCache() as dirs:
            location = LocalLocation(root, dirs)
            for rel, _ in walk(root_fd, lambda rel: True, lambda rel, exc: None):
                name = rel.rpartition("/")[2]
                if name.endswith(SIDECAR_SUFFIX) or name.startswith(".scanwatch-"):
                    continue
                try:
                    st = os.lstat(os.path.join(root, rel))
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    facts = {} if key == "clean" else _sidecar(location, rel)
                    yield _row(watch, _VERDICT_OF[key], os.path.join(root, rel), rel, st, facts, now)
    finally:
        os.close(root_fd)


def _sidecar(location: LocalLocation, rel: str) -> dict[str, Any]:
    try:
        facts = location.read_sidecar(rel)
    except (OSError, ValueError, LocationError) as exc:
        return {"sidecar_error": str(exc)}
    return facts if isinstance(facts, dict) else {"sidecar_error": "not a JSON object"}


def _row(watch: WatchConfig, verdict: VerdictKind, path: str, rel: str, st: os.stat_result,
         facts: Mapping[str, Any], now: float) -> dict[str, object]:
    prefix = watch.source.rstrip("/") + "/"
    source = str(facts.get("source") or "")
    threats = facts.get("threats")
    return {
        "watch": watch.name, "state": FileState.DONE,
        "rel_path": source.removeprefix(prefix) if source.startswith(prefix) else rel,
        "verdict": str(facts.get("verdict") or verdict), "reason": facts.get("reason"),
        "threats": threats if isinstance(threats, list) else [],
        "engine": facts.get("engine"), "engine_scan_id": facts.get("engine_scan_id"),
        "ref_id": facts.get("external_reference_id"), "sha256": facts.get("sha256"),
        "size": facts.get("size") or st.st_size, "dev": st.st_dev, "inode": st.st_ino,
        "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "destination": path,
        "raw_result": {"rebuilt_at": now, **({"sidecar_error": facts["sidecar_error"]}
                                             if "sidecar_error" in facts else {})},
        "discovered_at": parse_iso(facts.get("detected_at")) or st.st_ctime,
        "scanned_at": parse_iso(facts.get("scanned_at")),
        "done_at": st.st_ctime,  # the rename into the destination set it
        "next_attempt_at": now, "updated_at": now,
    }
