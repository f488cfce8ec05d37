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

import boto3
import structlog
from botocore.config import Config as BotoConfig

from daemon.config import S3Config, WatchConfig
from daemon.fleet import ListingLease, SafetyNet, is_fleet_key
from daemon.journal import FleetMember, Journal
from daemon.retry import RetryPolicy
from daemon.s3 import S3Url, s3_boundary
from daemon.watchers.base import is_ignored
from daemon.watchers.s3events import SqsEventSource
from daemon.watchers.s3notify import S3Event

__all__ = ["S3Watcher"]

log = structlog.get_logger("scanwatch.watchers.s3")

_EVENTS_SLOWDOWN = 10
_PAGE_SIZE = 1000

ObjectEntry = tuple[str, str, str | None, int]  # rel_path, etag, version_id, size
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
                 s3_config: S3Config, *, clock: Callable[[], float] = time.time) -> None:
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
            sqs = _sqs_client(watch, s3_config)
            self.events = SqsEventSource(
                sqs, watch.events.sqs_queue_url, self._on_events,
                bucket=self.where.bucket, prefix=self.where.prefix, stop=self._stop,
                visibility_timeout_s=max(1, round(watch.events.visibility_timeout)),
                is_settled=self._is_settled if watch.fleet else None, on_poll=self._note_fleet)
            if watch.fleet:  # list only while holding the lease, and only into the queue
                # Renewed every listing interval, it outlives two missed renewals (docs/fleet.md).
                self.lease = ListingLease(client, self.where, f"{socket.gethostname()}:{os.getpid()}",
                                          ttl_s=3 * self._interval_s, clock=clock)
                self.safety_net = SafetyNet(client, sqs, watch.events.sqs_queue_url, self.where, self.lease,
                                            grace_s=self._interval_s,
                                            is_ignored=lambda rel: is_ignored(rel, watch.ignore), clock=clock)

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

    def _run(self) -> None:
        failures = 0
        policy = RetryPolicy(base_s=1.0, max_s=self._interval_s)
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

        A fleet member lists only while it holds the lease, and sends into the queue instead.
        """
        if self.safety_net is not None:
            return self.safety_net.run_once()
        added = 0
        for page in one_ahead(self._pages()):
            added += self._record(page, "listing")
            if self._stop.is_set():
                break
        return added

    def _pages(self) -> Iterator[list[ObjectEntry]]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.where.bucket, Prefix=self.where.prefix,
                                   PaginationConfig={"PageSize": _PAGE_SIZE})
        with s3_boundary(f"LIST {self.where}"):
            for page in pages:
                yield list(self._entries(
                    (o["Key"], o["ETag"], None, o["Size"]) for o in page.get("Contents", ())))

    def _entries(self, objects: Iterable[tuple[str, str, str | None, int]]) -> Iterator[ObjectEntry]:
        """Objects as journal entries: keys made relative; folder markers and ignored names dropped."""
        for key, etag, version_id, size in objects:
            rel_path = key.removeprefix(self.where.prefix)
            if not key.startswith(self.where.prefix) or not rel_path or key.endswith("/"):
                continue
            if is_ignored(rel_path, self.watch.ignore) or is_fleet_key(rel_path):
                continue  # ignored names, and our own `.scanwatch/` lease and snapshots
            yield rel_path, _quoted(etag), version_id, size

    def _on_events(self, events: list[S3Event]) -> None:
        """SQS arrivals: journaled before the message is deleted (we return only then)."""
        self._record(list(self._entries((e.key, e.etag or "", e.version_id, e.size or 0)
                                        for e in events if e.etag)), "event")

    def _is_settled(self, events: list[S3Event]) -> bool:
        """Fleet: every object of these events is done, gone or held in this daemon's journal."""
        for rel_path, etag, _, _ in self._entries((e.key, e.etag or "", e.version_id, e.size or 0)
                                                  for e in events if e.etag):
            if not self.journal.is_settled(self.watch.name, rel_path, etag):
                return False
        return True

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

    def _record(self, entries: list[ObjectEntry], how: str) -> int:
        if not entries:
            return 0
        added = self.journal.discover_objects(self.watch.name, entries, self.clock())
        if added:
            log.info("file.discovered", watch=self.watch.name, count=added, by=how)
            self.wake.set()
        return added


def _quoted(etag: str) -> str:
    """ETags as S3 answers them in listings and HEAD: quoted (events leave the quotes off)."""
    return etag if etag.startswith('"') else f'"{etag}"'


def _sqs_client(watch: WatchConfig, s3_config: S3Config) -> Any:
    assert watch.events is not None
    return boto3.session.Session(profile_name=s3_config.profile).client(
        "sqs", endpoint_url=watch.events.endpoint_url,
        region_name=watch.events.region or s3_config.region or _queue_region(watch.events.sqs_queue_url),
        config=BotoConfig(connect_timeout=5, read_timeout=40,
                          retries={"mode": "standard", "max_attempts": 3}))


def _queue_region(url: str) -> str | None:
    """`https://sqs.eu-west-1.amazonaws.com/123/q` → `eu-west-1`."""
    host = url.split("/")[2] if url.count("/") >= 2 else ""
    parts = host.split(".")
    return parts[1] if len(parts) > 3 and parts[0] == "sqs" else None
