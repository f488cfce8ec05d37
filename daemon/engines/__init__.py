"""Scan engines, by config `type`: the tag comes from each engine's config model (config.ENGINE_MODELS)."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel

from daemon.config import (
    ENGINE_MODELS,
    BlazelockEngineConfig,
    ClamavEngineConfig,
    Config,
    HttpEngineConfig,
    MetadefenderEngineConfig,
    PerceptionPointEngineConfig,
    YaraEngineConfig,
)
from daemon.engines._pacing import Pacer, pacing_path
from daemon.engines.base import Engine, ScanRequest
from daemon.engines.blazelock import BlazelockEngine
from daemon.engines.clamav import ClamavEngine
from daemon.engines.metadefender import MetadefenderEngine
from daemon.engines.perception_point import PerceptionPointEngine
from daemon.engines.yara import YaraEngine

__all__ = ["ENGINE_CLASSES", "ENGINE_TYPES", "Engine", "ScanRequest", "build_engines"]

EngineFactory = Callable[..., Engine]

# The engine class of each config model; tests/test_config.py fails when the two sets differ.
ENGINE_CLASSES: dict[type[BaseModel], EngineFactory] = {
    YaraEngineConfig: YaraEngine,
    ClamavEngineConfig: ClamavEngine,
    BlazelockEngineConfig: BlazelockEngine,
    PerceptionPointEngineConfig: PerceptionPointEngine,
    MetadefenderEngineConfig: MetadefenderEngine,
}
ENGINE_TYPES: dict[str, EngineFactory] = {
    tag: ENGINE_CLASSES[model] for tag, model in ENGINE_MODELS.items() if model in ENGINE_CLASSES
}


def build_engines(config: Config) -> dict[str, Engine]:
    """One engine per `engines:` entry (ConfigError if one cannot be set up).

    An HTTP engine is paced through its state file under state_dir, shared by every
    worker process (daemon/engines/_pacing.py).
    """
    engines: dict[str, Engine] = {}
    for name, cfg in config.engines.items():
        factory = ENGINE_TYPES[cfg.type]
        if isinstance(cfg, HttpEngineConfig):
            pacer = Pacer(name, cfg.rate_limit, pacing_path(config.state_dir, name))
            engines[name] = factory(name, cfg, pacer=pacer)
        else:
            engines[name] = factory(name, cfg)
    return engines
