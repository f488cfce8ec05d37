"""`scanwatch scan --rescan-clean WATCH`: scan a watch's clean files again (new signatures).

Every file in the clean destination (a local tree, an S3 prefix, or the source objects
tagged clean where `clean: in_place`) is scanned again with the watch's engines. A file
clean again is left untouched; a newly infected one goes to quarantine like any other
(the same `transfer`, so docs/integrity.md holds: only the scanned inode or object version
moves) or, judged in place, is tagged infected; either way with an audit row.

The journal keeps each rescan (`rescans`) and what it did to each file (`rescan_files`),
so a run cut off is resumed by the next: files done are skipped, and a move journaled
(`moving`, with its plan) before a crash is finished as planned. A finished rescan, or
`fresh`, makes the next run start over.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import structlog

from daemon.config import IN_PLACE, Config, WatchConfig
from daemon.engines import Engine
from daemon.engines.base import ScanRequest
from daemon.errors import ChangedError, ScanwatchError
from daemon.faults import pause
from daemon.fsutil import DirCache, Identity
from daemon.journal import FileRow, Journal
from daemon.locations import SIDECAR_SUFFIX, Listable, Listed, Locations, MoveRequest, Tagged, transfer
from daemon.locations.inplace import verdict_tags
from daemon.model import FileState, Verdict, VerdictKind
from daemon.oneshot import watch_verdict
from daemon.outcome_facts import iso, outcome_facts
from daemon.progress import Progress
from daemon.quarantine import actor
from daemon.refid import build_ref_id
from daemon.s3client import S3Clients
from daemon.watchers.fleet import is_fleet_key
from daemon.watchers.tree import walk

__all__ = ["Moved", "RescanOutcome", "RescanSummary", "rescan_clean"]

log = structlog.get_logger("scanwatch.rescan")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class RescanOutcome(enum.StrEnum):
    """What a rescan did to one file (journal `rescan_files.outcome`)."""

    CLEAN = "clean"  # clean again: left untouched
    INFECTED = "infected"  # moved to quarantine, or tagged infected in place
    FAILED = "failed"  # could not be read or scanned: left where it is
    SKIPPED = "skipped"  # an object in the source not tagged clean (not ours to rescan)
    MOVING = "moving"  # infected, its move journaled (plan) and not yet known done


@dataclass(frozen=True)
class Moved:
    """A newly infected file and where it went."""

    path: str
    threats: tuple[str, ...]
    destination: str


@dataclass
class RescanSummary:
    """The outcome of a whole rescan (earlier interrupted runs included)."""

    rescan_id: int
    total: int
    counts: dict[str, int]
    moved: list[Moved] = field(default_factory=list)


def rescan_clean(config: Config, engines: dict[str, Engine], journal: Journal, watch_name: str,
                 *, stream: TextIO, fresh: bool = False) -> RescanSummary:
    """Rescan the clean files of `watch_name`, resuming an interrupted rescan unless `fresh`."""
    watch = config.watch(watch_name)
    with DirCache() as dirs:
        rescanner = _Rescanner(config, engines, journal, watch, Locations(config, dirs, S3Clients()))
        rescan_id, done = journal.rescan(watch.name, time.time())
        if fresh and done:
            rescanner.finish_moves(rescan_id, done)
            journal.rescan_finish(rescan_id, time.time())
            rescan_id, done = journal.rescan(watch.name, time.time())
        summary = rescanner.run(rescan_id, done, stream)
    if not rescanner.unfinished_moves:  # else the next run finishes them, in this rescan
        journal.rescan_finish(rescan_id, time.time())
    return summary


class _Rescanner:
    """Scans one watch's clean files and moves (or tags) the newly infected ones."""

    def __init__(self, config: Config, engines: dict[str, Engine], journal: Journal, watch: WatchConfig,
                 locations: Locations) -> None:
        self.engines = engines
        self.journal = journal
        self.watch = watch
        self.in_place = IN_PLACE in (watch.clean, watch.quarantine)
        self.clean = locations.source(watch.source if watch.clean == IN_PLACE else watch.clean, watch)
        self.quarantine = None if self.in_place else locations.destination(watch.quarantine, watch)
        self.moved: list[Moved] = []
        self.unfinished_moves = 0  # journaled, cut off by an error that may pass (S3 down...)

    def run(self, rescan_id: int, done: dict[str, tuple[str, int | None, Any]], stream: TextIO
            ) -> RescanSummary:
        """Every file not done yet in this rescan; the whole rescan's counts."""
        self.finish_moves(rescan_id, done)
        names = sorted(self._listing(), key=lambda listed: listed.rel_path)
        counts = {o.value: 0 for o in RescanOutcome if o is not RescanOutcome.MOVING}
        for outcome, _, _ in done.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        # Files done and gone since (moved to quarantine) count as done.
        count = len(done.keys() - {listed.rel_path for listed in names})
        total = len(names) + count
        progress = Progress(stream, "rescan.progress", {"watch": self.watch.name, "rescan_id": rescan_id},
                            total)
        log.info("rescan.started", watch=self.watch.name, rescan_id=rescan_id, files=total,
                 resumed=len(done))
        for listed in names:
            count += 1
            if listed.rel_path not in done:
                outcome = self.one(rescan_id, listed)
                counts[outcome] += 1
                pause(f"rescan.scanned.{count}")
            progress.update(count, counts)
        progress.finish(count, counts)
        log.info("rescan.finished", watch=self.watch.name, rescan_id=rescan_id, **counts)
        return RescanSummary(rescan_id, total, counts, self.moved)

    # -- listing ------------------------------------------------------------------------------

    def _listing(self) -> Iterator[Listed]:
        if isinstance(self.clean, Listable):
            yield from self.clean.listing(_is_ours_to_scan)
            return
        try:
            root_fd = os.open(self.clean.url, _DIR_FLAGS)
        except FileNotFoundError:
            return
        try:
            for rel, _ in walk(root_fd, _is_ours_to_scan, self._unwalkable):
                yield Listed(rel)
        finally:
            os.close(root_fd)

    def _unwalkable(self, rel_dir: str, exc: OSError) -> None:
        log.warning("rescan.unwalkable", watch=self.watch.name, rel_path=rel_dir, error=str(exc))

    # -- one file -----------------------------------------------------------------------------

    def one(self, rescan_id: int, listed: Listed) -> RescanOutcome:
        """Scan one file again; move or tag it if it is infected now."""
        rel = listed.rel_path
        try:
            if self.watch.clean == IN_PLACE and not self._tagged_clean(listed):
                outcome = RescanOutcome.SKIPPED
            else:
                outcome = self._scan(rescan_id, listed)
        except _MoveCutOffError as exc:
            log.error("rescan.failed", watch=self.watch.name, rel_path=rel, error=str(exc.__cause__))
            return RescanOutcome.FAILED  # the plan stays journaled: the next run finishes the move
        except (OSError, ScanwatchError) as exc:
            log.error("rescan.failed", watch=self.watch.name, rel_path=rel, error=str(exc))
            outcome = RescanOutcome.FAILED
        if outcome is not RescanOutcome.INFECTED:  # an infected one was recorded with its audit row
            self.journal.rescan_record(rescan_id, rel, outcome)
        return outcome

    def _tagged_clean(self, listed: Listed) -> bool:
        assert isinstance(self.clean, Tagged)
        return self.clean.tags(listed.rel_path).get("scanwatch-verdict") == VerdictKind.CLEAN.value

    def _scan(self, rescan_id: int, listed: Listed) -> RescanOutcome:
        rel = listed.rel_path
        with self.clean.open_for_scan(listed) as opened:
            content = opened.content()
            ref_id = build_ref_id(self.watch.name, rel, content.sha256)
            request = ScanRequest(self.watch.name, rel, opened.path, content.fd, content.size,
                                  content.sha256, ref_id, original=self.clean.name(rel))
            verdict = watch_verdict(self.engines, self.watch, request)
            if verdict.kind is VerdictKind.CLEAN:
                return RescanOutcome.CLEAN
            if verdict.kind is VerdictKind.FAILED:
                log.error("rescan.failed", watch=self.watch.name, rel_path=rel, reason=verdict.reason)
                return RescanOutcome.FAILED
            # Bytes judged clean before are not: the verdict cache must not say so again
            # (docs/engines.md, "Verdict cache"); the next copy asks the engines.
            self.journal.verdicts.forget(content.sha256, self.watch.engines)
            facts = opened.facts
            row = self._row(rel, opened.path, facts, content.sha256, content.size)
            changes: dict[str, Any] = {
                "verdict": VerdictKind.INFECTED.value, "reason": verdict.reason,
                "threats": list(verdict.threats),
                "sha256": content.sha256, "ref_id": ref_id, "engine_scan_id": verdict.engine_scan_id,
                "scanned_at": time.time(), "done_at": time.time(), "etag": facts.get("etag"),
                "version_id": facts.get("version_id")}
            plan = self._plan(row, rel, verdict, changes, facts, content.size)
            # The intent first: a crash from here on is finished as planned by the next run.
            self.journal.rescan_record(rescan_id, rel, RescanOutcome.MOVING, row.id, plan)
            return self._carry_out_or_keep(rescan_id, rel, row.id, plan)

    def _row(self, rel: str, path: str, facts: Mapping[str, Any], sha256: str, size: int) -> FileRow:
        """The journal row of the file placed at `path` (one is added for a file placed by hand)."""
        row = self.journal.placed_row(self.watch.name, path)
        if row is None:
            now = time.time()
            file_id = self.journal.add_done({
                "watch": self.watch.name, "rel_path": rel, "state": FileState.DONE,
                "verdict": VerdictKind.CLEAN.value, "destination": path, "sha256": sha256, "size": size,
                **facts, "discovered_at": now, "done_at": now, "next_attempt_at": now, "updated_at": now})
            row = self.journal.get(file_id)
        assert row is not None
        return row

    def _plan(self, row: FileRow, rel: str, verdict: Verdict, changes: dict[str, Any],
              facts: Mapping[str, Any], size: int) -> dict[str, Any]:
        """Where the file goes and what its row says after (journaled before anything moves)."""
        threat = verdict.threats[0] if verdict.threats else None
        if self.quarantine is None:
            tags = verdict_tags(VerdictKind.INFECTED.value, verdict.reason, iso(changes["scanned_at"]) or "",
                                threat)
            return {"in_place": True, "tags": tags,
                    "changes": {**changes, "dest_root": IN_PLACE, "dest_rel": rel}}
        dest_rel = self.quarantine.plan(rel)
        columns = ("dev", "inode", "size", "mtime_ns", "ctime_ns")
        identity = [facts[k] for k in columns] if "inode" in facts else None
        return {"in_place": False, "size": size, "identity": identity,
                "changes": {**changes, "dest_root": self.watch.quarantine, "dest_rel": dest_rel,
                            "destination": self.quarantine.name(dest_rel)}}

    # -- moving -------------------------------------------------------------------------------

    def finish_moves(self, rescan_id: int, done: dict[str, tuple[str, int | None, Any]]) -> None:
        """Finish the moves an interrupted run journaled and did not record as done."""
        for rel, (outcome, file_id, plan) in list(done.items()):
            if outcome == RescanOutcome.MOVING and file_id is not None and plan is not None:
                try:
                    outcome = self._carry_out_or_keep(rescan_id, rel, file_id, plan, resumed=True)
                except _MoveCutOffError as exc:
                    log.error("rescan.failed", watch=self.watch.name, rel_path=rel, error=str(exc.__cause__))
                    outcome = RescanOutcome.FAILED
                except (OSError, ScanwatchError) as exc:
                    log.error("rescan.failed", watch=self.watch.name, rel_path=rel, error=str(exc))
                    self.journal.rescan_record(rescan_id, rel, RescanOutcome.FAILED, file_id)
                    outcome = RescanOutcome.FAILED
                done[rel] = (outcome, file_id, None)

    def _carry_out_or_keep(self, rescan_id: int, rel: str, file_id: int, plan: dict[str, Any], *,
                           resumed: bool = False) -> RescanOutcome:
        """`carry_out`; a move cut off by an error that may pass keeps its plan (_MoveCutOffError)."""
        try:
            return self.carry_out(rescan_id, rel, file_id, plan, resumed=resumed)
        except (ChangedError, FileNotFoundError):
            raise  # nothing moved: the file is not the scanned one, or gone
        except (OSError, ScanwatchError) as exc:
            self.unfinished_moves += 1
            raise _MoveCutOffError(rel) from exc

    def carry_out(self, rescan_id: int, rel: str, file_id: int, plan: dict[str, Any], *,
                  resumed: bool = False) -> RescanOutcome:
        """Move (or tag) the file as planned, then journal its audit row and outcome at once."""
        changes = dict(plan["changes"])
        if plan["in_place"]:
            destination = self._tag(rel, changes, plan["tags"], resumed)
        else:
            destination = self._move(rel, file_id, changes, plan, resumed)
        changes["destination"] = destination
        threats = ", ".join(changes["threats"])
        self.journal.rescan_audited(
            rescan_id, rel, RescanOutcome.INFECTED, file_id,
            ("rescan", actor(), f"infected on rescan {rescan_id}: {threats}", f"to {destination}"),
            changes, time.time())
        self.moved.append(Moved(self.clean.name(rel), tuple(changes["threats"]), destination))
        log.warning("rescan.quarantined", watch=self.watch.name, file_id=file_id, rel_path=rel,
                    threats=changes["threats"], destination=destination, rescan_id=rescan_id)
        return RescanOutcome.INFECTED

    def _move(self, rel: str, file_id: int, changes: dict[str, Any], plan: dict[str, Any],
              resumed: bool) -> str:
        assert self.quarantine is not None
        identity = Identity(*plan["identity"]) if plan["identity"] else None
        request = MoveRequest(
            file_id=file_id, rel_path=rel, dest_rel=changes["dest_rel"], size=plan["size"],
            sha256=changes["sha256"], verify=False, private=True, identity=identity,
            etag=changes["etag"], version_id=changes["version_id"],
            tags={"scanwatch-verdict": VerdictKind.INFECTED.value})
        # ChangedError: not the scanned bytes any more; nothing moved, the file is left as it is.
        transfer(request, self.clean, self.quarantine, resumed=resumed)
        destination = self.quarantine.name(request.dest_rel)
        row = self.journal.get(file_id)
        assert row is not None
        self.quarantine.write_sidecar(request.dest_rel, outcome_facts(self.watch, row.updated(
            {**changes, "destination": destination}), destination))  # type: ignore[typeddict-item]
        return destination

    def _tag(self, rel: str, changes: dict[str, Any], tags: dict[str, str], resumed: bool) -> str:
        assert isinstance(self.clean, Tagged)
        try:
            rewritten = self.clean.tag_in_place(rel, changes["etag"], changes["version_id"], tags,
                                                changes.get("sha256"))
        except ChangedError:
            if not (resumed and self._tagged_as(rel, tags)):
                raise
            rewritten = None  # tagged before the crash (the rewrite gave it a new version)
        if rewritten:
            changes["etag"], changes["last_modified"] = rewritten
        return self.clean.name(rel)

    def _tagged_as(self, rel: str, tags: Mapping[str, str]) -> bool:
        assert isinstance(self.clean, Tagged)
        have = self.clean.tags(rel)
        return all(have.get(k) == v for k, v in tags.items())


class _MoveCutOffError(Exception):
    """A journaled move failed part-way for a reason that may pass; the next run finishes it."""


def _is_ours_to_scan(rel_path: str) -> bool:
    """Files placed in clean; not sidecars nor our temp and capture names, nor `.scanwatch/`."""
    name = rel_path.rpartition("/")[2]
    return not (name.endswith(SIDECAR_SUFFIX) or name.startswith(".scanwatch-") or is_fleet_key(rel_path))
