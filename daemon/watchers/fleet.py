"""Fleets (docs/fleet.md): the listing lease, and the safety net that its holder runs.

Several daemons may share one S3 watch through its SQS queue. Only one of them lists the
prefix at a time: the one holding `.scanwatch/lease` under the source prefix, an object
written with S3 conditional writes only (`IfNoneMatch: *` to create it, `IfMatch: <ETag>`
to renew it or to take over one whose expiry has passed). The body names the holder and
the expiry and differs on every write, so an ETag is never reused. The holder lists and
sends what it finds, older than a grace period, to the queue as synthetic S3 events; any
daemon then handles them like any other event. Losing the lease mid-listing is harmless:
an event sent twice finds its object placed (daemon/locations/s3.py).

Expiry is wall-clock time written by one host and read by another: hosts need synchronized
clocks (NTP) to within a small part of `ttl_s`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote_plus

import structlog

from daemon.errors import LocationError, QueueUnavailableError, S3ConditionError
from daemon.model import SeenObject
from daemon.s3client import epoch, list_objects, s3_boundary, sqs_boundary
from daemon.s3url import S3Url, bare_etag

__all__ = ["LEASE_DIR", "ListingLease", "SafetyNet", "is_fleet_key", "synthetic_event"]

log = structlog.get_logger("scanwatch.fleet")

LEASE_DIR = ".scanwatch/"
_LEASE_NAME = LEASE_DIR + "lease"
_SQS_BATCH = 10


def is_fleet_key(rel_path: str) -> bool:
    """True for our own objects under the source prefix: never scanned."""
    return rel_path.startswith(LEASE_DIR)


class ListingLease:
    """`.scanwatch/lease` under one source prefix. Not thread-safe: one lister thread uses it."""

    def __init__(self, client: Any, where: S3Url, holder: str, *, ttl_s: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._bucket = where.bucket
        self.key = where.key(_LEASE_NAME)
        self.holder = holder
        self._ttl_s = ttl_s
        self._clock = clock
        self._etag: str | None = None
        self._held_until = 0.0

    @property
    def is_held(self) -> bool:
        """True while our last write stands and its expiry has not passed."""
        return self._etag is not None and self._clock() < self._held_until

    @property
    def held_until(self) -> float | None:
        """The expiry of our lease while we hold it, else None."""
        return self._held_until if self.is_held else None

    def acquire(self) -> bool:
        """Take, renew or take over the lease; True if we hold it now. Raises LocationError."""
        if self._etag is not None and self._write(self._etag):
            return True
        self._etag = None
        current = self._read()
        if current is None:
            return self._write(None)
        etag, holder, expires_at = current
        if holder != self.holder and expires_at > self._clock():
            return False
        return self._write(etag)

    def release(self) -> None:
        """Let the lease go at once (at shutdown), if it is still ours."""
        if self._etag is None:
            return
        etag, self._etag = self._etag, None
        try:
            with s3_boundary(f"DELETE s3://{self._bucket}/{self.key}"):
                self._client.delete_object(Bucket=self._bucket, Key=self.key, IfMatch=etag)
        except (LocationError, OSError):  # someone took it, or S3 is away: it expires anyway
            log.debug("fleet.lease_release_failed", key=self.key)

    def _read(self) -> tuple[str, str | None, float] | None:
        """(ETag, holder, expires_at) of the lease object, or None if there is none."""
        try:
            with s3_boundary(f"GET s3://{self._bucket}/{self.key}"):
                answer = self._client.get_object(Bucket=self._bucket, Key=self.key)
                raw = answer["Body"].read(4096)
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
            return str(answer["ETag"]), str(doc["holder"]), float(doc["expires_at"])
        except (ValueError, KeyError, TypeError):  # unreadable: treat as expired, take it over
            return str(answer["ETag"]), None, 0.0

    def _write(self, if_match: str | None) -> bool:
        """PUT the lease conditionally; True if it stood, False if another write won."""
        now = self._clock()
        body = json.dumps({"holder": self.holder, "acquired_at": now, "expires_at": now + self._ttl_s})
        condition = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
        try:
            with s3_boundary(f"PUT s3://{self._bucket}/{self.key}"):
                answer = self._client.put_object(Bucket=self._bucket, Key=self.key, Body=body.encode(),
                                                 ContentType="application/json", **condition)
        except (S3ConditionError, FileNotFoundError):
            if self._etag is not None:
                log.warning("fleet.lease_lost", key=self.key, holder=self.holder)
            self._etag = None
            return False
        was_held = self._etag is not None
        self._etag, self._held_until = str(answer["ETag"]), now + self._ttl_s
        if not was_held:
            log.info("fleet.lease_taken", key=self.key, holder=self.holder, ttl_s=self._ttl_s)
        return True


def synthetic_event(bucket: str, key: str, etag: str, size: int) -> str:
    """An S3 notification body for one object, as the listing safety net sends it."""
    return json.dumps({"Records": [{
        "eventVersion": "2.1", "eventSource": "scanwatch:safety-net", "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket},
               "object": {"key": quote_plus(key, safe="/"), "eTag": bare_etag(etag), "size": size}}}]})


class SafetyNet:
    """The lease holder's listing: objects older than `grace_s` go to the queue as events."""

    def __init__(self, s3: Any, sqs: Any, queue_url: str, where: S3Url, lease: ListingLease, *,
                 grace_s: float, skip_reason: Callable[[str], str | None] = lambda rel_path: None,
                 on_skipped: Callable[[list[SeenObject], str], object] = lambda seen, how: None,
                 clock: Callable[[], float] = time.time) -> None:
        self._s3 = s3
        self._sqs = sqs
        self._queue_url = queue_url
        self._where = where
        self._lease = lease
        self._grace_s = grace_s
        self._skip_reason = skip_reason  # keys never scanned: recorded here, reported once
        self._on_skipped = on_skipped
        self._clock = clock
        # What we sent, so an object still in flight is not sent again every round. Losing it
        # costs a duplicate event, which finds its object placed: never a lost object.
        # An object is its version: the same bytes uploaded again are sent again at once.
        self._sent: dict[tuple[str, str, float], float] = {}

    def run_once(self) -> int:
        """One listing if we hold the lease; returns how many events it sent."""
        if not self._lease.acquire():
            return 0
        sent = 0
        for page in list_objects(self._s3, self._where):
            if not self._lease.is_held and not self._lease.acquire():
                log.info("fleet.listing_stopped", reason="lease_lost")
                break
            sent += self._send(list(self._due(page)))
        if sent:
            log.info("fleet.safety_net_sent", count=sent, prefix=str(self._where))
        return sent

    def _due(self, objects: Any) -> Iterator[tuple[str, str, int, float]]:
        now = self._clock()
        skipped = []
        for obj in objects:
            key, etag, last_modified = obj["Key"], obj["ETag"], epoch(obj["LastModified"])
            rel_path = key.removeprefix(self._where.prefix)
            if not rel_path or is_fleet_key(rel_path):
                continue
            if self._skip_reason(rel_path) is not None:
                skipped.append(SeenObject(rel_path, etag, None, int(obj["Size"]), last_modified))
                continue
            if now - last_modified < self._grace_s:
                continue  # its own event is probably on the way
            if now - self._sent.get((key, etag, last_modified), -1e18) < 10 * self._grace_s:
                continue
            yield key, etag, int(obj["Size"]), last_modified
        if skipped:
            self._on_skipped(skipped, "listing")

    def _send(self, due: list[tuple[str, str, int, float]]) -> int:
        for start in range(0, len(due), _SQS_BATCH):
            batch = due[start:start + _SQS_BATCH]
            try:
                bucket = self._where.bucket
                entries = [{"Id": str(index), "MessageBody": synthetic_event(bucket, key, etag, size)}
                           for index, (key, etag, size, _) in enumerate(batch)]
                with sqs_boundary("SendMessageBatch", self._queue_url):
                    self._sqs.send_message_batch(QueueUrl=self._queue_url, Entries=entries)
            except QueueUnavailableError as exc:
                log.warning("sqs.error", action="SendMessageBatch", error_code=exc.code, error=str(exc))
                return start
            now = self._clock()
            self._sent.update({(key, etag, modified): now for key, etag, _, modified in batch})
        return len(due)

