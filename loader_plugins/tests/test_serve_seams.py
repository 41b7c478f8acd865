"""The serve package's seams, checked from the source: one engine interface and its kinds, no
dispatch on the kind, one spelling of the engine states, no private helpers borrowed across
modules, no two classes of one name."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

import loader_plugins.serve as serve_package  # noqa: E402
from loader_plugins.serve.engine import Engine, EngineHost, EngineState  # noqa: E402
from loader_plugins.serve.local import LocalEngine, LocalHost  # noqa: E402
from loader_plugins.serve.remote import AgentEngine, AgentHost  # noqa: E402

SERVE = Path(serve_package.__file__).parent
BENCH = SERVE.parent / "bench" / "serve_bench.py"


def _trees() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text(), str(p)) for p in [*sorted(SERVE.glob("*.py")), BENCH]}


@pytest.mark.parametrize("kind, base", [(LocalEngine, Engine), (AgentEngine, Engine), (LocalHost, EngineHost),
                                        (AgentHost, EngineHost)])
def test_every_kind_implements_its_whole_interface(kind, base):
    assert issubclass(kind, base) and not inspect.isabstract(kind), sorted(getattr(kind, "__abstractmethods__", ()))


def test_no_dispatch_on_the_kind_of_an_engine_or_host():
    kinds = {"Engine", "LocalEngine", "AgentEngine", "EngineHost", "LocalHost", "AgentHost"}
    found = []
    for name, tree in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass") \
                    and len(node.args) == 2:
                named = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                if named & kinds:
                    found.append(f"{name}:{node.lineno}")
    assert found == []


def test_engine_states_are_spelled_once():
    """In the package (a client of the HTTP API, like bench/serve_bench.py, reads the strings)."""
    values = {s.value for s in EngineState}
    compared, spelled = [], []
    for name, tree in _trees().items():
        if name == BENCH.name:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Attribute) and s.attr == "state" for s in sides) and \
                        any(isinstance(s, ast.Constant) and s.value in values for s in sides):
                    compared.append(f"{name}:{node.lineno}")
            if name != "engine.py" and isinstance(node, ast.Constant) and \
                    node.value in {"starting", "swapping_out", "swapped", "swapping_in", "failed"}:
                spelled.append(f"{name}:{node.lineno}")
    assert compared == [] and spelled == []


def test_no_module_borrows_another_modules_private_helpers():
    borrowed = []
    for name, tree in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("loader_plugins")):
                borrowed += [f"{name}:{node.lineno} {a.name}" for a in node.names if a.name.startswith("_")]
    assert borrowed == []


def test_no_two_classes_share_a_name():
    seen: dict[str, str] = {}
    clashes = []
    for name, tree in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                if node.name in seen:
                    clashes.append(f"{node.name} in {seen[node.name]} and {name}")
                seen[node.name] = name
    assert clashes == []
