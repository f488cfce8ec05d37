"""Load scanwatch.yaml: YAML, then expansion, then the models; every problem reported at once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from daemon.config.engines import ENGINE_MODELS
from daemon.config.expansion import expand_tree, join_path
from daemon.config.models import Config
from daemon.errors import ConfigError

__all__ = ["DEFAULT_CONFIG_PATHS", "find_config", "format_loc", "load_config"]

DEFAULT_CONFIG_PATHS = ("/etc/scanwatch/scanwatch.yaml",)
# Engine types of later releases: named in the error instead of "unknown tag".
_PLANNED_ENGINE_TYPES: tuple[str, ...] = ()


def format_loc(loc: tuple[int | str, ...]) -> str:
    """The YAML path (`watches[1].quarantine`) of a pydantic error location."""
    path = ""
    for i, part in enumerate(loc):
        # pydantic puts the discriminator's tag into the location of a union member.
        if i == 2 and loc[0] == "engines" and part in (*ENGINE_MODELS, *_PLANNED_ENGINE_TYPES):
            continue
        path = join_path(path, part)
    return path or "(top level)"


def _describe(error: Mapping[str, Any]) -> str:
    loc = format_loc(tuple(error["loc"]))
    available = ", ".join(ENGINE_MODELS)
    if error["type"] == "union_tag_invalid":
        tag = error.get("ctx", {}).get("tag")
        if tag in _PLANNED_ENGINE_TYPES:
            return (f"{loc}.type: engine type {tag!r} is not available in this version "
                    f"(available: {available})")
        return f"{loc}.type: unknown engine type {tag!r} (available: {available})"
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
    expanded = expand_tree(raw, "", problems)
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
