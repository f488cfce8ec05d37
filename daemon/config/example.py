"""config/example.yaml, rendered from the models: every key, its default, its description above it.

Regenerate with `python -m daemon.config.example > config/example.yaml`; tests/test_config.py
fails when the committed file is stale.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import PurePath
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo

from daemon.config.engines import ENGINE_MODELS
from daemon.config.expansion import join_path
from daemon.config.models import Config, WatchConfig
from daemon.config.units import format_duration, format_size, parse_duration, parse_size

__all__ = ["render_example", "uncommented"]

_HEADER = """\
# Every key scanwatch understands, with its default and what it does. GENERATED from
# daemon/config/models.py: edit the models, then run
#   python -m daemon.config.example > config/example.yaml
# Durations are seconds or 30s / 5m / 2h / 1d; sizes are bytes or 10MB (decimal) / 10MiB
# (binary). ${NAME} expands from the environment, ${file:/path} reads a file (one trailing
# newline dropped), e.g. ${file:${CREDENTIALS_DIRECTORY}/api_key} under systemd.
# Optional sections are commented out: remove one "# " from each of their lines to use them."""
# One engine of each type: (name, type, whether it is commented out).
_ENGINES = (("default", "yara", False), ("blz", "blazelock", False), ("pp", "perception_point", True),
            ("clam", "clamav", False), ("md", "metadefender", True))
# Optional keys shown commented out: alternatives, or needing what a reader may not have.
_COMMENTED = frozenset({"engines.blz.webhook", "engines.clam.address", "watches[0].events",
                        "watches[0].archivepwd", "watches[0].s3"})
_WIDTH = 96


@dataclasses.dataclass(frozen=True)
class _Block:
    """Where a model's keys go: indentation, YAML path, and whether they are commented out."""

    indent: int
    path: str
    comment_at: int | None = None  # column of the "# " that comments the block out
    illustrate: bool = False  # show each key's example rather than its default

    def line(self, text: str) -> str:
        if self.comment_at is None:
            return " " * self.indent + text
        return " " * self.comment_at + "# " + " " * (self.indent - self.comment_at) + text

    def comments(self, text: str) -> list[str]:
        parts = textwrap.wrap(text, max(_WIDTH - self.indent - 2, 40), break_on_hyphens=False)
        return [self.line(f"# {part}") for part in parts]


def render_example() -> str:
    """The text of config/example.yaml."""
    lines = _HEADER.splitlines()
    top = _Block(indent=0, path="")
    for name, info in Config.model_fields.items():
        lines.append("")
        if name == "engines":
            lines += [*top.comments(_description(info)), "engines:", *_engines()]
        elif name == "watches":
            lines += [*top.comments(_description(info)), "watches:", *_watch()]
        else:
            lines += _field(name, info, top)
    return "\n".join(lines) + "\n"


def uncommented(text: str, key: str) -> str:
    """`text` with every commented-out block of `key` (`# key:` and the deeper lines under it) made active."""
    lines, out_lines = text.splitlines(), []
    prefix: str | None = None
    for line in lines:
        if prefix is not None and line.startswith(prefix + "  "):
            out_lines.append(prefix[:-1] + line[len(prefix) + 1:])
            continue
        prefix = None
        if m := re.fullmatch(rf"(\s*)# {re.escape(key)}:", line):
            prefix = m[1] + "#"
            line = f"{m[1]}{key}:"
        out_lines.append(line)
    return "\n".join(out_lines) + "\n"


def _engines() -> list[str]:
    shown = sorted(kind for _, kind, _ in _ENGINES)
    if shown != sorted(ENGINE_MODELS):
        raise RuntimeError(f"the example shows engine types {shown}, the models have {sorted(ENGINE_MODELS)}")
    lines: list[str] = []
    first = _ENGINES[0][0]
    # Keys every engine has, with one default, are shown once, on the first.
    base = ENGINE_MODELS[_ENGINES[0][1]].model_fields
    common = [key for key, info in base.items()
              if key != "type" and all(key in model.model_fields and model.model_fields[key].default
                                       == info.default for model in ENGINE_MODELS.values())]
    for i, (name, kind, commented) in enumerate(_ENGINES):
        block = _Block(indent=2, path="engines", illustrate=True, comment_at=2 if commented else None)
        inner = dataclasses.replace(block, indent=4, path=f"engines.{name}")
        fields = ENGINE_MODELS[kind].model_fields
        lines += [""] if i else []
        lines.append(block.line(f"{name}:"))
        lines += _field("type", fields["type"], inner)
        if i:
            lines += inner.comments(f"and {', '.join(common)} as for {first}")
        for key, info in fields.items():
            if key != "type" and (i == 0 or key not in common):
                lines += _field(key, info, inner)
    return lines


def _watch() -> list[str]:
    block = _Block(indent=4, path="watches[0]", illustrate=True)
    lines = [line for key, info in WatchConfig.model_fields.items() for line in _field(key, info, block)]
    first_key = next(i for i, line in enumerate(lines) if not line.lstrip().startswith("#"))
    # The first key's description sits above the `- `, at its indentation.
    return [line[2:] for line in lines[:first_key]] + ["  - " + lines[first_key][4:], *lines[first_key + 1:]]


def _field(name: str, info: FieldInfo, block: _Block) -> list[str]:
    path = join_path(block.path, name)
    if block.comment_at is None and path in _COMMENTED:
        block = dataclasses.replace(block, comment_at=block.indent, illustrate=True)
    model = _model_of(info.annotation)
    if model is not None:
        inner = dataclasses.replace(block, indent=block.indent + 2, path=path)
        lines = [*block.comments(_description(info)), block.line(f"{name}:")]
        return lines + [line for key, sub in model.model_fields.items() for line in _field(key, sub, inner)]
    value, note = _value(info, block.illustrate)
    return [*block.comments(_description(info) + note), block.line(f"{name}: {value}")]


def _value(info: FieldInfo, illustrate: bool) -> tuple[str, str]:
    """The value shown for a key, and a note on the default or example not shown."""
    example = _yaml(info.examples[0]) if info.examples else None
    if get_origin(info.annotation) is Literal and len(get_args(info.annotation)) == 1:
        example = _yaml(get_args(info.annotation)[0])  # an engine's `type`
    if info.is_required():
        if example is None:
            raise RuntimeError(f"a required key has no example: {info}")
        return example, ""
    default = _yaml(_spelled(info, info.get_default(call_default_factory=True)))
    if example is None or example == default:
        return default, ""
    if default in ("null", "[]", "{}"):
        return (example, "") if illustrate else (default, f"; e.g. {example}")
    return (example, f" (default: {default})") if illustrate else (default, f"; e.g. {example}")


def _spelled(info: FieldInfo, value: Any) -> Any:
    """`value` as one would write it in YAML: units for durations and sizes, lists for tuples."""
    parser = _parser_of(info)
    if parser is parse_duration and isinstance(value, float):
        return format_duration(value)
    if parser is parse_size and isinstance(value, int):
        return format_size(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, tuple):
        return [_spelled(info, v) for v in value]
    return value


def _parser_of(info: FieldInfo) -> Callable[[object], object] | None:
    """parse_duration or parse_size when the key is a Duration or Size (optional or not)."""
    for meta in (*info.metadata, *_annotated_metadata(info.annotation)):
        if isinstance(meta, BeforeValidator) and meta.func in (parse_duration, parse_size):
            return meta.func
    return None


def _annotated_metadata(annotation: Any) -> Iterator[Any]:
    if get_origin(annotation) is Annotated:
        yield from annotation.__metadata__
    for arg in get_args(annotation):
        yield from _annotated_metadata(arg)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model class of a nested section (`X` or `X | None`), else None."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _description(info: FieldInfo) -> str:
    if not info.description:
        raise RuntimeError(f"a key has no description: {info}")
    return info.description


def _yaml(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1000, sort_keys=False)
    return text.removesuffix("\n").removesuffix("\n...")


if __name__ == "__main__":
    sys.stdout.write(render_example())
