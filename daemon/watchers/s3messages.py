"""S3 event notifications as an SQS message carries them: direct, through SNS, or through
EventBridge (`detail-type: Object Created`); every record counts (docs/fleet.md, "Event shapes").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from daemon.errors import MalformedMessageError
from daemon.s3url import bare_etag

__all__ = ["S3Event", "events_of", "parse_message"]

_CREATED_PREFIX = "ObjectCreated:"
_EVENTBRIDGE_CREATED = "Object Created"


@dataclass(frozen=True)
class S3Event:
    """One record of an S3 event notification, key decoded."""

    bucket: str
    key: str
    etag: str | None
    version_id: str | None
    size: int | None
    sequencer: str | None
    event_name: str


def parse_message(body: str) -> list[S3Event]:
    """The ObjectCreated events of every record of one SQS message body, in order.

    Accepts an S3 notification as S3 sends it, wrapped by SNS (`Type: Notification`), or an
    EventBridge event (`detail-type`). An `s3:TestEvent` gives `[]`, and so do removals and
    other event types. Raises MalformedMessageError for anything else, including one bad
    record among good ones.
    """
    doc = _load_json(body, "body")
    if isinstance(doc, dict) and doc.get("Type") == "Notification" and "Message" in doc:
        if not isinstance(doc["Message"], str):
            raise MalformedMessageError("SNS Message is not a string")
        doc = _load_json(doc["Message"], "SNS Message")
    if not isinstance(doc, dict):
        raise MalformedMessageError("not a JSON object")
    if doc.get("Event") == "s3:TestEvent":
        return []
    if "detail-type" in doc:
        return _parse_eventbridge(doc)
    records = doc.get("Records")
    if not isinstance(records, list):
        raise MalformedMessageError("no Records list")
    events = [_parse_record(record, f"Records[{index}]") for index, record in enumerate(records)]
    # MinIO and some other S3-compatible stores write `s3:ObjectCreated:Put`.
    return [event for event in events if event.event_name.removeprefix("s3:").startswith(_CREATED_PREFIX)]


def events_of(message: dict[str, Any]) -> list[S3Event]:
    """The events of a message already parsed once without error."""
    try:
        return parse_message(message.get("Body", ""))
    except MalformedMessageError:
        return []


def _load_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError; also lone surrogates and the like
        raise MalformedMessageError(f"{what} is not JSON ({exc.__class__.__name__})") from None


def _parse_record(record: Any, where: str) -> S3Event:
    """One record; every record is checked, whatever its event type."""
    if not isinstance(record, dict):
        raise MalformedMessageError(f"{where} is not an object")
    key = _decoded_key(_field(record, where, str, "s3", "object", "key", required=True),
                       f"{where}.s3.object.key")
    etag = _field(record, where, str, "s3", "object", "eTag")
    return S3Event(
        bucket=_field(record, where, str, "s3", "bucket", "name", required=True),
        key=key,
        etag=None if etag is None else bare_etag(etag),
        version_id=_field(record, where, str, "s3", "object", "versionId"),
        size=_field(record, where, int, "s3", "object", "size"),
        sequencer=_field(record, where, str, "s3", "object", "sequencer"),
        event_name=_field(record, where, str, "eventName", required=True),
    )


def _parse_eventbridge(doc: dict[str, Any]) -> list[S3Event]:
    """The event of an EventBridge `Object Created` event; `[]` for its other S3 events."""
    detail_type = doc["detail-type"]
    if not isinstance(detail_type, str):
        raise MalformedMessageError(f"detail-type is {type(detail_type).__name__}, not str")
    where, detail = "event", "detail"
    if not isinstance(doc.get(detail), dict):
        raise MalformedMessageError("EventBridge event has no detail object")
    key = _decoded_key(_field(doc, where, str, detail, "object", "key", required=True),
                       "detail.object.key")
    bucket = _field(doc, where, str, detail, "bucket", "name", required=True)
    etag = _field(doc, where, str, detail, "object", "etag")
    event = S3Event(
        bucket=bucket, key=key, etag=None if etag is None else bare_etag(etag),
        version_id=_field(doc, where, str, detail, "object", "version-id"),
        size=_field(doc, where, int, detail, "object", "size"),
        sequencer=_field(doc, where, str, detail, "object", "sequencer"),
        event_name=f"{_CREATED_PREFIX}{_field(doc, where, str, detail, 'reason') or 'PutObject'}")
    return [event] if detail_type == _EVENTBRIDGE_CREATED else []


def _decoded_key(raw_key: str, where: str) -> str:
    """A key as S3 writes it in events, decoded; see docs/fleet.md "Event shapes".

    Notifications form-encode keys ('+' is a space, anything else special is %xx of UTF-8).
    EventBridge keys are decoded the same way: AWS documents no difference, and AWS's own
    Lambda Powertools decodes `detail.object.key` with `unquote_plus` too.
    """
    if not raw_key:
        raise MalformedMessageError(f"{where} is empty")
    try:
        return unquote_plus(raw_key, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise MalformedMessageError(f"{where} is not percent-encoded UTF-8") from None


def _field(record: dict[str, Any], where: str, kind: type, *path: str, required: bool = False) -> Any:
    """The value at `path` if it is a `kind`; None if absent or null and not `required`."""
    node: Any = record
    for name in path:
        node = node.get(name) if isinstance(node, dict) else None
    dotted = ".".join(path)
    if node is None:
        if required:
            raise MalformedMessageError(f"{where} has no {dotted}")
        return None
    if isinstance(node, bool) or not isinstance(node, kind):
        raise MalformedMessageError(f"{where}.{dotted} is {type(node).__name__}, not {kind.__name__}")
    return node
