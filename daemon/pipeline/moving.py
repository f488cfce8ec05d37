"""The moving step: plan the destination when the verdict is known, then carry out that plan.

The plan (destination root and the name below it) is journaled with the verdict, before
anything moves, so a move cut off at any point is finished by the next worker exactly as
planned; a name taken meanwhile is planned again and journaled before it is used.
"""

from __future__ import annotations

import dataclasses

from daemon.config import IN_PLACE, Config, WatchConfig
from daemon.errors import ChangedError, LocationError, S3UnavailableError, TooManyTagsError, UnsafePathError
from daemon.faults import pause
from daemon.journal import FileRow, Journal, RowChanges
from daemon.locations import Destination, Locations, MoveRequest, Source, Tagged, transfer
from daemon.locations.inplace import verdict_tags
from daemon.model import FileState, Reason, Verdict, VerdictKind
from daemon.naming import flat_name
from daemon.outcome_facts import iso, outcome_facts
from daemon.pipeline.outcome import Outcome, Outcomes
from daemon.s3url import tag_value

__all__ = ["DESTINATION_FOR", "Mover"]

DESTINATION_FOR = {VerdictKind.CLEAN: "clean", VerdictKind.INFECTED: "quarantine",
                   VerdictKind.FAILED: "failed"}
_MAX_REPLANS = 100


class Mover:
    """Plans where a file goes for its verdict, and moves it there."""

    def __init__(self, config: Config, journal: Journal, outcomes: Outcomes) -> None:
        self.config = config
        self.journal = journal
        self.outcomes = outcomes

    # -- planning ---------------------------------------------------------------------------

    def plan(self, row: FileRow, changes: RowChanges, locations: Locations) -> Outcome:
        """`changes` (a verdict) plus the destination chosen now, so a crash mid-move can be finished."""
        verdict = VerdictKind(str(changes.get("verdict", row.verdict)))
        # A key or name that cannot be a path or key there goes to `failed` under one flat, safe name.
        is_flat = changes.get("reason", row.reason) in (Reason.UNSAFE_KEY, Reason.UNSAFE_NAME)
        rel_path = flat_name(row.rel_path) if is_flat else row.rel_path
        watch = self.config.watch(row.watch)
        root = watch.destinations[DESTINATION_FOR[verdict]]
        if root == IN_PLACE:  # the object stays at its key: no name to choose, none to escape
            source = locations.source(watch.source, watch)
            return Outcome({**changes, "destination": source.name(row.rel_path),
                            "dest_root": IN_PLACE, "dest_rel": row.rel_path})
        try:
            dest = locations.destination(root, watch)
            dest_rel = dest.plan(rel_path)
        except UnsafePathError as exc:
            if is_flat:
                return self.outcomes.move_failed(row, exc, {**changes, "state": FileState.VERDICT})
            # Kept: the facts, and the threats of an infected file its quarantine cannot name.
            threats = changes.get("threats", row.threats) or []
            failed = Verdict.failed(Reason.UNSAFE_NAME, raw={"error": str(exc)}, threats=tuple(threats))
            return self.plan(row, {**changes, **self.outcomes.verdict(row, failed)}, locations)
        except (OSError, LocationError) as exc:
            return self.outcomes.move_failed(row, exc, {**changes, "state": FileState.VERDICT})
        return Outcome({**changes, "destination": dest.name(dest_rel), "dest_root": root,
                        "dest_rel": dest_rel})

    def fail(self, row: FileRow, reason: Reason, error: str, locations: Locations) -> Outcome:
        """A failed verdict without asking the engine (unreadable, an unsafe name...), planned."""
        return self.plan(row, self.outcomes.verdict(row, Verdict.failed(reason, raw={"error": error})),
                         locations)

    # -- moving -----------------------------------------------------------------------------

    def move(self, row: FileRow, locations: Locations, *, resumed: bool = False) -> Outcome:
        """Carry out the row's plan; `resumed`: a move of it may have been cut off, finish it."""
        pause("move.start")
        watch = self.config.watch(row.watch)
        source = locations.source(watch.source, watch)
        if row.dest_root == IN_PLACE and isinstance(source, Tagged):
            return self._in_place(row, watch, source, locations)
        try:
            identity = row.identity or (source.identity_now(row.rel_path) if row.etag is None else None)
        except FileNotFoundError:
            return self.outcomes.gone()
        except (OSError, LocationError) as exc:
            return self.outcomes.move_failed(row, exc)
        verdict = VerdictKind(str(row.verdict))
        dest, dest_rel = self._planned(row, watch, locations, verdict)
        request = MoveRequest(
            file_id=row.id, rel_path=row.rel_path, dest_rel=dest_rel,
            size=row.size if row.size is not None else identity.size if identity else 0,
            sha256=row.sha256, verify=verdict is VerdictKind.CLEAN, private=verdict is VerdictKind.INFECTED,
            identity=identity, etag=row.etag, version_id=row.version_id, last_modified=row.last_modified,
            snapshot=row.snapshot,
            tags={"scanwatch-verdict": verdict.value,
                  "scanwatch-reason": tag_value(row.reason or "")})
        try:
            request, already_placed = self._transfer(row, request, source, dest, resumed)
        except ChangedError as exc:
            return self.outcomes.changed(str(exc), settles=source.settles)
        except FileNotFoundError:
            return self.outcomes.gone()
        except UnsafePathError as exc:
            if exc.reason is not Reason.PERMISSION_DENIED:
                return self.outcomes.move_failed(row, exc)
            # Nothing was placed: scanned anew once it can be taken out (docs/integrity.md).
            held = self.outcomes.held(exc.reason, str(exc), row)
            return Outcome({**self.outcomes.changed("", settles=True).changes, **held.changes},
                           held.event, held.fields)
        except S3UnavailableError as exc:
            return self.outcomes.move_failed(row, exc, attempts=row.move_attempts)
        except (OSError, LocationError) as exc:
            return self.outcomes.move_failed(row, exc)
        placed = self._placed(row, watch, dest, request, verdict, already_placed)
        return dataclasses.replace(placed, arrivals=tuple(request.arrivals))

    def _placed(self, row: FileRow, watch: WatchConfig, dest: Destination, request: MoveRequest,
                verdict: VerdictKind, already_placed: bool) -> Outcome:
        """The sidecar written beside a file that is not clean: done."""
        destination = dest.name(request.dest_rel)
        if verdict is not VerdictKind.CLEAN:
            try:
                dest.write_sidecar(request.dest_rel, outcome_facts(watch, row, destination))
            except (OSError, LocationError) as exc:
                # The file is in place: stay `moving`, so the retry finishes this move.
                return self.outcomes.move_failed(row, exc, {"state": FileState.MOVING})
        return self.outcomes.placed(row, destination, verdict, already_placed=already_placed)

    def _in_place(self, row: FileRow, watch: WatchConfig, source: Tagged,
                  locations: Locations) -> Outcome:
        """Tag exactly the scanned version where it is (docs/contract.md, "S3 in place")."""
        verdict = VerdictKind(str(row.verdict))
        threat = row.threats[0] if verdict is VerdictKind.INFECTED and row.threats else None
        tags = verdict_tags(verdict.value, row.reason, iso(row.scanned_at) or "", threat)
        try:
            rewritten = source.tag_in_place(row.rel_path, row.etag, row.version_id, tags, row.sha256)
        except ChangedError as exc:
            return self.outcomes.changed(str(exc), settles=source.settles)
        except FileNotFoundError:
            return self.outcomes.gone()
        except TooManyTagsError as exc:
            if watch.failed == IN_PLACE:  # nowhere else to put it: reported and held
                return self.outcomes.held(Reason.TOO_MANY_TAGS, str(exc))
            failed = Verdict.failed(Reason.TOO_MANY_TAGS, raw={"error": str(exc)},
                                    threats=tuple(row.threats or ()))
            # Planned and journaled now; the next claim moves it there (`moving`).
            replanned = self.plan(row, {**self.outcomes.verdict(row, failed), "owner": None}, locations)
            return Outcome(replanned.changes, "scan.verdict", {"verdict": VerdictKind.FAILED.value,
                                                               "reason": Reason.TOO_MANY_TAGS.value})
        except S3UnavailableError as exc:
            return self.outcomes.move_failed(row, exc, attempts=row.move_attempts)
        except (OSError, LocationError) as exc:
            return self.outcomes.move_failed(row, exc)
        placed = self.outcomes.placed(row, source.name(row.rel_path), verdict)
        # A rewrite gives the object a new LastModified (maybe ETag): the version judged.
        changes: RowChanges = {**placed.changes, "etag": rewritten.etag} if rewritten else placed.changes
        if rewritten and rewritten.last_modified is not None:  # unknown: the listing finds it anew
            changes["last_modified"] = rewritten.last_modified
        return Outcome(changes, placed.event, placed.fields)

    def _planned(self, row: FileRow, watch: WatchConfig, locations: Locations, verdict: VerdictKind
                 ) -> tuple[Destination, str]:
        """The planned destination and name (rows planned before plans were journaled whole:
        the verdict's destination, and the name recorded under it)."""
        if row.dest_root is not None and row.dest_rel is not None:
            return locations.destination(row.dest_root, watch), row.dest_rel
        dest = locations.destination(watch.destinations[DESTINATION_FOR[verdict]], watch)
        assert row.destination is not None
        return dest, row.destination.removeprefix(dest.name(""))

    def _transfer(self, row: FileRow, request: MoveRequest, source: Source, dest: Destination,
                  resumed: bool) -> tuple[MoveRequest, bool]:
        """Move to the planned name; if it was taken meanwhile, journal a new plan and retry."""
        for _ in range(_MAX_REPLANS):
            try:
                return request, transfer(request, source, dest, resumed=resumed)
            except FileExistsError:
                dest_rel = dest.plan(row.rel_path, taken=True, placing=request)
                self.journal.apply([(row.id, {"destination": dest.name(dest_rel), "dest_rel": dest_rel})])
                request = dataclasses.replace(request, dest_rel=dest_rel)
                resumed = False
        raise LocationError(f"{dest.url}: no free name for {row.rel_path}")
