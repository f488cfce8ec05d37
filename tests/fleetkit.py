"""A fleet of real `scanwatch run` daemons on one S3 watch (SeaweedFS) and one SQS queue (moto).

Shared by tests/test_fleet_daemons.py and bench/fleet.py: one config per node (its own
state_dir and metrics port), objects put with or without S3 event notifications sent by hand
(SeaweedFS sends none to moto), and what the bucket and queue hold afterwards.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

EICAR = (Path(__file__).resolve().parent.parent / "samples" / "eicar.com").read_bytes()
GARBAGE = ["not json at all", json.dumps({"Records": "nope"}), json.dumps({"hello": "world"})]


@dataclass
class Fleet:
    """One fleet watch: `s3://bucket/in/` to clean/quarantine/failed in the same bucket."""

    s3: Any
    sqs: Any
    bucket: str
    queue_url: str
    base: Path
    s3_endpoint: str
    sqs_endpoint: str
    region: str
    etags: dict[str, str] = field(default_factory=dict)

    def config(self, node: int, *, engine: dict[str, Any] | None = None, metrics_port: int | None = None,
               poll_interval: float = 3600, visibility_timeout: float = 4, log_level: str = "debug",
               workers: int | None = None, **watch: Any) -> Path:
        """The node's config file: the fleet's, with its own state_dir (and metrics port);
        `workers` worker processes (None: the daemon's default, one per CPU)."""
        doc: dict[str, Any] = {
            "state_dir": str(self.base / f"node{node}" / "state"),
            "log": {"format": "json", "level": log_level},
            "s3": {"endpoint_url": self.s3_endpoint, "region": self.region},
            "engines": {"default": engine or {"type": "yara", "concurrency": 4}},
            "watches": [{
                "name": "w", "engine": "default", "source": f"s3://{self.bucket}/in/",
                "clean": f"s3://{self.bucket}/clean/", "quarantine": f"s3://{self.bucket}/quarantine/",
                "failed": f"s3://{self.bucket}/failed/", "settle_seconds": 0,
                "poll_interval": poll_interval, "fleet": True,
                "events": {"sqs_queue_url": self.queue_url, "endpoint_url": self.sqs_endpoint,
                           "region": self.region, "visibility_timeout": visibility_timeout},
                **watch}],
        }
        if workers is not None:
            doc["workers"] = workers
        if metrics_port is not None:
            doc["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
        path = self.base / f"node{node}" / "scanwatch.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
        return path

    def put(self, names: Iterable[str], body: Callable[[str], bytes] = lambda name: name.encode()) -> None:
        """Put objects under in/ (no events); their ETags are kept for `send_events`."""
        def one(name: str) -> tuple[str, str]:
            answer = self.s3.put_object(Bucket=self.bucket, Key=f"in/{name}", Body=body(name))
            return name, str(answer["ETag"]).strip('"')

        with ThreadPoolExecutor(8) as pool:
            self.etags.update(pool.map(one, names))

    def record(self, name: str) -> dict[str, Any]:
        from urllib.parse import quote_plus

        return {"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": self.bucket},
                       "object": {"key": quote_plus(f"in/{name}", safe="/"), "size": 1,
                                  "eTag": self.etags[name]}}}

    def send_events(self, names: list[str], *, duplicates: float = 0.0, garbage: int = 0,
                    per_message: int = 1, seed: int = 7) -> int:
        """One notification per `per_message` names, a share of them sent twice, and garbage:
        in a shuffled order. Returns how many messages were sent."""
        rng = random.Random(seed)
        groups = [names[i:i + per_message] for i in range(0, len(names), per_message)]
        bodies = [json.dumps({"Records": [self.record(n) for n in g]}) for g in groups]
        bodies += rng.sample(bodies, int(len(bodies) * duplicates))
        bodies += [GARBAGE[i % len(GARBAGE)] for i in range(garbage)]
        rng.shuffle(bodies)
        batches = [bodies[i:i + 10] for i in range(0, len(bodies), 10)]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda batch: self.sqs.send_message_batch(QueueUrl=self.queue_url, Entries=[
                {"Id": str(i), "MessageBody": b} for i, b in enumerate(batch)]), batches))
        return len(bodies)

    def keys(self, prefix: str) -> list[str]:
        """Keys under `prefix` relative to it, sidecars and the fleet's own objects left out."""
        paginator = self.s3.get_paginator("list_objects_v2")
        return sorted(o["Key"].removeprefix(prefix)
                      for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix)
                      for o in page.get("Contents", ())
                      if not o["Key"].endswith(".scanwatch.json") and "/.scanwatch/" not in o["Key"])

    def placed(self) -> list[str]:
        """Every placed key, with its destination: `clean/a`, `quarantine/b`."""
        return sorted(f"{where}/{key}" for where in ("clean", "quarantine", "failed")
                      for key in self.keys(f"{where}/"))

    def queue_counts(self) -> tuple[int, int]:
        attrs = self.sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["All"])["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])

    def queue_bodies(self, expected: int, timeout_s: float = 15.0) -> list[str]:
        """The bodies of the messages left on the queue, each once, without hiding them: a
        receive that hid a message without returning it (seen with moto) loses nothing."""
        bodies: dict[str, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(bodies) < expected and time.monotonic() < deadline:
            for message in self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10,
                                                    WaitTimeSeconds=1, VisibilityTimeout=0
                                                    ).get("Messages", []):
                bodies[message["MessageId"]] = message["Body"]
        return sorted(bodies.values())
