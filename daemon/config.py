"""The one schema of scanwatch.yaml, and the loader that reports every problem at once."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from daemon.errors import ConfigError
from daemon.s3 import S3Url, is_s3

__all__ = [
    "DEFAULT_CONFIG_PATHS",
    "DEFAULT_IGNORE",
    "EventsConfig",
    "BlazelockEngineConfig",
    "ClamavEngineConfig",
    "Config",
    "EngineConfig",
    "MetadefenderEngineConfig",
    "NotifyConfig",
    "PerceptionPointEngineConfig",
    "WatchConfig",
    "WebhookConfig",
    "YaraEngineConfig",
    "find_config",
    "load_config",
    "parse_duration",
    "parse_size",
]

DEFAULT_CONFIG_PATHS = ("/etc/scanwatch/scanwatch.yaml",)
DEFAULT_IGNORE = (".*", "*.part", "*.tmp", "*.crdownload", "*.swp")
# Engine types of later releases: named in the error instead of "unknown tag".
_PLANNED_ENGINE_TYPES: tuple[str, ...] = ()
_ENGINE_TYPES = ("yara", "clamav", "blazelock", "perception_point", "metadefender")

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as `30s`, `5m`, `2h`, `1d`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30, 30s, 5m, 2h or 1d")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)):
        seconds = float(m[1]) * _DURATION_UNITS[m[2] or "s"]
    else:
        raise ValueError("expected a duration such as 30, 30s, 5m, 2h or 1d")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from a number or a string such as `10MB` (decimal) or `10MiB` (binary)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1048576, 10MB or 10MiB")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)):
        unit = m[2].upper()
        if unit in _SIZE_UNITS:
            return int(float(m[1]) * _SIZE_UNITS[unit])
    raise ValueError("expected a size such as 1048576, 10MB or 10MiB")


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LogConfig(_Model):
    format: Literal["json", "console"] = Field(default="json", description="json or console lines")
    level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="lowest level")


class S3Config(_Model):
    endpoint_url: str | None = Field(default=None, description="for S3-compatible stores",
                                     examples=["http://127.0.0.1:8333"])
    region: str | None = Field(default=None, examples=["us-east-1"])
    profile: str | None = Field(default=None, description="a named profile of the AWS config files",
                                examples=["drop-account"])
    multipart_threshold: Size = Field(default=5 * 2**30, gt=0,
                                      description="server-side copies above this use multipart copy")
    multipart_chunksize: Size = Field(default=8 * 2**20, ge=5 * 2**20,
                                      description="part size of multipart uploads and copies")

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str | None) -> str | None:
        import boto3  # only here: most configs never need it

        if value is not None and value not in boto3.session.Session().available_profiles:
            raise ValueError(f"no profile {value!r} in the AWS config files")
        return value


class EventsConfig(_Model):
    sqs_queue_url: str = Field(description="SQS queue that receives the bucket's S3 event notifications")
    endpoint_url: str | None = Field(None, description="for SQS-compatible services")
    region: str | None = Field(None, description="default: s3.region, else the queue URL's")


class MetricsConfig(_Model):
    listen: str = Field(description="host:port of the Prometheus endpoint", examples=["127.0.0.1:9477"])

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected host:port, e.g. 127.0.0.1:9477")
        return value


class NotifyConfig(_Model):
    webhook: SecretStr = Field(description="URL that receives a JSON POST per infected or failed file")
    timeout: Duration = Field(10.0, gt=0, description="per-request timeout")
    max_attempts: int = Field(5, ge=1, le=50, description="tries per event before it is dropped")

    @field_validator("webhook")
    @classmethod
    def _http_url(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return value


class _EngineBase(_Model):
    concurrency: int = Field(2, ge=1, le=256, description="files scanned at once by this engine")
    timeout: Duration = Field(60.0, gt=0, description="per-file scan timeout")
    max_attempts: int = Field(3, ge=1, le=100, description="tries before a file fails")
    max_pending_age: Duration = Field(86400.0, gt=0,
                                      description="how long files wait for an engine that is down")


class YaraEngineConfig(_EngineBase):
    type: Literal["yara"]
    rules: tuple[Path, ...] = Field((), description="YARA rule files added to the bundled EICAR rule")
    max_size: Size = Field(512 * 2**20, gt=0, examples=["512MiB"],
                           description="larger files fail as too_large unscanned; matching maps "
                                       "the file, so this bounds the memory a scan takes")


class ClamavEngineConfig(_EngineBase):
    type: Literal["clamav"]
    socket: Path | None = Field(None, description="clamd's unix socket", examples=["/run/clamav/clamd.ctl"])
    address: str | None = Field(None, description="clamd's TCP host:port", examples=["127.0.0.1:3310"])
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


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// URL")
    return value


class WebhookConfig(_Model):
    """A vendor's scan-finished notifications: they make a file's next poll due now."""

    listen: str = Field(description="host:port the receiver binds (one server per address)",
                        examples=["127.0.0.1:9480"])
    secret: SecretStr = Field(description="shared secret: Blazelock's signing secret, or the header "
                                          "value Perception Point sends back; use ${file:...}")
    public_url: str | None = Field(None, description="where the vendor reaches the receiver (a "
                                   "reverse proxy); default http://<listen>", examples=[
                                       "https://scanwatch.example/hooks"])

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        return MetricsConfig._host_port(value)

    @field_validator("secret")
    @classmethod
    def _not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value)


class BlazelockEngineConfig(_EngineBase):
    type: Literal["blazelock"]
    url: str = Field(description="API base URL", examples=["https://api.blazelock.example"])
    api_key: SecretStr = Field(description="Bearer API key; use ${ENV} or ${file:...}")
    mode: Literal["async", "sync"] = Field("async", description="sync: answer in the upload request "
                                                               "(10 MB max; larger files go async)")
    reuse_max_age: Duration = Field(86400.0, description="older scans of the same ID are redone")
    rate_limit: float = Field(160.0, gt=0, description="requests per minute, client side")
    poll_interval: Duration = Field(2.0, gt=0, description="between polls of a running scan")
    webhook: WebhookConfig | None = Field(None, description="receive signed file_scan events (set "
                                          "<public_url>/webhooks/<engine> in Blazelock); polling slows "
                                          "while they arrive")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return value


class PerceptionPointEngineConfig(_EngineBase):
    type: Literal["perception_point"]
    url: str = Field(description="API base URL", examples=["https://api.perception-point.io"])
    token: SecretStr = Field(description="API token (Authorization: Token); use ${ENV} or ${file:...}")
    storage: str | None = Field(None, description="the storage name Perception Point reads S3 from: "
                                "s3:// sources are sent by path (bucket/key), not uploaded",
                                examples=["s3"])
    download_link: bool = Field(False, description="s3:// sources are sent as a presigned GET URL "
                                                   "instead of uploaded")
    suspicious: Literal["quarantine", "clean", "failed"] = Field(
        "quarantine", description="where SUS and SPM verdicts go")
    poll_interval: Duration = Field(5.0, gt=0, description="between polls of a running scan")
    callback: WebhookConfig | None = Field(None, description="ask for a callback when a scan ends; "
                                           "polling slows while they arrive")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)

    @model_validator(mode="after")
    def _one_s3_mode(self) -> PerceptionPointEngineConfig:
        if self.storage is not None and self.download_link:
            raise ValueError("set storage (path mode) or download_link, not both")
        return self


class MetadefenderEngineConfig(_EngineBase):
    type: Literal["metadefender"]
    url: str = Field(description="Core's REST API base URL", examples=["http://127.0.0.1:8008"])
    apikey: SecretStr | None = Field(None, description="the apikey header; omit for a Core without "
                                                       "keys; use ${ENV} or ${file:...}")
    rule: str | None = Field(None, pattern=r"^\S(.*\S)?$", description="workflow (rule) name; "
                             "sent instead of user_agent", examples=["multiscan"])
    filepath_map: dict[str, str] = Field(
        default_factory=dict, description="local directory: the same directory as Core sees it; files "
        "under one are sent by path (filepath header), not uploaded", examples=[{"/srv/drop": "/mnt/drop"}])
    max_request_bytes: Size | None = Field(None, gt=0, description="Core's maximum request size: larger "
                                           "files are uploaded in chunks; unset: one request per file",
                                           examples=["100MB"])
    hash_lookup: bool = Field(False, description="ask GET /hash/{sha256} first; a finished clean or "
                                                 "infected result (of `rule`, when set) is used without a "
                                                 "submission")
    poll_interval: Duration = Field(2.0, gt=0, description="between polls of a running scan")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)

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


class WatchConfig(_Model):
    name: str = Field(pattern=r"^[a-z0-9_-]+$", max_length=64, description="unique watch name")
    source: str = Field(description="local directory (or s3://bucket/prefix/) to watch")
    engine: str = Field(description="name of an entry under engines")
    clean: str = Field(description="where clean files go")
    quarantine: str = Field(description="where infected files go")
    failed: str = Field(description="where files without a verdict go")
    ignore: tuple[str, ...] = Field(DEFAULT_IGNORE,
                                    description="basename globs left waiting; replaces the defaults")
    settle_seconds: Duration = Field(2.0, description="size and times unchanged this long = complete")
    rescan_interval: Duration = Field(60.0, gt=0, description="full rescan, the safety net for lost events")
    poll_interval: Duration = Field(30.0, gt=0, description="S3 listing interval (with events: the "
                                    "safety net's, at a tenth of the pace)")
    events: EventsConfig | None = Field(None, description="S3 event notifications through SQS")
    fleet: bool = Field(False, description="any number of daemons may run this watch at once, "
                        "sharing its events queue (docs/fleet.md); needs an s3:// source and events")
    archivepwd: SecretStr | None = Field(None, description="password of encrypted archives, for the engine")
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
                            description="journal and work files; created if missing")
    log: LogConfig = Field(default_factory=LogConfig)
    metrics: MetricsConfig | None = None
    notify: NotifyConfig | None = None
    s3: S3Config = Field(default_factory=S3Config)
    shutdown_timeout: Duration = Field(10.0, description="how long SIGTERM waits for in-flight files")
    engines: dict[str, EngineConfig] = Field(description="scan engines by name")
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


_REF = re.compile(r"\$\{([^{}]*)\}")


def _expand(value: str, loc: str, problems: list[str]) -> str:
    """Resolve `${NAME}` from the environment, then `${file:/path}` from disk."""

    def env(m: re.Match[str]) -> str:
        name = m[1]
        if name.startswith("file:"):
            return m[0]
        if name not in os.environ:
            problems.append(f"{loc}: environment variable {name} is not set")
            return ""
        return os.environ[name]

    def file(m: re.Match[str]) -> str:
        path = m[1].removeprefix("file:")
        try:
            text = Path(path).read_text()
        except OSError as exc:
            problems.append(f"{loc}: cannot read {path}: {exc.strerror}")
            return ""
        return text.removesuffix("\n")

    value = _REF.sub(env, value)
    return re.sub(r"\$\{(file:[^{}]*)\}", file, value)


def _expand_tree(node: object, loc: str, problems: list[str]) -> object:
    if isinstance(node, str):
        return _expand(node, loc, problems)
    if isinstance(node, Mapping):
        return {k: _expand_tree(v, _join(loc, k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_tree(v, f"{loc}[{i}]", problems) for i, v in enumerate(node)]
    return node


def _join(loc: str, key: object) -> str:
    if isinstance(key, int):
        return f"{loc}[{key}]"
    return f"{loc}.{key}" if loc else str(key)


def _format_loc(loc: tuple[int | str, ...]) -> str:
    path = ""
    for i, part in enumerate(loc):
        # pydantic puts the discriminator's tag into the location of a union member.
        if i == 2 and loc[0] == "engines" and part in (*_ENGINE_TYPES, *_PLANNED_ENGINE_TYPES):
            continue
        path = _join(path, part)
    return path or "(top level)"


def _describe(error: Mapping[str, Any]) -> str:
    loc = _format_loc(tuple(error["loc"]))
    if error["type"] == "union_tag_invalid":
        tag = error.get("ctx", {}).get("tag")
        if tag in _PLANNED_ENGINE_TYPES:
            return (f"{loc}.type: engine type {tag!r} is not available in this version "
                    f"(available: {', '.join(_ENGINE_TYPES)})")
        return f"{loc}.type: unknown engine type {tag!r} (available: {', '.join(_ENGINE_TYPES)})"
    if error["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    return f"{loc}: {str(error['msg']).removeprefix('Value error, ')}"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Parse and validate the YAML at `path`; raise ConfigError listing every problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [f"(file): cannot read: {exc}"]) from None
    try:
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        raise ConfigError(source, [f"(file): not valid YAML: {exc}".replace("\n", " ")]) from None
    if not isinstance(raw, dict):
        raise ConfigError(source, ["(top level): expected a mapping of keys such as engines and watches"])
    problems: list[str] = []
    expanded = _expand_tree(raw, "", problems)
    if problems:
        raise ConfigError(source, problems)
    try:
        return Config.model_validate(expanded)
    except ConfigError as exc:
        raise ConfigError(source, exc.problems) from None
    except ValidationError as exc:
        raise ConfigError(source, [_describe(e) for e in exc.errors()]) from None


def find_config(explicit: str | None) -> str:
    """The config path: `--config`, else `$SCANWATCH_CONFIG`, else the system default."""
    if explicit:
        return explicit
    if env := os.environ.get("SCANWATCH_CONFIG"):
        return env
    return DEFAULT_CONFIG_PATHS[0]
