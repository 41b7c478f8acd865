"""The house's seams, checked from the source: the import graph and the storage registry.

Imports are read with ``ast`` from every module of the package, function-local ones included
(a circle hidden in a function is still a circle); imports under ``if TYPE_CHECKING:`` are
annotations only, never executed, and are left out.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import loader_plugins
from loader_plugins.core.sources import base
from loader_plugins.core.sources.base import register_storage, registered_storages, storage_for
from loader_plugins.errors import ConfigError

PACKAGE = Path(loader_plugins.__file__).parent
#: what the core may import from the rest of the package
CORE_MAY_USE = {"loader_plugins.errors", "loader_plugins.config"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        if "tests" in path.relative_to(PACKAGE).parts:
            continue
        parts = ("loader_plugins",) + path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                       for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    origin = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                # ``from . import x``: the submodule x when it is one, else the package itself
                names = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
            for name in names:
                target = known(name) if name.startswith("loader_plugins") else None
                if target is not None and target != module:
                    graph[module].add(target)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_circles_in_the_import_graph():
    assert _circles(_graph()) == []


def test_the_circle_finder_finds_circles():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_the_core_uses_nothing_above_it():
    graph = _graph()
    core = [m for m in graph if m.startswith("loader_plugins.core")]
    assert len(core) > 10
    outward = {m: sorted(t for t in graph[m] if not t.startswith("loader_plugins.core") and t not in CORE_MAY_USE)
               for m in core}
    assert {m: t for m, t in outward.items() if t} == {}
    # nor by name, in a string for importlib (doc strings may mention what lies above)
    for module in core:
        tree = ast.parse(_modules()[module].read_text())
        docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        strings = [n.value for n in ast.walk(tree)
                   if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]
        named = [s for s in strings if s.startswith("loader_plugins.") and not s.startswith("loader_plugins.core")]
        assert named == [], f"{module} names {named}"


def test_the_cache_is_plugged_in_from_outside_the_core():
    view = registered_storages()
    assert view["s3"] == "loader_plugins.cache.tiered:s3_storage"     # loader_plugins put it there
    assert view["file"] == "loader_plugins.core.sources.local:LocalStorage"
    with pytest.raises(TypeError):
        view["s3"] = "x:y"                                               # a read-only view
    assert base._REGISTRY["s3"][1].startswith("install loader-plugins[s3]")


def test_registering_a_taken_scheme_needs_replace(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    with pytest.raises(ConfigError, match=r"s3:// already has a storage \(loader_plugins.cache.tiered:s3_storage\)"):
        register_storage("s3", "somewhere:else")
    register_storage("s3", "loader_plugins.cache.tiered:s3_storage")     # the same again: fine

    class Memory:
        def __init__(self, config):
            self.config = config

    register_storage("mem", Memory)
    assert registered_storages()["mem"].endswith("Memory")
    assert isinstance(storage_for("mem://x", loader_plugins.StreamerConfig()), Memory)
    register_storage("s3", Memory, replace=True)
    assert registered_storages()["s3"].endswith("Memory")
    for bad in ("S3", "s-3", ""):
        with pytest.raises(ConfigError, match="lower-case letters and digits"):
            register_storage(bad, Memory)
    with pytest.raises(ConfigError, match="callable or a 'module:name'"):
        register_storage("zz", "no-colon")


def test_the_cache_owns_its_config_section():
    from loader_plugins.cache.config import CacheConfig
    from loader_plugins.config import config_fields, config_sections, field_docs

    assert config_sections()["cache"] is CacheConfig                    # registered by loader_plugins
    with pytest.raises(TypeError):
        config_sections()["cache"] = object                              # a read-only view
    core = {f.name for f in dataclasses.fields(loader_plugins.StreamerConfig)}
    cache_keys = ["cache_dir", "cache_max_bytes", "dram_cache_dir", "cache_revalidate"]
    assert not set(cache_keys) & core, "cache options left in the core config"
    assert [f.name for f in config_fields()][-4:] == cache_keys
    assert "disk tier" in field_docs()["cache_dir"]                      # reaches --help like the core's


def test_registering_a_config_section_refuses_clobbering(monkeypatch):
    from loader_plugins import config

    monkeypatch.setattr(config, "_SECTIONS", dict(config._SECTIONS))
    cache_cls = config._SECTIONS["cache"]
    config.register_config_section("cache", cache_cls)                   # the same again: fine

    @dataclasses.dataclass(frozen=True)
    class Other:
        gcs_project: str | None = None
        """The project."""

    with pytest.raises(ConfigError, match="'cache' is already registered by loader_plugins.cache.config.CacheConfig"):
        config.register_config_section("cache", Other)

    @dataclasses.dataclass(frozen=True)
    class Thief:
        cache_dir: str | None = None
        concurrency: int = 1

    with pytest.raises(ConfigError, match=r"cache_dir, concurrency already belong to StreamerConfig, section 'cache'"):
        config.register_config_section("thief", Thief)
    with pytest.raises(ConfigError, match="not a dataclass"):
        config.register_config_section("x", dict)

    config.register_config_section("gcs", Other)
    cfg = loader_plugins.StreamerConfig.from_dict({"gcs_project": "p", "cache_dir": "/c", "concurrency": 2})
    assert cfg.section("gcs") == Other("p") and cfg.section("cache").cache_dir == "/c" and cfg.concurrency == 2
    assert cfg.to_dict()["gcs_project"] == "p" and "gcs_project" in loader_plugins.StreamerConfig.allowed_keys()
    with pytest.raises(ConfigError, match="unknown config key.*'gcs_projekt'.*allowed keys are:.*gcs_project"):
        loader_plugins.StreamerConfig.from_dict({"gcs_projekt": "p"})
    with pytest.raises(ConfigError, match="no config section 'azure' is registered"):
        cfg.section("azure")
    with pytest.raises(ConfigError, match="registered sections"):
        loader_plugins.StreamerConfig(sections=(("gcs", "not a section"),))
