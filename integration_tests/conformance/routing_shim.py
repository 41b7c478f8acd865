"""Routing shim (a pytest plugin, ``-p conformance.routing_shim``): the only stand-in in the job.

Before the peer's test modules are imported it replaces the peer's public API with a thin wrapper
around the *target*: the peer's own function/class (``CONFORMANCE_ROUTE=peer``) or ours
(``CONFORMANCE_ROUTE=ours``). The wrapper changes nothing but records which test reached it, so
that a test counts only if it exercises the API we claim to replace. At the end of the session
the node ids that reached it are written as JSON to ``CONFORMANCE_REACHED``.

``CONFORMANCE_SUITE`` says what to route:
  safetensors  safetensors.torch.load_file -> loader_plugins.load_file
  runai        runai_model_streamer[.safetensors_streamer.safetensors_streamer].SafetensorsStreamer
               -> loader_plugins.SafetensorsStreamer
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest

_reached: set[str] = set()
_current_test: str | None = None   # a module global, not thread-local: the peers' tests load from threads
_target_name = ""


def _record() -> None:
    if _current_test is not None:
        _reached.add(_current_test)


def _qualified(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _route_load_file(route: str) -> None:
    import safetensors.torch

    if route == "ours":
        from loader_plugins import load_file as target
    else:
        target = safetensors.torch.load_file

    @functools.wraps(target)
    def load_file(*args, **kwargs):
        _record()
        return target(*args, **kwargs)

    # Replaced on the module: the tests' `from safetensors.torch import load_file` runs after this,
    # and safetensors.torch.load_model looks the name up in the module at call time.
    safetensors.torch.load_file = load_file
    global _target_name
    _target_name = _qualified(target)


def _route_streamer(route: str) -> None:
    import runai_model_streamer
    import runai_model_streamer.safetensors_streamer.safetensors_streamer as peer_module

    if route == "ours":
        from loader_plugins import SafetensorsStreamer as target
    else:
        target = peer_module.SafetensorsStreamer

    class SafetensorsStreamer(target):
        """The target, unchanged, except that making one records the running test."""

        def __init__(self, *args, **kwargs):
            _record()
            super().__init__(*args, **kwargs)

    peer_module.SafetensorsStreamer = SafetensorsStreamer
    runai_model_streamer.SafetensorsStreamer = SafetensorsStreamer
    global _target_name
    _target_name = _qualified(target)


_ROUTES = {"safetensors": _route_load_file, "runai": _route_streamer}


def pytest_configure(config: pytest.Config) -> None:
    route = os.environ["CONFORMANCE_ROUTE"]
    if route not in ("peer", "ours"):
        raise pytest.UsageError(f"CONFORMANCE_ROUTE must be 'peer' or 'ours', not {route!r}")
    _ROUTES[os.environ["CONFORMANCE_SUITE"]](route)


def pytest_itemcollected(item: pytest.Item) -> None:
    # JUnit XML names a test by class and name only; the node id makes the two runs comparable.
    item.user_properties.append(("nodeid", item.nodeid))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    global _current_test
    _current_test = item.nodeid
    try:
        return (yield)
    finally:
        _current_test = None


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = {"target": _target_name, "reached": sorted(_reached)}
    Path(os.environ["CONFORMANCE_REACHED"]).write_text(json.dumps(out, indent=1))
