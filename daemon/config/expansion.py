"""`${NAME}` from the environment and `${file:/path}` from disk: the one place they are resolved."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

__all__ = ["expand_tree", "join_path"]

_REF = re.compile(r"\$\{([^{}]*)\}")
_FILE_REF = re.compile(r"\$\{(file:[^{}]*)\}")


def expand_tree(node: object, loc: str, problems: list[str]) -> object:
    """`node` with every string expanded; each unresolvable reference appends a problem at its path."""
    if isinstance(node, str):
        return _expand(node, loc, problems)
    if isinstance(node, Mapping):
        return {k: expand_tree(v, join_path(loc, k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_tree(v, f"{loc}[{i}]", problems) for i, v in enumerate(node)]
    return node


def join_path(loc: str, key: object) -> str:
    """The YAML path of `key` under `loc`: `a.b`, `a[1]`."""
    if isinstance(key, int):
        return f"{loc}[{key}]"
    return f"{loc}.{key}" if loc else str(key)


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
    return _FILE_REF.sub(file, value)
