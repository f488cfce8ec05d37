"""The seams between daemon's parts (docs/architecture.md): narrow protocols, no type checks
against our own concrete classes outside their package."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
from fakes import FakeLocation

from daemon.locations import (
    CopySource,
    Destination,
    Listable,
    LocalLocation,
    ObjectStore,
    QuarantineStore,
    S3Location,
    Source,
    Tagged,
)

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


def _protocols() -> dict[str, type]:
    """Every Protocol class defined in daemon's modules, by qualified name."""
    import daemon

    found: dict[str, type] = {}
    for info in pkgutil.walk_packages(daemon.__path__, "daemon."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if inspect.isclass(obj) and getattr(obj, "_is_protocol", False) \
                    and obj.__module__.startswith("daemon."):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def _methods(cls: type) -> list[str]:
    """The methods a class asks for, its own and inherited (properties and attributes are not)."""
    return sorted(name for name in dir(cls) if not name.startswith("__")
                  and inspect.isfunction(inspect.getattr_static(cls, name)))


def test_every_protocol_has_at_most_five_methods() -> None:
    protocols = _protocols()
    assert "daemon.locations.base.Source" in protocols and "daemon.engines.base.Engine" in protocols
    wide = {name: _methods(cls) for name, cls in protocols.items() if len(_methods(cls)) > 5}
    assert wide == {}


@pytest.mark.parametrize("protocol", [Source, Destination, QuarantineStore])
@pytest.mark.parametrize("place", [LocalLocation, S3Location, FakeLocation])
def test_every_place_and_the_fake_implement_the_narrow_protocols(place: type, protocol: type) -> None:
    assert [name for name in _methods(protocol) if not callable(getattr(place, name, None))] == []


@pytest.mark.parametrize("capability", [Tagged, Listable, ObjectStore, CopySource])
def test_capabilities_are_s3s_alone(capability: type) -> None:
    assert [name for name in _methods(capability) if not callable(getattr(S3Location, name, None))] == []
    assert not any(callable(getattr(LocalLocation, name, None)) and name != "name"
                   for name in _methods(capability))


# Journal writes of the pipeline's steps outside the loop's `_commit`: only the deliberate ones,
# through `ScanStep.journal_at_once` (docs/integrity.md, "Remote engines").
_STEP_WRITES = {("pipeline/answers.py", "apply"), ("pipeline/answers.py", "apply_scans")}


def test_only_the_loop_and_the_named_exceptions_write_the_journal_in_the_pipeline() -> None:
    found = set()
    for path in (DAEMON / "pipeline").glob("*.py"):
        if path.name == "__init__.py":
            continue  # the loop
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("apply", "apply_scans") \
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "journal":
                found.add((str(path.relative_to(DAEMON)), node.attr))
    assert found == _STEP_WRITES


def _imports(path: Path) -> set[str]:
    """The daemon modules `path` imports from."""
    return {node.module for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("daemon.")}


def test_the_scanners_return_verdicts_and_hold_no_mover_nor_planner() -> None:
    """One way through (docs/architecture.md): a scanner's verdict is planned by the loop,
    and a scanner never reaches for the stage after it."""
    scanners = ("answers.py", "scanning.py", "multi.py")
    reaching = {(name, module) for name in scanners for module in _imports(DAEMON / "pipeline" / name)
                if module in ("daemon.pipeline.moving", "daemon.pipeline.planning")}
    assert reaching == set()


def test_a_location_knows_no_engine() -> None:
    """A place offers the bytes it holds (`ReadBy`); which way an engine reads them is the
    scanner's to say (docs/architecture.md)."""
    found = {(str(path.relative_to(DAEMON)), module) for path in (DAEMON / "locations").glob("*.py")
             for module in _imports(path) if module.startswith("daemon.engines")}
    source = "\n".join(path.read_text() for path in (DAEMON / "locations").glob("*.py"))
    assert found == set() and "engine_reads_s3" not in source and "reads_by_path" not in source
