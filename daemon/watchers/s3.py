"""The S3 watcher: lists a prefix every `poll_interval`, and takes SQS event notifications.

Every listed object version goes to the journal (`discover_objects`), page by
page, so a big prefix is never held in memory and a restart mid-backfill picks up
where the journal is: versions it already knows are not new. Objects are complete
when they are listed (an S3 PUT is atomic), so they are stable at once. With
`events:` configured, SQS brings arrivals within seconds and the listing runs at a
tenth of the pace, as the safety net for lost events.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog

from daemon.config import S3Config, WatchConfig
from daemon.errors import LocationError
from daemon.journal import FleetMember, Journal
from daemon.model import Reason, SeenObject
from daemon.retry import RetryPolicy
from daemon.s3client import epoch, list_objects, make_sqs_client, s3_boundary
from daemon.s3url import S3Url, quoted_etag
from daemon.watchers.base import is_ignored, log_discovered
from daemon.watchers.fleet import ListingLease, SafetyNet, is_fleet_key
from daemon.watchers.s3messages import S3Event
from daemon.watchers.sqs import SqsEventSource

__all__ = ["S3Watcher"]

log = structlog.get_logger("scanwatch.watchers.s3")

_EVENTS_SLOWDOWN = 10
_PAGE_SIZE = 1000

_STOPPED = (None, -1)  # what a stopped fleet member noted last


_T = TypeVar("_T")
_END: Any = object()


def one_ahead(items: Iterator[_T]) -> Iterator[_T]:
    """`items`, the next one fetched in a thread while the caller handles this one.

    A listing page is journaled (and its objects claimed by the workers) while the
    next page is on the wire; errors of the fetch surface here, in order.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="s3-list") as pool:
        ahead = pool.submit(next, items, _END)
        while (item := ahead.result()) is not _END:
            ahead = pool.submit(next, items, _END)
            yield item


class S3Watcher:
    """Feeds the journal with the objects that arrive under one watch's S3 source."""

    def __init__(self, watch: WatchConfig, journal: Journal, wake: threading.Event, client: Any,
                 s3_config: S3Config, *, clock: Callable[[], float] = time.time,
                 on_malformed: Callable[[], None] = lambda: None) -> None:
        self.watch = watch
        self.journal = journal
        self.wake = wake
        self.client = client
        self.where = S3Url.parse(watch.source)
        self.clock = clock
        self._s3_config = s3_config
        self._stop = threading.Event()
        self._lister: threading.Thread | None = None
        self._consumer: threading.Thread | None = None
        self._interval_s = watch.poll_interval * (_EVENTS_SLOWDOWN if watch.events else 1)
        self.events: SqsEventSource | None = None
        self.safety_net: SafetyNet | None = None
        self.lease: ListingLease | None = None
        self._fleet_lock = threading.Lock()
        self._fleet_noted: tuple[float | None, int] | None = None
        if watch.events is not None:
            sqs = make_sqs_client(watch.events, s3_config)
            self.events = SqsEventSource(
                sqs, watch.events.sqs_queue_url, self._on_events,
                bucket=self.where.bucket, prefix=self.where.prefix, stop=self._stop,
                visibility_timeout_s=max(1, round(watch.events.visibility_timeout)),
                is_settled=self._is_settled if watch.fleet else None, on_poll=self._note_fleet,
                on_malformed=on_malformed)
            if watch.fleet:  # list only while holding the lease, and only into the queue
                # Renewed every listing interval, it outlives two missed renewals (docs/fleet.md).
                self.lease = ListingLease(client, self.where, f"{socket.gethostname()}:{os.getpid()}",
                                          ttl_s=3 * self._interval_s, clock=clock)
                self.safety_net = SafetyNet(client, sqs, watch.events.sqs_queue_url, self.where, self.lease,
                                            grace_s=self._interval_s, skip_reason=self.skip_reason,
                                            on_skipped=self._record, clock=clock)

    def start(self) -> None:
        """List once now (the backfill), then every interval; consume events if configured."""
        self._lister = threading.Thread(target=self._run, name=f"s3-{self.watch.name}", daemon=True)
        self._lister.start()
        if self.events is not None:
            self._consumer = threading.Thread(target=self.events.run, name=f"sqs-{self.watch.name}",
                                              daemon=True)
            self._consumer.start()

    def stop(self) -> None:
        """Stop listing (between pages) and consuming events.

        An SQS long poll in flight is not waited for: what it brings is journaled or,
        failing that, left on the queue to come back.
        """
        self._stop.set()
        if self._lister is not None:
            self._lister.join(30)
        if self.lease is not None:  # another member may list at once, not after the expiry
            self.lease.release()
            self._note_fleet(stopped=True)
        if self._consumer is not None:
            self._consumer.join(1)

    def warn_if_unversioned(self) -> bool:
        """Log `config.warning` when the source bucket keeps no versions; True if it does not."""
        try:
            with s3_boundary(f"GET versioning s3://{self.where.bucket}"):
                status = self.client.get_bucket_versioning(Bucket=self.where.bucket).get("Status")
        except (LocationError, OSError) as exc:  # the listing reports a bucket it cannot reach
            log.debug("s3.versioning_unknown", watch=self.watch.name, error=str(exc))
            return False
        if status == "Enabled":
            return False
        log.warning("config.warning", watch=self.watch.name, key="source", reason="unversioned_bucket",
                    detail=f"s3://{self.where.bucket} keeps no versions: an object version is pinned by its "
                    "ETag, an MD5, with its LastModified (whole seconds); in-place tags are written with a "
                    "conditional PutObject of the scanned bytes. Turn on versioning to pin by VersionId "
                    "(docs/contract.md, \"S3 in place\")")
        return True

    def _run(self) -> None:
        failures = 0
        policy = RetryPolicy(base_s=1.0, max_s=self._interval_s)
        self.warn_if_unversioned()
        while not self._stop.is_set():
            try:
                self.poll_once()
                self._note_fleet()
                failures, wait_s = 0, self._interval_s
            except Exception as exc:
                failures += 1
                wait_s = policy.delay(failures)
                log.warning("s3.list_failed", watch=self.watch.name, error=str(exc),
                            retry_in_s=round(wait_s, 2))
            self._stop.wait(wait_s)

    def poll_once(self) -> int:
        """List the whole prefix page by page into the journal; returns the new arrivals.

        The keys held when it started (skipped, `too_many_tags`) that a whole listing no
        longer names are gone: recorded so, they are no longer counted as skipped, and
        retention removes their rows. A fleet member lists only while it holds the lease,
        and sends into the queue instead.
        """
        if self.safety_net is not None:
            return self.safety_net.run_once()
        added, listed_at = 0, self.clock()
        held = {rel_path: file_id for file_id, rel_path in self.journal.held_paths(self.watch.name)}
        for page in one_ahead(self._pages()):
            for seen in page:
                held.pop(seen.rel_path, None)
            added += self._record(page, "listing", listed_at)
            if self._stop.is_set():
                return added
        if held:
            self.journal.held_gone(held.values(), self.clock())
        return added

    def _pages(self) -> Iterator[list[SeenObject]]:
        for page in list_objects(self.client, self.where, page_size=_PAGE_SIZE):
            yield list(self._entries(SeenObject(o["Key"], o["ETag"], None, o["Size"],
                                                epoch(o["LastModified"])) for o in page))

    def _entries(self, objects: Iterable[SeenObject]) -> Iterator[SeenObject]:
        """Objects of this watch as journal entries: keys made relative, quoted ETags."""
        for key, etag, version_id, size, last_modified in objects:
            rel_path = key.removeprefix(self.where.prefix)
            if key.startswith(self.where.prefix) and rel_path and not is_fleet_key(rel_path):
                yield SeenObject(rel_path, quoted_etag(etag), version_id, size, last_modified)

    def skip_reason(self, rel_path: str) -> Reason | None:
        """Why a key is never scanned: a directory marker, or an `ignore` glob matches it."""
        if rel_path.endswith("/"):
            return Reason.DIRECTORY_MARKER
        return Reason.IGNORED if is_ignored(rel_path, self.watch.ignore) else None

    def _on_events(self, events: list[S3Event]) -> None:
        """SQS arrivals: journaled before the message is deleted (we return only then)."""
        self._record(self._of_events(events), "event")

    def _of_events(self, events: list[S3Event]) -> list[SeenObject]:
        return list(self._entries(SeenObject(e.key, e.etag or "", e.version_id, e.size or 0)
                                  for e in events if e.etag))

    def _is_settled(self, events: list[S3Event]) -> bool:
        """Fleet: every object of these events is done, gone or held in this daemon's journal."""
        return all(self.journal.is_settled(self.watch.name, seen.rel_path, seen.etag)
                   for seen in self._of_events(events))

    def _note_fleet(self, *, stopped: bool = False) -> None:
        """Fleet: record this daemon's lease and held messages in the journal when they change."""
        if self.lease is None or self.events is None:
            return
        with self._fleet_lock:
            noted = (self.lease.held_until, 0 if stopped else self.events.held_count)
            if noted == self._fleet_noted or self._fleet_noted == _STOPPED:
                return  # unchanged, or the consumer's last round after stop(): held no more
            self._fleet_noted = _STOPPED if stopped else noted
            self.journal.set_fleet(self.watch.name, FleetMember(self.lease.holder, *noted, self.clock()))

    def _record(self, entries: list[SeenObject], how: str, listed_at: float | None = None) -> int:
        """Journal these objects: the wanted ones as arrivals, the others as skipped (once each)."""
        reasons = {seen.rel_path: reason for seen in entries
                   if (reason := self.skip_reason(seen.rel_path)) is not None}
        skipped = [(seen.rel_path, seen.etag, reasons[seen.rel_path]) for seen in entries
                   if seen.rel_path in reasons]
        for rel_path in self.journal.skip_objects(self.watch.name, skipped, self.clock()):
            log.warning("file.skipped", watch=self.watch.name, rel_path=rel_path,
                        reason=reasons[rel_path].value)
        wanted = [seen for seen in entries if seen.rel_path not in reasons]
        if not wanted:
            return 0
        added = self.journal.discover_objects(self.watch.name, wanted, self.clock(), listed_at=listed_at)
        if added:
            self.wake.set()
        log_discovered(self.watch.name, added, how)
        return len(added)
