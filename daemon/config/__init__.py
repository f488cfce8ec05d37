"""The config: schema (models), units, `${...}` expansion, the loader and the generated example."""

from daemon.config.engines import (
    ENGINE_MODELS,
    BlazelockEngineConfig,
    CacheConfig,
    ClamavEngineConfig,
    EngineConfig,
    HttpEngineConfig,
    MetadefenderEngineConfig,
    PerceptionPointEngineConfig,
    WebhookConfig,
    YaraEngineConfig,
)
from daemon.config.loader import DEFAULT_CONFIG_PATHS, find_config, format_loc, load_config
from daemon.config.models import (
    DEFAULT_IGNORE,
    IN_PLACE,
    Config,
    EventsConfig,
    LogConfig,
    MetricsConfig,
    NotifyConfig,
    S3Config,
    WatchConfig,
)
from daemon.config.units import Duration, HttpUrl, SecretHttpUrl, Size, parse_duration, parse_size

__all__ = [
    "DEFAULT_CONFIG_PATHS",
    "DEFAULT_IGNORE",
    "ENGINE_MODELS",
    "BlazelockEngineConfig",
    "CacheConfig",
    "ClamavEngineConfig",
    "Config",
    "Duration",
    "EngineConfig",
    "EventsConfig",
    "HttpEngineConfig",
    "HttpUrl",
    "IN_PLACE",
    "LogConfig",
    "MetadefenderEngineConfig",
    "MetricsConfig",
    "NotifyConfig",
    "PerceptionPointEngineConfig",
    "S3Config",
    "SecretHttpUrl",
    "Size",
    "WatchConfig",
    "WebhookConfig",
    "YaraEngineConfig",
    "find_config",
    "format_loc",
    "load_config",
    "parse_duration",
    "parse_size",
]
