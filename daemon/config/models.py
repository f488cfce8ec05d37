"""The one schema of scanwatch.yaml: frozen pydantic models with a description and example per key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from daemon.config.base import SECRET as _SECRET
from daemon.config.base import Model as _Model
from daemon.config.engines import EngineConfig
from daemon.config.units import Duration, SecretHttpUrl, Size, check_host_port
from daemon.errors import ConfigError
from daemon.s3url import S3Url, is_s3

__all__ = [
    "DEFAULT_IGNORE",
    "Config",
    "EventsConfig",
    "IN_PLACE",
    "LogConfig",
    "MetricsConfig",
    "NotifyConfig",
    "S3Config",
    "WatchConfig",
]

IN_PLACE = "in_place"  # an S3 source's destination: the object stays at its key, tagged (docs/contract.md)
DEFAULT_IGNORE = (".*", "*.part", "*.tmp", "*.crdownload", "*.swp")


class LogConfig(_Model):
    format: Literal["json", "console"] = Field(default="json", description="json or console lines")
    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="the lowest level logged: debug, info, warning or error")


class S3Config(_Model):
    endpoint_url: str | None = Field(default=None, description="for S3-compatible stores",
                                     examples=["http://127.0.0.1:8333"])
    region: str | None = Field(default=None, description="the buckets' region; unset: boto3's default",
                               examples=["us-east-1"])
    profile: str | None = Field(default=None, description="a named profile of the AWS config files "
                                "(e.g. another account); it must exist", examples=["drop-account"])
    multipart_threshold: Size = Field(default=5 * 2**30, gt=0,
                                      description="server-side copies above this use multipart copy")
    multipart_chunksize: Size = Field(default=8 * 2**20, ge=5 * 2**20,
                                      description="part size of multipart uploads and copies (5MiB at least)")
    snapshot_threshold: Size = Field(
        default=64 * 2**20, ge=0, description="unversioned buckets: objects up to this are promoted from "
        "the copy scanwatch downloaded and scanned; larger ones from a server-side snapshot under "
        "<source prefix>.scanwatch/ (docs/integrity.md, \"S3 objects\")")

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str | None) -> str | None:
        from daemon.s3client import profile_names  # only here: most configs never need boto3

        if value is not None and value not in profile_names():
            raise ValueError(f"no profile {value!r} in the AWS config files")
        return value


class EventsConfig(_Model):
    sqs_queue_url: str = Field(description="SQS queue that receives the bucket's S3 event notifications",
                               examples=["https://sqs.eu-west-1.amazonaws.com/123456789012/scanwatch-uploads"])
    endpoint_url: str | None = Field(None, description="for SQS-compatible services")
    region: str | None = Field(None, description="default: s3.region, else the queue URL's")
    visibility_timeout: Duration = Field(60.0, ge=1, le=43_200, description="a received message stays "
                                         "invisible this long, extended while its objects are in "
                                         "flight; a dead fleet member's messages come back after it")


class MetricsConfig(_Model):
    listen: str = Field(description="host:port of the Prometheus endpoint", examples=["127.0.0.1:9477"])

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        return check_host_port(value)


class JournalConfig(_Model):
    keep: Duration | None = Field(default=90 * 86400.0, gt=0, examples=["90d"],
                                  description="how long the journal keeps a finished file's row after "
                                  "its last change; files in quarantine are kept until released or "
                                  "deleted, and `status` still counts the rows removed; null: forever")


class NotifyConfig(_Model):
    webhook: SecretHttpUrl = Field(description=f"URL that receives a JSON POST per infected or failed file; "
                                   f"{_SECRET}",
                                   examples=["${file:${CREDENTIALS_DIRECTORY}/alert_webhook_url}"])
    timeout: Duration = Field(10.0, gt=0, description="per-request timeout")
    max_attempts: int = Field(5, ge=1, le=50, description="tries per event; then it is dropped and "
                              "`alert.failed` logged")


class WatchConfig(_Model):
    name: str = Field(pattern=r"^[a-z0-9_-]+$", max_length=64, examples=["invoices"],
                      description="unique watch name, [a-z0-9_-]; part of every external reference ID")
    source: str = Field(description="the local directory (it must exist) or s3://bucket/prefix/ to watch",
                        examples=["/srv/scanwatch/drop/invoices"])
    engine: str | tuple[str, ...] = Field(
        description="name of an entry under engines, or a list of them: every one scans the same "
        "bytes; infected if any says so, clean only if all do (docs/contract.md)",
        examples=["default", ["clam", "md"]])
    clean: str = Field(description="where clean files go; any location may be s3://bucket/prefix/; "
                       "for an s3:// source, any of clean/quarantine/failed may be in_place: "
                       "the object stays at its key, tagged with its verdict",
                       examples=["/srv/scanwatch/clean/invoices"])
    quarantine: str = Field(description="where infected files go: files 0600 in directories 0700; "
                            "objects tagged scanwatch-verdict/-reason, with sidecars",
                            examples=["/srv/scanwatch/quarantine/invoices"])
    failed: str = Field(description="where files without a verdict go; object keys become local paths "
                        "only when safe (else unsafe_key)", examples=["/srv/scanwatch/failed/invoices"])
    ignore: tuple[str, ...] = Field(DEFAULT_IGNORE,
                                    description="basename globs left waiting; replaces the defaults "
                                    "(none for an s3:// source: an object is complete when listed; "
                                    "an ignored key is reported as skipped)")
    settle_seconds: Duration = Field(2.0, description="size and times unchanged this long = complete")
    rescan_interval: Duration = Field(60.0, gt=0, description="full rescan, the safety net for lost events")
    poll_interval: Duration = Field(30.0, gt=0, description="S3 listing interval (with events: the "
                                    "safety net's, at a tenth of the pace)")
    events: EventsConfig | None = Field(None, description="S3 event notifications through SQS (direct, "
                                        "via SNS or EventBridge); only for an s3:// source")
    fleet: bool = Field(False, description="any number of daemons may run this watch at once, "
                        "sharing its events queue (docs/fleet.md); needs an s3:// source and events")
    archivepwd: SecretStr | None = Field(None, description="password of encrypted archives, sent to "
                                         f"engines that open them; {_SECRET}",
                                         examples=["${ARCHIVE_PASSWORD}"])
    s3: S3Config | None = Field(None, description="this watch's S3 settings: the keys given here "
                                "replace those of the top-level s3:")

    @field_validator("source", "clean", "quarantine", "failed")
    @classmethod
    def _location(cls, value: str) -> str:
        if value == IN_PLACE:
            return value
        if is_s3(value):
            return str(S3Url.parse(value))
        if not value.strip():
            raise ValueError("must be a directory path")
        return os.path.abspath(os.path.expanduser(value))

    @model_validator(mode="before")
    @classmethod
    def _s3_ignores_nothing(cls, data: Any) -> Any:
        """An S3 object is complete once listed: no default globs (docs/contract.md, "Ignored names")."""
        if isinstance(data, dict) and "ignore" not in data and is_s3(str(data.get("source", ""))):
            return {**data, "ignore": ()}
        return data

    @model_validator(mode="after")
    def _events_need_s3(self) -> WatchConfig:
        if self.events is not None and not is_s3(self.source):
            raise ValueError("events: only an s3:// source has S3 event notifications")
        if self.s3 is not None and not any(map(is_s3, (self.source, *self.destinations.values()))):
            raise ValueError("s3: this watch has no s3:// location")
        return self

    @model_validator(mode="after")
    def _in_place_needs_s3(self) -> WatchConfig:
        if self.source == IN_PLACE:
            raise ValueError("source: in_place is a destination, not a source")
        for key, dest in self.destinations.items():
            if dest == IN_PLACE and not is_s3(self.source):
                raise ValueError(f"{key}: in_place needs an s3:// source (objects are tagged where "
                                 "they are); a local file is moved")
        return self

    @model_validator(mode="after")
    def _fleet_needs_events(self) -> WatchConfig:
        if self.fleet and not is_s3(self.source):
            raise ValueError("fleet: only an s3:// source can be shared by several daemons; "
                             "a local folder is watched by one daemon")
        if self.fleet and self.events is None:
            raise ValueError("fleet: needs events: {sqs_queue_url: ...}: the queue is what the "
                             "daemons share")
        return self

    @field_validator("engine")
    @classmethod
    def _engine_names(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        if isinstance(value, tuple):
            if not value:
                raise ValueError("name at least one engine")
            if len(set(value)) != len(value):
                raise ValueError("an engine is listed twice")
        return value

    @property
    def engines(self) -> tuple[str, ...]:
        """The names of the engines that scan this watch's files, in the order given."""
        return (self.engine,) if isinstance(self.engine, str) else self.engine

    @property
    def engine_label(self) -> str:
        """The engines as logs, metrics' file timings and sidecars name them: `clam+md`."""
        return "+".join(self.engines)

    @property
    def destinations(self) -> dict[str, str]:
        """The three destinations by field name."""
        return {"clean": self.clean, "quarantine": self.quarantine, "failed": self.failed}


class Config(_Model):
    state_dir: Path = Field(Path("/var/lib/scanwatch"),
                            description="journal (SQLite, WAL) and work files; created if missing")
    log: LogConfig = Field(default_factory=LogConfig, description="log lines on stdout")
    metrics: MetricsConfig | None = Field(None, description="Prometheus text at /metrics, readiness at "
                                          "/healthz; omit to turn off")
    notify: NotifyConfig | None = Field(None, description="a JSON POST per infected or failed file; "
                                        "omit to turn off")
    journal: JournalConfig = Field(default_factory=JournalConfig, description="the journal's history "
                                   "(docs/operations.md, \"Journal retention\")")
    s3: S3Config = Field(default_factory=S3Config, description="settings of every s3:// location; "
                         "boto3's usual credential chain applies")
    shutdown_timeout: Duration = Field(10.0, description="how long SIGTERM waits for in-flight files")
    workers: int | None = Field(None, ge=1, le=64, examples=[4],
                                description="scanning/moving processes; omitted: the number of "
                                "CPUs, at most 8; 1 scans in the daemon's own process")
    engines: dict[str, EngineConfig] = Field(description="scan engines by name; `type` picks the engine")
    watches: tuple[WatchConfig, ...] = Field(description="what to watch and where files go")

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return Path(os.path.abspath(os.path.expanduser(value)))

    @model_validator(mode="after")
    def _cross_references(self) -> Config:
        problems: list[str] = []
        if not self.engines:
            problems.append("engines: define at least one engine, e.g. {default: {type: yara}}")
        if not self.watches:
            problems.append("watches: define at least one watch")
        seen_names: dict[str, int] = {}
        for i, watch in enumerate(self.watches):
            where = f"watches[{i}]"
            if watch.name in seen_names:
                first = seen_names[watch.name]
                problems.append(f"{where}.name: {watch.name!r} is already used by watches[{first}]")
            seen_names.setdefault(watch.name, i)
            for name in watch.engines:
                if name not in self.engines:
                    defined = ", ".join(sorted(self.engines))
                    problems.append(f"{where}.engine: no engine named {name!r} (defined: {defined})")
            for key, dest in watch.destinations.items():
                if dest != IN_PLACE and _overlaps(watch.source, dest):
                    problems.append(f"{where}.source: overlaps its own {key} destination {dest}; "
                                    "a destination must lie outside the source")
            for j, other in enumerate(self.watches[:i]):
                if _overlaps(watch.source, other.source):
                    problems.append(f"{where}.source: overlaps watches[{j}].source ({other.source}); "
                                    "each file must belong to one watch")
            if not is_s3(watch.source) and not os.path.isdir(watch.source):
                problems.append(f"{where}.source: directory {watch.source} does not exist")
        for name, engine in self.engines.items():
            for key in ("webhook", "callback"):
                receiver = getattr(engine, key, None)
                if self.metrics and receiver and _same_socket(receiver.listen, self.metrics.listen):
                    problems.append(f"engines.{name}.{key}.listen: {receiver.listen} is taken by "
                                    f"metrics.listen ({self.metrics.listen}); give each its own port")
        if problems:
            raise ConfigError("config", problems)
        return self

    def worker_count(self) -> int:
        """How many worker processes scan and move (`workers`, docs/operations.md "Throughput")."""
        return self.workers or min(os.cpu_count() or 1, 8)

    def watch(self, name: str) -> WatchConfig:
        """The watch called `name` (KeyError if none)."""
        for watch in self.watches:
            if watch.name == name:
                return watch
        raise KeyError(name)

    def s3_for(self, watch: WatchConfig) -> S3Config:
        """The S3 settings of `watch`: the top-level ones with the watch's own on top."""
        if watch.s3 is None:
            return self.s3
        return self.s3.model_copy(update=watch.s3.model_dump(exclude_unset=True))


def _same_socket(a: str, b: str) -> bool:
    """Whether two host:port listen addresses cannot both be bound."""
    (host_a, _, port_a), (host_b, _, port_b) = a.rpartition(":"), b.rpartition(":")
    wildcard = {"0.0.0.0", "::", "[::]", "*"}
    return port_a == port_b and (host_a == host_b or host_a in wildcard or host_b in wildcard)


def _overlaps(a: str, b: str) -> bool:
    if is_s3(a) or is_s3(b):
        if not (is_s3(a) and is_s3(b)):
            return False
        first, second = S3Url.parse(a), S3Url.parse(b)
        return first.contains(second) or second.contains(first)
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


