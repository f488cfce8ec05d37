"""The seams between daemon's parts (docs/architecture.md): narrow protocols, no type checks
against our own concrete classes outside their package."""

from __future__ import annotations

import ast
from pathlib import Path

DAEMON = Path(__file__).resolve().parent.parent / "daemon"
_CONCRETE = {"S3Location": "locations", "LocalLocation": "locations"}


def _isinstance_targets(tree: ast.AST) -> set[str]:
    """Class names given to isinstance() anywhere in `tree`."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            for part in ast.walk(node.args[1]):
                if isinstance(part, ast.Name):
                    names.add(part.id)
                elif isinstance(part, ast.Attribute):
                    names.add(part.attr)
    return names


def test_no_isinstance_against_concrete_locations_outside_their_package() -> None:
    found = []
    for path in DAEMON.rglob("*.py"):
        package = path.relative_to(DAEMON).parts[0]
        for name in _isinstance_targets(ast.parse(path.read_text())):
            if _CONCRETE.get(name, package) != package:
                found.append(f"{path.relative_to(DAEMON)}: isinstance(..., {name})")
    assert found == []
