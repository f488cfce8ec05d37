"""The engine models: one per `type:`, a discriminated union, and the registry read from it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import Field, SecretStr, field_validator, model_validator

from daemon.config.base import SECRET as _SECRET
from daemon.config.base import Model as _Model
from daemon.config.units import Duration, HttpUrl, Size, check_host_port

__all__ = [
    "ENGINE_MODELS",
    "BlazelockEngineConfig",
    "CacheConfig",
    "ClamavEngineConfig",
    "EngineConfig",
    "HttpEngineConfig",
    "MetadefenderEngineConfig",
    "PerceptionPointEngineConfig",
    "WebhookConfig",
    "YaraEngineConfig",
]


class CacheConfig(_Model):
    """The engine's verdict cache by content (docs/engines.md, "Verdict cache")."""

    enabled: bool = Field(default=True, description="reuse this engine's verdict on bytes (same sha256) it "
                                            "already judged with the same signatures")
    clean_ttl: Duration = Field(default=86400.0, ge=0, description="engines that report no signature "
                                "version (the HTTP vendors, a clamd without an official database): "
                                "a clean verdict older than this is not reused")
    max_entries: int = Field(default=100_000, ge=1, description="verdicts kept in the journal for this "
                                                       "engine; the oldest are dropped first")
    shared: bool = Field(default=False, description="fleet watches (docs/fleet.md): share verdicts with the "
                                            "other members through .scanwatch/cache/ in the source "
                                            "bucket; only when the bucket policy lets no one else "
                                            "write there")


class _EngineBase(_Model):
    concurrency: int = Field(2, ge=1, le=256, description="files scanned at once by this engine")
    timeout: Duration = Field(60.0, gt=0, description="per-file scan timeout")
    max_attempts: int = Field(3, ge=1, le=100, description="tries before a file goes to failed")
    max_pending_age: Duration = Field(86400.0, gt=0,
                                      description="how long files wait for an engine that is down "
                                                  "or rate limiting")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="the verdict cache: "
                               "identical bytes are scanned once")
    max_size: Size | None = Field(None, gt=0, examples=["25MiB"],
                                  description="larger files fail as too_large without being sent; "
                                              "none: no limit (docs/engines.md#file-size-limits)")

    @property
    def reads_s3_by_path(self) -> bool:
        """True when the engine reads an S3 source by bucket/key: the key must be a private snapshot."""
        return False

    @property
    def cheap_rescan_bytes(self) -> int:
        """Up to this size, scanning copies that arrive together twice costs less than a
        verdict-cache flight (a journal transaction under the writers' lock) for every file:
        0, none, unless the engine scans in-process or on this host (docs/engines.md)."""
        return 0


class HttpEngineConfig(_EngineBase):
    """What every HTTP engine has: a request rate, paced (daemon/engines/_pacing.py)."""

    rate_limit: float = Field(160.0, gt=0, description="requests per minute at most; lowered at once "
                              "when the engine throttles (429, 503), raised slowly after "
                              "(docs/engines.md#rate-limits)")


class YaraEngineConfig(_EngineBase):
    type: Literal["yara"] = Field(description="yara: embedded; the bundled EICAR rule is always on")
    rules: tuple[Path, ...] = Field((), description="YARA rule files added to the bundled EICAR rule")
    max_size: Size | None = Field(512 * 2**20, gt=0, examples=["512MiB"],
                                  description="larger files fail as too_large unscanned; matching maps "
                                              "the file, so this bounds the memory a scan takes")

    @property
    def cheap_rescan_bytes(self) -> int:
        return 1 << 20  # a 4 KB file: ~50 µs to match (bench/RESULTS.md, "Issue 21")


class ClamavEngineConfig(_EngineBase):
    type: Literal["clamav"] = Field(description="clamav: a running clamd (Debian: clamav-daemon)")
    concurrency: int = Field(2, ge=1, le=256, description="files scanned at once by this engine; "
                                                         "unset: clamd's MaxThreads, asked at start "
                                                         "and reload (2 if clamd does not answer)")
    socket: Path | None = Field(None, description="clamd's unix socket (set socket or address, not both)",
                                examples=["/run/clamav/clamd.ctl"])
    address: str | None = Field(None, description="clamd's TCP host:port, instead of socket",
                                examples=["127.0.0.1:3310"])
    mode: Literal["auto", "path", "stream"] = Field(
        "auto", description="auto: clamd scans the descriptor scanwatch hashed (FILDES) on a unix "
                            "socket, else the bytes are streamed (INSTREAM); stream: INSTREAM; "
                            "path: clamd opens the file by name (SCAN)")
    max_size: Size | None = Field(25 * 2**20, gt=0, examples=["100MiB"],
                                  description="larger files fail as too_large without being sent: "
                                              "clamd answers OK for what is past its MaxFileSize, "
                                              "MaxScanSize and StreamMaxLength, so keep this at or "
                                              "below them (Debian: 25M) and raise both together")

    @property
    def cheap_rescan_bytes(self) -> int:
        """A clamd on this host's unix socket: a copy of 256 KiB costs it ~1 ms of CPU to scan
        again (4 KB: ~0.3 ms), a flight ~0.06 ms for every file; over TCP (maybe another host,
        the bytes streamed) every file takes its flight (bench/RESULTS.md, "Issue 21: clamd")."""
        return 256 * 1024 if self.socket is not None else 0

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        return None if value is None else check_host_port(value)

    @model_validator(mode="after")
    def _one_endpoint(self) -> ClamavEngineConfig:
        if (self.socket is None) == (self.address is None):
            raise ValueError("set exactly one of socket (a unix socket path) or address (host:port)")
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


class BlazelockEngineConfig(HttpEngineConfig):
    type: Literal["blazelock"] = Field(description="blazelock: upload only; the external reference ID "
                                       "resumes scans")
    url: HttpUrl = Field(description="API base URL", examples=["https://api.blazelock.example"])
    api_key: SecretStr = Field(description=f"Bearer API key; {_SECRET}", examples=["${BLAZELOCK_API_KEY}"])
    mode: Literal["async", "sync"] = Field("async", description="sync: answer in the upload request "
                                                               "(10 MB max; larger files go async)")
    reuse_max_age: Duration = Field(86400.0, description="an older scan of the same ID is redone as <id>.2")
    max_size: Size | None = Field(100_000_000, gt=0, examples=["100MB"],
                                  description="larger files fail as too_large without a request "
                                              "(Blazelock's documented limit: 100 MB)")
    poll_interval: Duration = Field(2.0, gt=0, description="between polls of a running scan; 10x slower "
                                    "(60 s at most) while webhooks arrive")
    webhook: WebhookConfig | None = Field(None, description="receive signed file_scan events (set "
                                          "<public_url>/webhooks/<engine> in Blazelock); polling slows "
                                          "while they arrive")


class PerceptionPointEngineConfig(HttpEngineConfig):
    type: Literal["perception_point"] = Field(description="perception_point: the X-Ray files API; "
                                              "uploads, or S3 objects by path or link")
    url: HttpUrl = Field(description="API base URL (api., api.eu. or api.aus.)",
                         examples=["https://api.perception-point.io"])
    token: SecretStr = Field(description=f"API token (Authorization: Token); {_SECRET}",
                             examples=["${PP_TOKEN}"])
    storage: str | None = Field(None, description="the storage Perception Point reads S3 from: "
                                "objects are sent as `path` naming a private server-side snapshot "
                                "that only scanwatch can write (docs/integrity.md)",
                                examples=["s3"])
    download_link: bool = Field(False, description="s3:// sources of a versioned bucket are sent as a "
                                                   "presigned GET URL of their version instead of "
                                                   "uploaded (not with storage)")
    suspicious: Literal["quarantine", "clean", "failed"] = Field(
        "quarantine", description="where SUS and SPM verdicts go: quarantine, clean or failed")
    poll_interval: Duration = Field(5.0, gt=0, description="between polls of a running scan")
    rate_limit: float = Field(1200.0, gt=0, description="requests per minute at most; lowered at once "
                              "when the engine throttles (429, 503), raised slowly after")
    max_size: Size | None = Field(500_000_000, gt=0, examples=["500MB"],
                                  description="larger files fail as too_large without a request "
                                              "(the files API's documented limit: 500 MB)")
    callback: WebhookConfig | None = Field(None, description="ask for a callback when a scan ends; "
                                           "polling slows while they arrive")

    @property
    def reads_s3_by_path(self) -> bool:
        return self.storage is not None

    @model_validator(mode="after")
    def _one_s3_mode(self) -> PerceptionPointEngineConfig:
        if self.storage is not None and self.download_link:
            raise ValueError("set storage or download_link, not both")
        return self


class MetadefenderEngineConfig(HttpEngineConfig):
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
    rate_limit: float = Field(6000.0, gt=0, description="requests per minute at most; lowered at once "
                              "when Core throttles (503, 403 scan limit), raised slowly after")

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
