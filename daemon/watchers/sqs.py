"""The SQS transport of S3 event notifications: the event-mode input of an S3 watch (the
messages' shapes are `daemon/watchers/s3messages.py`).

A message is deleted only after `on_events` has returned, which means its events are in the
journal; a crash in between redelivers it, and the journal drops the duplicate (the same version).
While `on_events` runs, a heartbeat keeps every message of the batch invisible, so a slow journal
never lets SQS hand the same message to another consumer. Messages that are not S3 events are
left on the queue untouched (logged once, counted every time): SQS brings them back after the
visibility timeout and the queue's redrive policy moves them to its dead-letter queue. Lost
events are the polling safety net's job.

Nothing above this module sees botocore: SQS failures become `QueueUnavailableError`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType
from typing import Any

import structlog

from daemon.errors import MalformedMessageError, QueueUnavailableError
from daemon.retry import RetryPolicy
from daemon.s3client import sqs_boundary
from daemon.watchers.fleet import is_fleet_key
from daemon.watchers.s3messages import S3Event, events_of, parse_message

__all__ = ["SqsEventSource"]

log = structlog.get_logger("scanwatch.s3events")

_MAX_MESSAGES = 10  # ReceiveMessage's and the batch calls' limit
_MAX_WAIT_TIME_S = 20  # SQS long polling's limit
_MAX_VISIBILITY_TIMEOUT_S = 43_200  # 12 h, SQS's limit
_BODY_HEAD_CHARS = 120
_DEFAULT_RETRY = RetryPolicy(base_s=1.0, max_s=60.0)
# Fleet, holding its maximum: how soon to look again for settled messages (doubling while none).
_FULL_WAIT_MIN_S, _FULL_WAIT_MAX_S = 0.05, 1.0
_MALFORMED_REMEMBERED = 10_000
_HELD_WAIT_TIME_S = 1  # the long poll while holding messages: settled ones are deleted soon


# -- the queue ---------------------------------------------------------------------------------

class SqsEventSource:
    """Receives S3 events from one queue and hands each message's events to `on_events`.

    `on_events` must have journaled the events when it returns; only then is the message
    deleted. `client` is a boto3 SQS client whose read timeout exceeds `wait_time_s`; it is
    used from this thread and from a heartbeat thread (boto3 clients are thread-safe).
    """

    def __init__(self, client: Any, queue_url: str, on_events: Callable[[list[S3Event]], None], *,
                 bucket: str, prefix: str, wait_time_s: int = 20, visibility_timeout_s: int = 60,
                 stop: threading.Event | None = None, retry: RetryPolicy = _DEFAULT_RETRY,
                 is_settled: Callable[[list[S3Event]], bool] | None = None, max_held: int = 20,
                 on_poll: Callable[[], None] = lambda: None,
                 on_malformed: Callable[[], None] = lambda: None) -> None:
        if not 1 <= wait_time_s <= _MAX_WAIT_TIME_S:
            raise ValueError(f"wait_time_s must be 1..{_MAX_WAIT_TIME_S}, not {wait_time_s}")
        if not 1 <= visibility_timeout_s <= _MAX_VISIBILITY_TIMEOUT_S:
            raise ValueError(f"visibility_timeout_s must be 1..{_MAX_VISIBILITY_TIMEOUT_S}, "
                             f"not {visibility_timeout_s}")
        self._client = client
        self._queue_url = queue_url
        self._queue = queue_url.rstrip("/").rpartition("/")[2]
        self._on_events = on_events
        self._bucket = bucket
        self._prefix = prefix
        self._wait_time_s = wait_time_s
        self._visibility_timeout_s = visibility_timeout_s
        self._retry = retry
        self.stop = stop if stop is not None else threading.Event()
        self._log = log.bind(queue=self._queue)
        # Fleet mode (docs/fleet.md): a message is the lease on its objects. It is kept invisible
        # after on_events until `is_settled` says all its objects reached a destination, and only
        # then deleted; a daemon that dies leaves it to reappear for another.
        self._is_settled = is_settled
        self._max_held = max_held
        self._on_poll = on_poll  # after each round (fleet: the watcher records held_count)
        self._held: dict[str, tuple[dict[str, Any], list[S3Event]]] = {}
        self._keeper: _Heartbeat | None = None
        self._full_wait_s = _FULL_WAIT_MIN_S
        # A message that cannot be read comes back at every visibility timeout until the queue's
        # redrive policy takes it: logged the first time, counted every time (`on_malformed`).
        self._on_malformed = on_malformed
        self._malformed_seen: OrderedDict[str, None] = OrderedDict()

    @property
    def held_count(self) -> int:
        """Messages received and not yet deleted because their objects are in flight (fleet)."""
        return len(self._held)

    def run(self) -> None:
        """Poll until `stop` is set; any failure is logged and retried with backoff, never raised."""
        try:
            self.check_redrive()
            self._run()
        finally:
            if self._keeper is not None:  # held messages come back to the fleet when they expire
                self._keeper.__exit__(None, None, None)

    def _run(self) -> None:
        failures = 0
        while not self.stop.is_set():
            try:
                self.poll_once()
                self._on_poll()
            except Exception as exc:  # top of a worker loop: log, back off, go on
                failures += 1
                delay_s = self._retry.delay(failures)
                is_sqs = isinstance(exc, QueueUnavailableError)
                self._log.warning("sqs.error", action=getattr(exc, "action", None),
                                  error_code=getattr(exc, "code", None), error=str(exc),
                                  attempt=failures, retry_in_s=round(delay_s, 3), exc_info=not is_sqs)
                self.stop.wait(delay_s)
            else:
                failures = 0

    def check_redrive(self) -> bool:
        """Whether the queue has a redrive policy; warns once (at start) when it has none."""
        try:
            with sqs_boundary("GetQueueAttributes", self._queue):
                attrs = self._client.get_queue_attributes(
                    QueueUrl=self._queue_url, AttributeNames=["RedrivePolicy"]).get("Attributes", {})
        except QueueUnavailableError as exc:  # the receive loop reports and retries it
            self._log.debug("sqs.redrive_unknown", error=str(exc))
            return False
        if "RedrivePolicy" in attrs:
            return True
        self._log.warning("sqs.no_redrive_policy", hint="give the queue a redrive policy (a dead-letter "
                          "queue): a message that cannot be read comes back until it moves there")
        return False

    def poll_once(self) -> int:
        """One ReceiveMessage round; returns how many messages it received (at most 10).

        Each is deleted after `on_events` returned, or left on the queue (malformed, or
        `on_events` raised) to come back after the visibility timeout. Raises
        QueueUnavailableError if SQS fails the receive or the delete.
        """
        room, wait_time_s = _MAX_MESSAGES, self._wait_time_s
        if self._is_settled is not None:
            if self._settle_held():
                self._full_wait_s = _FULL_WAIT_MIN_S
            room = min(_MAX_MESSAGES, self._max_held - len(self._held))
            if room <= 0:  # leave the rest of the queue to the other daemons
                self.stop.wait(self._full_wait_s)  # soon again while messages settle, then slower
                self._full_wait_s = min(_FULL_WAIT_MAX_S, 2 * self._full_wait_s)
                return 0
            if self._held:  # a long poll would keep settled messages from being deleted
                wait_time_s = min(wait_time_s, _HELD_WAIT_TIME_S)
        with sqs_boundary("ReceiveMessage", self._queue):
            response = self._client.receive_message(
                QueueUrl=self._queue_url, MaxNumberOfMessages=room,
                WaitTimeSeconds=wait_time_s, VisibilityTimeout=self._visibility_timeout_s,
                MessageSystemAttributeNames=["ApproximateReceiveCount"])
        messages: list[dict[str, Any]] = response.get("Messages", [])
        if not messages:
            return 0
        with _Heartbeat(self._client, self._queue_url, self._queue, self._visibility_timeout_s,
                        messages, self._log) as heartbeat:
            done = []
            for message in messages:
                if self._handle(message):
                    done.append(message)
                else:
                    heartbeat.release(message["ReceiptHandle"])
            if self._is_settled is not None:
                done = self._hold(done)
            heartbeat.retire(done, self._delete)
        return len(messages)

    def _hold(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Fleet: keep the messages whose objects are not settled; the others may be deleted."""
        assert self._is_settled is not None
        free = []
        for message in messages:
            events = [e for e in events_of(message) if self._is_wanted(e)]
            if not events or self._is_settled(events):
                free.append(message)
                continue
            if self._keeper is None:
                self._keeper = _Heartbeat(self._client, self._queue_url, self._queue,
                                          self._visibility_timeout_s, [], self._log).__enter__()
            self._keeper.add(message)
            self._held[message["ReceiptHandle"]] = (message, events)
        return free

    def _settle_held(self) -> int:
        """Fleet: delete the held messages whose objects all reached a destination; how many."""
        assert self._is_settled is not None
        settled = [message for message, events in list(self._held.values()) if self._is_settled(events)]
        for start in range(0, len(settled), _MAX_MESSAGES):
            batch = settled[start:start + _MAX_MESSAGES]
            if self._keeper is not None:
                self._keeper.retire(batch, self._delete)
            else:
                self._delete(batch)
            for message in batch:
                self._held.pop(message["ReceiptHandle"], None)
        return len(settled)

    def _handle(self, message: dict[str, Any]) -> bool:
        """Hand on one message's events; True if the message may be deleted."""
        message_id = message.get("MessageId")
        body = message.get("Body", "")
        try:
            events = parse_message(body)
        except MalformedMessageError as exc:
            self._on_malformed()
            if self._first_sight(str(message_id)):
                self._log.warning("sqs.malformed", message_id=message_id, reason=str(exc),
                                  size_bytes=len(body.encode("utf-8", "replace")),
                                  body_head=body[:_BODY_HEAD_CHARS],
                                  receive_count=message.get("Attributes", {}).get("ApproximateReceiveCount"))
            return False
        wanted = [event for event in events if self._is_wanted(event)]
        self._log.debug("sqs.received", message_id=message_id, events=len(events),
                        dropped=len(events) - len(wanted))
        if not wanted:
            return True
        try:
            self._on_events(wanted)
        except Exception:  # the journal failed: the message comes back after the visibility timeout
            self._log.error("sqs.handler_failed", message_id=message_id, events=len(wanted),
                            exc_info=True)
            return False
        return True

    def _first_sight(self, message_id: str) -> bool:
        """True the first time a malformed message is seen (the last 10,000 are remembered)."""
        if message_id in self._malformed_seen:
            return False
        self._malformed_seen[message_id] = None
        if len(self._malformed_seen) > _MALFORMED_REMEMBERED:
            self._malformed_seen.popitem(last=False)
        return True

    def _is_wanted(self, event: S3Event) -> bool:
        """In this watch's bucket and prefix, not our own object (a fleet's lease, a snapshot:
        `.scanwatch/`); folder markers are reported by the watcher, never scanned."""
        return (event.bucket == self._bucket and event.key.startswith(self._prefix)
                and not is_fleet_key(event.key.removeprefix(self._prefix)))

    def _delete(self, messages: list[dict[str, Any]]) -> None:
        """DeleteMessageBatch; a message whose delete failed comes back and is deduplicated."""
        if not messages:
            return
        with sqs_boundary("DeleteMessageBatch", self._queue):
            response = self._client.delete_message_batch(QueueUrl=self._queue_url, Entries=[
                {"Id": str(index), "ReceiptHandle": message["ReceiptHandle"]}
                for index, message in enumerate(messages)])
        for entry in response.get("Successful", []):
            self._log.debug("sqs.deleted", message_id=messages[int(entry["Id"])].get("MessageId"))
        for entry in response.get("Failed", []):
            self._log.warning("sqs.error", action="DeleteMessageBatch", error_code=entry.get("Code"),
                              error=entry.get("Message"),
                              message_id=messages[int(entry["Id"])].get("MessageId"))


class _Heartbeat:
    """Keeps a batch's messages invisible while they are handled: ChangeMessageVisibilityBatch
    every half visibility timeout, from its own thread, until each is released or the batch ends.
    """

    def __init__(self, client: Any, queue_url: str, queue: str, visibility_timeout_s: int,
                 messages: list[dict[str, Any]], logger: Any) -> None:
        self._client = client
        self._queue_url = queue_url
        self._queue = queue
        self._visibility_timeout_s = visibility_timeout_s
        self._log = logger
        self._pending = {message["ReceiptHandle"]: message.get("MessageId") for message in messages}
        # Held across an extension call and a delete: neither overlaps the other (`retire`).
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqs-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._finished.set()
        self._thread.join()

    def add(self, message: dict[str, Any]) -> None:
        """Extend this message too, from the next beat on."""
        with self._lock:
            self._pending[message["ReceiptHandle"]] = message.get("MessageId")

    def release(self, receipt_handle: str) -> None:
        """Stop extending this message: it becomes visible when its current timeout runs out."""
        with self._lock:
            self._pending.pop(receipt_handle, None)

    def retire(self, messages: list[dict[str, Any]], delete: Callable[[list[dict[str, Any]]], None]) -> None:
        """`delete` these messages, then stop extending them: never while an extension is in
        flight, so none is extended after its delete (a deleted receipt handle is invalid)."""
        with self._lock:
            delete(messages)
            for message in messages:
                self._pending.pop(message["ReceiptHandle"], None)

    def _run(self) -> None:
        while not self._finished.wait(self._visibility_timeout_s / 2):
            self._extend()

    def _extend(self) -> None:
        with self._lock:
            pending = list(self._pending.items())
            if not pending:
                return
            entries = [{"Id": str(index), "ReceiptHandle": handle,
                        "VisibilityTimeout": self._visibility_timeout_s}
                       for index, (handle, _) in enumerate(pending)]
            try:
                with sqs_boundary("ChangeMessageVisibilityBatch", self._queue):
                    response = self._client.change_message_visibility_batch(
                        QueueUrl=self._queue_url, Entries=entries)
            except QueueUnavailableError as exc:
                self._log.warning("sqs.error", action=exc.action, error_code=exc.code, error=str(exc))
                return
        for entry in response.get("Failed", []):
            self._log.warning("sqs.error", action="ChangeMessageVisibilityBatch",
                              error_code=entry.get("Code"), error=entry.get("Message"),
                              message_id=pending[int(entry["Id"])][1])
