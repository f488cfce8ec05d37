"""The moving step: carry out the plan journaled with the verdict (daemon/pipeline/planning.py).

A move cut off at any point is finished by the next worker exactly as planned. A name
taken meanwhile is planned again, and the step returns that plan: the loop journals it,
and the next claim of the row moves the file there, so a name is journaled before it is used.
"""

from __future__ import annotations

from daemon.config import IN_PLACE, Config, WatchConfig
from daemon.errors import ChangedError, LocationError, S3UnavailableError, TooManyTagsError, UnsafePathError
from daemon.faults import pause
from daemon.journal import FileRow, RowChanges
from daemon.locations import Destination, Locations, MoveRequest, Source, Tagged, transfer
from daemon.locations.inplace import verdict_tags
from daemon.model import FileState, Reason, Verdict, VerdictKind
from daemon.outcome_facts import iso, outcome_facts
from daemon.pipeline.outcome import Outcome, Outcomes
from daemon.pipeline.planning import DESTINATION_FOR
from daemon.s3url import tag_value

__all__ = ["Mover"]


class Mover:
    """Moves a file where its journaled plan says."""

    def __init__(self, config: Config, outcomes: Outcomes) -> None:
        self.config = config
        self.outcomes = outcomes

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
            placed = self._transfer(request, source, dest, resumed)
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
        if isinstance(placed, str):  # taken meanwhile: this name is journaled before it is used
            return self.outcomes.replanned(dest.name(placed), placed)
        done = self._placed(row, watch, dest, request, verdict, placed)
        return done.but(arrivals=tuple(request.arrivals)) if request.arrivals else done

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
            # Planned and journaled by the loop; the next claim moves it there (`moving`).
            return Outcome({**self.outcomes.verdict(row, failed), "owner": None}, "scan.verdict",
                           {"verdict": VerdictKind.FAILED.value, "reason": Reason.TOO_MANY_TAGS.value},
                           needs_plan=True)
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

    def _transfer(self, request: MoveRequest, source: Source, dest: Destination,
                  resumed: bool) -> bool | str:
        """Move to the planned name: True when another member of a fleet had placed it there
        (docs/fleet.md); the next free name when this one was taken meanwhile."""
        try:
            return transfer(request, source, dest, resumed=resumed)
        except FileExistsError:
            dest_rel = dest.plan(request.rel_path, taken=True, placing=request)
            if dest_rel == request.dest_rel:  # taken, yet planned again: no way forward now
                raise LocationError(f"{dest.url}: no free name for {request.rel_path}") from None
            return dest_rel
