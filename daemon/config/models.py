"""The one schema of scanwatch.yaml: frozen pydantic models with a description and example per key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from daemon.config.units import Duration, HttpUrl, SecretHttpUrl, Size, check_host_port
from daemon.errors import ConfigError
from daemon.s3 import S3Url, is_s3

__all__ = [
    "DEFAULT_IGNORE",
    "ENGINE_MODELS",
    "BlazelockEngineConfig",
    "ClamavEngineConfig",
    "Config",
    "EngineConfig",
    "EventsConfig",
    "LogConfig",
    "MetadefenderEngineConfig",
    "MetricsConfig",
    "NotifyConfig",
    "PerceptionPointEngineConfig",
    "S3Config",
    "WatchConfig",
    "WebhookConfig",
    "YaraEngineConfig",
]

DEFAULT_IGNORE = (".*", "*.part", "*.tmp", "*.crdownload", "*.swp")
_SECRET = "a secret: never logged; use ${ENV} or ${file:...}"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


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

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str | None) -> str | None:
        import boto3  # only here: most configs never need it

        if value is not None and value not in boto3.session.Session().available_profiles:
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


class NotifyConfig(_Model):
    webhook: SecretHttpUrl = Field(description=f"URL that receives a JSON POST per infected or failed file; "
                                   f"{_SECRET}",
                                   examples=["${file:${CREDENTIALS_DIRECTORY}/alert_webhook_url}"])
    timeout: Duration = Field(10.0, gt=0, description="per-request timeout")
    max_attempts: int = Field(5, ge=1, le=50, description="tries per event; then it is dropped and "
                              "`alert.failed` logged")


class _EngineBase(_Model):
    concurrency: int = Field(2, ge=1, le=256, description="files scanned at once by this engine")
    timeout: Duration = Field(60.0, gt=0, description="per-file scan timeout")
    max_attempts: int = Field(3, ge=1, le=100, description="tries before a file goes to failed")
    max_pending_age: Duration = Field(86400.0, gt=0,
                                      description="how long files wait for an engine that is down")


class YaraEngineConfig(_EngineBase):
    type: Literal["yara"] = Field(description="yara: embedded; the bundled EICAR rule is always on")
    rules: tuple[Path, ...] = Field((), description="YARA rule files added to the bundled EICAR rule")
    max_size: Size = Field(512 * 2**20, gt=0, examples=["512MiB"],
                           description="larger files fail as too_large unscanned; matching maps "
                                       "the file, so this bounds the memory a scan takes")


class ClamavEngineConfig(_EngineBase):
    type: Literal["clamav"] = Field(description="clamav: a running clamd (Debian: clamav-daemon)")
    socket: Path | None = Field(None, description="clamd's unix socket (set socket or address, not both)",
                                examples=["/run/clamav/clamd.ctl"])
    address: str | None = Field(None, description="clamd's TCP host:port, instead of socket",
                                examples=["127.0.0.1:3310"])
    mode: Literal["auto", "path", "stream"] = Field(
        "auto", description="auto: clamd scans the descriptor scanwatch hashed (FILDES) on a unix "
                            "socket, else the bytes are streamed (INSTREAM); stream: INSTREAM; "
                            "path: clamd opens the file by name (SCAN)")

    @model_validator(mode="after")
    def _one_endpoint(self) -> ClamavEngineConfig:
        if (self.socket is None) == (self.address is None):
            raise ValueError("set exactly one of socket (a unix socket path) or address (host:port)")
        if self.address is not None:
            MetricsConfig(listen=self.address)  # the same host:port check
        return self


class WebhookConfig(_Model):
    """A vendor's scan-finished notifications: they make a file's next poll due now."""

    listen: str = Field(description="host:port the receiver binds; engines may share one receiver",
                        examples=["127.0.0.1:9480"])
    secret: SecretStr = Field(description="shared secret: Blazelock's signing secret, or the header "
                                          f"value Perception Point sends back; {_SECRET}",
                              examples=["${file:${CREDENTIALS_DIRECTORY}/webhook_secret}"])
    public_url: HttpUrl | None = Field(None, description="where the vendor reaches the receiver (a "
                                       "reverse proxy); default http://<listen>",
                                       examples=["https://scanwatch.example/hooks"])

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        return check_host_port(value)

    @field_validator("secret")
    @classmethod
    def _not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value


class BlazelockEngineConfig(_EngineBase):
    type: Literal["blazelock"] = Field(description="blazelock: upload only; the external reference ID "
                                       "resumes scans")
    url: HttpUrl = Field(description="API base URL", examples=["https://api.blazelock.example"])
    api_key: SecretStr = Field(description=f"Bearer API key; {_SECRET}", examples=["${BLAZELOCK_API_KEY}"])
    mode: Literal["async", "sync"] = Field("async", description="sync: answer in the upload request "
                                                               "(10 MB max; larger files go async)")
    reuse_max_age: Duration = Field(86400.0, description="an older scan of the same ID is redone as <id>.2")
    rate_limit: float = Field(160.0, gt=0, description="requests per minute, client side")
    poll_interval: Duration = Field(2.0, gt=0, description="between polls of a running scan; 10x slower "
                                    "(60 s at most) while webhooks arrive")
    webhook: WebhookConfig | None = Field(None, description="receive signed file_scan events (set "
                                          "<public_url>/webhooks/<engine> in Blazelock); polling slows "
                                          "while they arrive")


class PerceptionPointEngineConfig(_EngineBase):
    type: Literal["perception_point"] = Field(description="perception_point: the X-Ray files API; "
                                              "uploads, or S3 objects by path or link")
    url: HttpUrl = Field(description="API base URL (api., api.eu. or api.aus.)",
                         examples=["https://api.perception-point.io"])
    token: SecretStr = Field(description=f"API token (Authorization: Token); {_SECRET}",
                             examples=["${PP_TOKEN}"])
    storage: str | None = Field(None, description="the storage Perception Point reads S3 from: a "
                                "versioned object is sent as a link pinned to its version, an "
                                "unversioned one uploaded (a bucket/key path pins no version)",
                                examples=["s3"])
    download_link: bool = Field(False, description="s3:// sources of a versioned bucket are sent as a "
                                                   "presigned GET URL of their version instead of "
                                                   "uploaded (not with storage)")
    suspicious: Literal["quarantine", "clean", "failed"] = Field(
        "quarantine", description="where SUS and SPM verdicts go: quarantine, clean or failed")
    poll_interval: Duration = Field(5.0, gt=0, description="between polls of a running scan")
    callback: WebhookConfig | None = Field(None, description="ask for a callback when a scan ends; "
                                           "polling slows while they arrive")

    @model_validator(mode="after")
    def _one_s3_mode(self) -> PerceptionPointEngineConfig:
        if self.storage is not None and self.download_link:
            raise ValueError("set storage or download_link, not both")
        return self


class MetadefenderEngineConfig(_EngineBase):
    type: Literal["metadefender"] = Field(description="metadefender: OPSWAT MetaDefender Core; by path "
                                          "where Core sees the file, else uploaded")
    url: HttpUrl = Field(description="Core's REST API base URL", examples=["http://127.0.0.1:8008"])
    apikey: SecretStr | None = Field(None, description=f"the apikey header; omit for a Core without "
                                     f"keys; {_SECRET}", examples=["${MD_APIKEY}"])
    rule: str | None = Field(None, pattern=r"^\S(.*\S)?$", description="workflow (rule) name; "
                             "sent instead of user_agent", examples=["multiscan"])
    filepath_map: dict[str, str] = Field(
        default_factory=dict, description="local directory: the same directory as Core sees it; files "
        "under one are sent by path (filepath header), not uploaded",
        examples=[{"/srv/scanwatch/drop": "/mnt/drop"}])
    max_request_bytes: Size | None = Field(None, gt=0, description="Core's maximum request size: larger "
                                           "files are uploaded in chunks; unset: one request per file",
                                           examples=["100MB"])
    hash_lookup: bool = Field(False, description="ask GET /hash/{sha256} first; a finished clean or "
                                                 "infected result (of `rule`, when set) is used without a "
                                                 "submission")
    poll_interval: Duration = Field(2.0, gt=0, description="between polls of a running scan")

    @field_validator("filepath_map")
    @classmethod
    def _absolute_prefixes(cls, value: dict[str, str]) -> dict[str, str]:
        mapped = {}
        for local, core in value.items():
            path = os.path.expanduser(local)
            if not os.path.isabs(path):
                raise ValueError(f"{local!r}: expected an absolute local directory")
            if not core.strip():
                raise ValueError(f"{local!r}: expected the path Core sees it as")
            mapped[os.path.normpath(path)] = core
        return mapped


EngineConfig = Annotated[YaraEngineConfig | ClamavEngineConfig | BlazelockEngineConfig
                         | PerceptionPointEngineConfig | MetadefenderEngineConfig,
                         Field(discriminator="type")]


def _engine_models() -> dict[str, type[_EngineBase]]:
    """Each engine model by its `type` tag, read from the discriminated union itself."""
    union = get_args(EngineConfig)[0]
    return {get_args(model.model_fields["type"].annotation)[0]: model for model in get_args(union)}


ENGINE_MODELS: dict[str, type[_EngineBase]] = _engine_models()
class WatchConfig(_Model):
    name: str = Field(pattern=r"^[a-z0-9_-]+$", max_length=64, examples=["invoices"],
                      description="unique watch name, [a-z0-9_-]; part of every external reference ID")
    source: str = Field(description="the local directory (it must exist) or s3://bucket/prefix/ to watch",
                        examples=["/srv/scanwatch/drop/invoices"])
    engine: str = Field(description="name of an entry under engines", examples=["default"])
    clean: str = Field(description="where clean files go; any location may be s3://bucket/prefix/",
                       examples=["/srv/scanwatch/clean/invoices"])
    quarantine: str = Field(description="where infected files go: files 0600 in directories 0700; "
                            "objects tagged scanwatch-verdict/-reason, with sidecars",
                            examples=["/srv/scanwatch/quarantine/invoices"])
    failed: str = Field(description="where files without a verdict go; object keys become local paths "
                        "only when safe (else unsafe_key)", examples=["/srv/scanwatch/failed/invoices"])
    ignore: tuple[str, ...] = Field(DEFAULT_IGNORE,
                                    description="basename globs left waiting; replaces the defaults")
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
        if is_s3(value):
            return str(S3Url.parse(value))
        if not value.strip():
            raise ValueError("must be a directory path")
        return os.path.abspath(os.path.expanduser(value))

    @model_validator(mode="after")
    def _events_need_s3(self) -> WatchConfig:
        if self.events is not None and not is_s3(self.source):
            raise ValueError("events: only an s3:// source has S3 event notifications")
        if self.s3 is not None and not any(map(is_s3, (self.source, *self.destinations.values()))):
            raise ValueError("s3: this watch has no s3:// location")
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
    s3: S3Config = Field(default_factory=S3Config, description="settings of every s3:// location; "
                         "boto3's usual credential chain applies")
    shutdown_timeout: Duration = Field(10.0, description="how long SIGTERM waits for in-flight files")
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
            if watch.engine not in self.engines:
                defined = ", ".join(sorted(self.engines))
                problems.append(f"{where}.engine: no engine named {watch.engine!r} (defined: {defined})")
            for key, dest in watch.destinations.items():
                if _overlaps(watch.source, dest):
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


