"""Scan engines, by config `type`: the tag comes from each engine's config model (config.ENGINE_MODELS)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from daemon.config import (
    ENGINE_MODELS,
    BlazelockEngineConfig,
    ClamavEngineConfig,
    Config,
    MetadefenderEngineConfig,
    PerceptionPointEngineConfig,
    YaraEngineConfig,
)
from daemon.engines.base import Engine, ScanRequest
from daemon.engines.blazelock import BlazelockEngine
from daemon.engines.clamav import ClamavEngine
from daemon.engines.metadefender import MetadefenderEngine
from daemon.engines.perception_point import PerceptionPointEngine
from daemon.engines.yara import YaraEngine

__all__ = ["ENGINE_CLASSES", "ENGINE_TYPES", "Engine", "ScanRequest", "build_engines"]

EngineFactory = Callable[[str, Any], Engine]

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
    """One engine per `engines:` entry (ConfigError if one cannot be set up)."""
    return {name: ENGINE_TYPES[cfg.type](name, cfg) for name, cfg in config.engines.items()}
