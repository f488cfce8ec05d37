"""`scanwatch status`: counts by watch, state and outcome, read straight from the journal."""

from __future__ import annotations

import time
from typing import Any

from daemon.config import Config, HttpEngineConfig
from daemon.engines._pacing import read_rates
from daemon.journal import FleetMember, Journal
from daemon.model import FileState
from daemon.naming import printable

__all__ = ["collect", "render"]

# docs/fleet.md: a message that is not an S3 event comes back until it is moved away.
_REDRIVE_ADVICE = ("give the queue a redrive policy (a dead-letter queue): a message that cannot "
                   "be read is left on it and comes back at every visibility timeout until moved there")


def collect(config: Config, journal: Journal) -> dict[str, Any]:
    """Status as a JSON-ready dict: per watch counts, oldest pending, last error; engine health."""
    now = time.time()
    watches: dict[str, dict[str, Any]] = {
        w.name: _watch_entry(w.engine_label, engines=list(w.engines)) for w in config.watches}
    for watch, state, verdict, reason, count in journal.counts():
        # A watch the journal knows but the config no longer has: no engine.
        entry = watches.setdefault(watch, _watch_entry(None))
        entry["states"][state] = entry["states"].get(state, 0) + count
        if state == FileState.DONE and verdict:
            entry["outcomes"][verdict] = entry["outcomes"].get(verdict, 0) + count
        if state == FileState.HELD and reason:
            entry["skipped"][reason] = entry["skipped"].get(reason, 0) + count
    for watch, since in journal.oldest_pending().items():
        watches[watch]["oldest_pending_s"] = round(now - since, 1)
        watches[watch]["oldest_pending_file"] = _oldest_pending_file(journal, watch)
    active = [s for s in FileState if s not in (FileState.DONE, FileState.GONE)]
    for row in journal.rows(has_error=True, states=active, order="updated_at", newest_first=True,
                            limit=1000):
        entry = watches[row.watch]
        entry["last_error"] = entry["last_error"] or row.last_error
        entry["move_failures"] += row.state is FileState.VERDICT
    fleet = journal.fleet()
    for w in config.watches:
        if w.fleet:
            watches[w.name]["fleet"] = _fleet_status(fleet.get(w.name), now)
        if w.events is not None:
            watches[w.name]["events"] = {"queue": w.events.sqs_queue_url, "advice": _REDRIVE_ADVICE}
    health = journal.engine_health()
    rates = read_rates(config.state_dir)
    engines = {name: {"type": cfg.type, "healthy": health.get(name, (None,))[0],
                      "detail": health.get(name, (None, None))[1],
                      **_pacing(cfg, rates.get(name))}
               for name, cfg in config.engines.items()}
    cache = journal.verdicts.stats()
    for name, cfg in config.engines.items():
        hits, misses = cache.get(name, (0, 0))
        engines[name]["cache"] = {"enabled": cfg.cache.enabled, "hits": hits, "misses": misses,
                                  "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None}
    return {"watches": watches, "engines": engines}


def _watch_entry(engine: str | None, **more: Any) -> dict[str, Any]:
    """A watch's status before its rows are counted."""
    return {"engine": engine, **more, "states": {}, "outcomes": {}, "skipped": {},
            "oldest_pending_s": None, "oldest_pending_file": None, "move_failures": 0,
            "last_error": None}


def _oldest_pending_file(journal: Journal, watch: str) -> dict[str, Any] | None:
    """The watch's oldest file not yet done, with its external reference ID (null until hashed):
    the ID an engine's console knows it by (docs/contract.md, "External reference IDs")."""
    pending = [s for s in FileState if s not in (FileState.DONE, FileState.GONE, FileState.HELD)]
    rows = journal.rows(watch=watch, states=pending, limit=1)
    if not rows:
        return None
    return {"id": rows[0].id, "rel_path": rows[0].rel_path, "state": rows[0].state.value,
            "external_reference_id": rows[0].ref_id}


def _pacing(cfg: object, rate: float | None) -> dict[str, Any]:
    """An HTTP engine's request rate now and its ceiling (docs/engines.md#rate-limits)."""
    if not isinstance(cfg, HttpEngineConfig):
        return {}
    rate = cfg.rate_limit if rate is None else min(rate, cfg.rate_limit)
    return {"request_rate_per_minute": round(rate, 2), "rate_limit": cfg.rate_limit}


def _fleet_status(member: FleetMember | None, now: float) -> dict[str, Any]:
    """A fleet watch as this daemon last recorded it (docs/fleet.md)."""
    if member is None:  # not run since it became a fleet watch
        return {"member": True, "holds_lease": False, "messages_held": 0, "recorded_s_ago": None}
    return {"member": True, "holder": member.holder, "holds_lease": member.holds_lease(now),
            "lease_until": member.lease_until if member.holds_lease(now) else None,
            "messages_held": member.messages_held, "recorded_s_ago": round(now - member.updated_at, 1)}


def render(status: dict[str, Any]) -> str:
    """A table for people."""
    lines = [f"{'WATCH':<16} {'ENGINE':<10} {'PENDING':>8} {'CLEAN':>7} {'INFECTED':>8} "
             f"{'FAILED':>7} {'SKIPPED':>7}  OLDEST PENDING"]
    for name, w in status["watches"].items():
        pending = sum(c for s, c in w["states"].items() if s not in ("done", "gone", "held"))
        oldest = "-" if w["oldest_pending_s"] is None else f"{w['oldest_pending_s']:.0f}s"
        lines.append(f"{name:<16} {w['engine'] or '-':<10} {pending:>8} "
                     f"{w['outcomes'].get('clean', 0):>7} {w['outcomes'].get('infected', 0):>8} "
                     f"{w['outcomes'].get('failed', 0):>7} {sum(w['skipped'].values()):>7}  {oldest}")
        if events := w.get("events"):
            lines.append(f"  events: {events['advice']}")
        if fleet := w.get("fleet"):
            lease = ("holds the listing lease" if fleet["holds_lease"]
                     else "another member holds the listing lease (or none yet)")
            lines.append(f"  fleet member: {lease}; {fleet['messages_held']} messages held")
        if oldest_file := w.get("oldest_pending_file"):
            ref_id = oldest_file["external_reference_id"] or "not hashed yet"
            lines.append(f"  oldest pending: {printable(oldest_file['rel_path'])} "
                         f"({oldest_file['state']}; {ref_id})")
        if w["move_failures"]:
            lines.append(f"  {w['move_failures']} moves failing, will retry")
        if w["last_error"]:
            lines.append(f"  last error: {printable(w['last_error'])}")
        if states := ", ".join(f"{s}={c}" for s, c in sorted(w["states"].items())):
            lines.append(f"  states: {states}")
    lines.append("")
    lines.append(f"{'ENGINE':<16} {'TYPE':<18} {'CACHE HITS':<22} HEALTH")
    for name, e in status["engines"].items():
        health = {True: "ok", False: "DOWN", None: "unknown"}[e["healthy"]]
        detail = f" ({e['detail']})" if e["detail"] else ""
        if "request_rate_per_minute" in e:
            detail += f"; {e['request_rate_per_minute']:g}/{e['rate_limit']:g} requests a minute"
        lines.append(f"{name:<16} {e['type']:<18} {_hit_rate(e['cache']):<22} {health}{detail}")
    return "\n".join(lines)


def _hit_rate(cache: dict[str, Any]) -> str:
    """`42% (420 of 1000)`, `off`, or `-` before any lookup."""
    if not cache["enabled"]:
        return "off"
    if cache["hit_rate"] is None:
        return "-"
    return f"{cache['hit_rate']:.0%} ({cache['hits']} of {cache['hits'] + cache['misses']})"
