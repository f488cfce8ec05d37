"""The planning stage: a verdict's destination, chosen before anything moves.

A scanning step (or a move that must go elsewhere) returns its verdict as an `Outcome`
that `needs_plan`; the pipeline's loop has the `Planner` add the destination root and the
name below it, and journals both in one transaction, before any move (docs/integrity.md),
so a move cut off at any point is finished by the next worker exactly as planned.
"""

from __future__ import annotations

from daemon.config import IN_PLACE, Config
from daemon.errors import LocationError, UnsafePathError
from daemon.journal import FileRow, RowChanges
from daemon.locations import Locations
from daemon.model import FileState, Reason, Verdict, VerdictKind
from daemon.naming import flat_name
from daemon.pipeline.outcome import Outcome, Outcomes

__all__ = ["DESTINATION_FOR", "Planner"]

DESTINATION_FOR = {VerdictKind.CLEAN: "clean", VerdictKind.INFECTED: "quarantine",
                   VerdictKind.FAILED: "failed"}


class Planner:
    """Plans where a file goes for its verdict."""

    def __init__(self, config: Config, outcomes: Outcomes) -> None:
        self.config = config
        self.outcomes = outcomes

    def planned(self, row: FileRow, outcome: Outcome, locations: Locations) -> Outcome:
        """`outcome` (a verdict) with its destination planned: its event, unless planning failed."""
        plan = self.plan(row, outcome.changes, locations)
        return outcome.but(changes=plan.changes, event=plan.event or outcome.event,
                           fields={**outcome.fields, **plan.fields}, needs_plan=False)

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
