"""Scan engines, by config `type`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from daemon.config import Config
from daemon.engines.base import Engine, ScanRequest
from daemon.engines.blazelock import BlazelockEngine
from daemon.engines.clamav import ClamavEngine
from daemon.engines.metadefender import MetadefenderEngine
from daemon.engines.perception_point import PerceptionPointEngine
from daemon.engines.yara import YaraEngine

__all__ = ["ENGINE_TYPES", "Engine", "ScanRequest", "build_engines"]

ENGINE_TYPES: dict[str, Callable[[str, Any], Engine]] = {
    "yara": YaraEngine,
    "clamav": ClamavEngine,
    "blazelock": BlazelockEngine,
    "perception_point": PerceptionPointEngine,
    "metadefender": MetadefenderEngine,
}


def build_engines(config: Config) -> dict[str, Engine]:
    """One engine per `engines:` entry (ConfigError if one cannot be set up)."""
    return {name: ENGINE_TYPES[cfg.type](name, cfg) for name, cfg in config.engines.items()}
