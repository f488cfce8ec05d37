"""The verdict cache as the scanning step uses it (docs/engines.md, "Verdict cache").

Before an engine is asked about some bytes, its verdict on the same sha256 under the same
signatures is looked up (the journal, then, on a fleet watch with `cache.shared`, the
bucket: docs/fleet.md); a hit is the verdict, no request is made. On a miss the row takes
the bytes' flight; while another row of the same bytes holds it, this one waits, scheduled
in the journal, and is made due when the answer lands. The answer (clean or infected,
never failed) is kept beside the journal and, shared, written once to the bucket.

Off for an engine with `cache: {enabled: false}`, for a watch with an `archivepwd` (a
verdict reached without the password must not stand for one reached with it, nor the
reverse), and for a scan whose signatures cannot be had (the engine's error then comes
from the scan itself).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from daemon.config import Config, WatchConfig
from daemon.engines.base import Engine, signatures_of
from daemon.errors import LocationError, ScanwatchError
from daemon.journal import CachedVerdict, FileRow, Journal, KeptVerdict
from daemon.locations import Locations, ObjectStore
from daemon.model import FileState, ScanChanges, Verdict, VerdictKind
from daemon.pipeline.outcome import Outcome
from daemon.watchers.fleet import LEASE_DIR

__all__ = ["CacheKey", "VerdictCache", "cached_fields"]

log = structlog.get_logger("scanwatch.pipeline")

# A row waiting for another's scan of the same bytes looks again after this at the latest
# (it is made due at once when that scan's answer lands): a safety net for a lost flight.
_WAIT_S = 5.0
_SHARED_DIR = LEASE_DIR + "cache/"


@dataclass(frozen=True)
class CacheKey:
    """Whose verdict on which bytes: the engine, its signatures, the sha256."""

    engine: str
    fingerprint: str
    sha256: str
    is_versioned: bool  # False: a clean verdict is reused for `cache.clean_ttl` only


def cached_fields(entry: CachedVerdict) -> dict[str, object]:
    """What a verdict taken from the cache adds to its log line and sidecar."""
    return {"cached": True, "cached_from": entry.source(), "cache": "hit"}


class VerdictCache:
    """Lookups, flights and stores of the engines' verdicts for the scanning step."""

    def __init__(self, config: Config, journal: Journal, clock: Callable[[], float]) -> None:
        self.config = config
        self.journal = journal
        self.clock = clock

    def key(self, watch: WatchConfig, name: str, engine: Engine, sha256: str) -> CacheKey | None:
        """The cache key of these bytes for engine `name`, or None when the cache is off for them."""
        if not self.config.engines[name].cache.enabled or watch.archivepwd is not None:
            return None
        try:
            signatures = signatures_of(engine)
        except ScanwatchError as exc:
            log.debug("cache.no_signatures", engine=name, error=str(exc))
            return None
        return CacheKey(name, signatures.fingerprint, sha256, signatures.is_versioned)

    def lookup(self, key: CacheKey, watch: WatchConfig, locations: Locations) -> CachedVerdict | None:
        """The verdict to reuse, if one is kept and still good (counted as a hit)."""
        entry = self.journal.verdicts.get(key.engine, key.fingerprint, key.sha256)
        if entry is None and (shared := self._shared(key, watch, locations)) is not None:
            entry = self._get_shared(shared, key)
            if entry is not None:
                self.journal.cache_verdict(entry, self._max_entries(key), self.clock())
        if entry is None or not self._is_fresh(key, entry):
            return None
        self.journal.verdicts.count(key.engine, hit=True)
        return entry

    def wait(self, key: CacheKey, row: FileRow) -> Outcome | None:
        """None: `row` holds its bytes' flight and asks. Else another row does: wait for it.

        A small file for an engine that scans in this process or on this host (YARA, a clamd
        on a unix socket: `cheap_rescan_bytes`) takes no flight: scanning copies twice costs
        less than a flight's transaction under the journal's writers' lock for every file,
        the serial part of the daemon's work (bench/RESULTS.md, "Issue 21").
        """
        if self._is_cheap(key, row):
            return None
        now = self.clock()
        holder = self.journal.take_flight(key.engine, key.sha256, row.id, now, now + _WAIT_S)
        if holder is None:
            return None
        # Due when the answer lands, or after `_WAIT_S`: written by `take_flight`, so not here.
        # Waiting spends no attempt.
        return Outcome({"state": FileState.STABLE, "owner": None, "attempts": row.attempts - 1},
                       "scan.waiting", {"engine": key.engine, "waiting_for": holder,
                                        "sha256": key.sha256})

    def several(self, row: FileRow, watch: WatchConfig, engines: Mapping[str, Engine], sha256: str,
                locations: Locations) -> tuple[dict[str, CacheKey], dict[str, ScanChanges],
                                               list[tuple[str, Outcome]]]:
        """Several engines on one watch (daemon/pipeline/multi.py): the keys of those to ask,
        the scan record changes of those answered from the cache or waiting, and their events."""
        keys: dict[str, CacheKey] = {}
        records: dict[str, ScanChanges] = {}
        events: list[tuple[str, Outcome]] = []
        now = self.clock()
        for name, engine in engines.items():
            if (key := self.key(watch, name, engine, sha256)) is None:
                continue
            if (entry := self.lookup(key, watch, locations)) is not None:
                records[name] = {"verdict": entry.verdict, "reason": entry.reason,
                                 "threats": list(entry.threats), "engine_scan_id": None,
                                 "submitting_at": None, "scanned_at": now, "last_error": None,
                                 "cached_from": entry.source()}
                events.append((name, Outcome({}, "scan.verdict", {"verdict": entry.verdict.value,
                                                                  **cached_fields(entry)})))
            elif (holder := self.journal.take_flight(name, sha256, row.id, now, now + _WAIT_S)) is not None:
                records[name] = {"next_attempt_at": now + _WAIT_S, "last_error": None}
                log.info("scan.waiting", watch=row.watch, rel_path=row.rel_path, file_id=row.id,
                         engine=name, waiting_for=holder, sha256=sha256)
            else:
                keys[name] = key
        return keys, records, events

    def store(self, key: CacheKey | None, file_id: int, verdict: Verdict, ref_id: str | None,
              watch: WatchConfig, locations: Locations, *, later: bool = False) -> KeptVerdict | None:
        """Keep the engine's answer (a miss, counted) and end the flight; failed is not kept.

        `later`: returned instead, for the caller to keep with its row's change (`Journal.apply`).
        """
        if key is None:
            return None
        if verdict.kind is VerdictKind.FAILED:
            self.journal.end_flight(key.engine, key.sha256, file_id, self.clock(), is_miss=True)
            return None
        entry = CachedVerdict(key.engine, key.fingerprint, key.sha256, verdict.kind, verdict.reason,
                              tuple(verdict.threats), ref_id, verdict.engine_scan_id, self.clock())
        if (shared := self._shared(key, watch, locations)) is not None:
            self._put_shared(shared, key, entry)
        kept = KeptVerdict(entry, self._max_entries(key), self.clock(), file_id)
        if later:
            return kept
        self.journal.cache_verdict(entry, kept.max_entries, kept.now, file_id, is_miss=True)
        return None

    def release(self, key: CacheKey | None, file_id: int) -> None:
        """The row's scan ended with no answer (a retry, a wait): the waiting rows go on."""
        if key is not None:
            self.journal.end_flight(key.engine, key.sha256, file_id, self.clock())

    def _is_cheap(self, key: CacheKey, row: FileRow) -> bool:
        cheap = self.config.engines[key.engine].cheap_rescan_bytes
        return cheap > 0 and row.size is not None and row.size <= cheap

    def _is_fresh(self, key: CacheKey, entry: CachedVerdict) -> bool:
        if key.is_versioned or entry.verdict is VerdictKind.INFECTED:
            return True  # kept until the signatures change (docs/engines.md)
        return self.clock() - entry.scanned_at <= self.config.engines[key.engine].cache.clean_ttl

    def _max_entries(self, key: CacheKey) -> int:
        return self.config.engines[key.engine].cache.max_entries

    # -- shared through the bucket (docs/fleet.md) -------------------------------------------------

    def _shared(self, key: CacheKey, watch: WatchConfig, locations: Locations) -> ObjectStore | None:
        """The fleet watch's source, when the engine shares its verdicts there."""
        if not (watch.fleet and self.config.engines[key.engine].cache.shared):
            return None
        source = locations.source(watch.source, watch)
        return source if isinstance(source, ObjectStore) else None

    def _get_shared(self, where: ObjectStore, key: CacheKey) -> CachedVerdict | None:
        name = _shared_name(key)
        try:
            body = where.read_object(name)
            entry = CachedVerdict.from_json(json.loads(body))
        except FileNotFoundError:
            return None
        except (LocationError, OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("cache.shared_unreadable", key=where.name(name), error=str(exc))
            return None
        if (entry.engine, entry.fingerprint, entry.sha256) != (key.engine, key.fingerprint, key.sha256):
            log.warning("cache.shared_unreadable", key=where.name(name), error="names other bytes")
            return None
        return entry

    def _put_shared(self, where: ObjectStore, key: CacheKey, entry: CachedVerdict) -> None:
        """Written once: the first member's verdict stands (`IfNoneMatch: *`)."""
        name = _shared_name(key)
        try:
            where.create_object(name, json.dumps(entry.to_json()).encode())  # False: another was first
        except (LocationError, OSError) as exc:
            log.warning("cache.shared_unwritten", key=where.name(name), error=str(exc))


def _shared_name(key: CacheKey) -> str:
    """`.scanwatch/cache/<engine>/<fingerprint digest>/<sha256>` under the source prefix."""
    digest = hashlib.sha256(key.fingerprint.encode()).hexdigest()[:32]
    return f"{_SHARED_DIR}{key.engine}/{digest}/{key.sha256}"
