"""``serve --ray`` without a cluster: the config, the GPUs an engine asks for, and a move asked of a
stream that ended while its destination came up. (The cluster itself, with real engines:
integration_tests/test_serve_ray.py.)"""

from __future__ import annotations

import asyncio

import pytest

from loader_plugins.errors import ConfigError
from loader_plugins.serve.catalog import ModelSpec, RaySpec, ServerSpec, parse_catalog, with_ray
from loader_plugins.serve.local import LocalEngine
from loader_plugins.serve.metrics import Metrics
from loader_plugins.serve.migration import Migrations
from loader_plugins.serve.ray_node import gpus_wanted

MODELS = {"models": {"m": "/models/m"}}


def test_ray_in_the_config_replaces_the_servers():
    catalog = parse_catalog({**MODELS, "budget": "1GiB",
                             "ray": {"address": "10.0.0.2:6379", "cache_dir": "/var/cache/s", "gpu_fraction": 0.25}})
    assert catalog.servers == {}
    assert catalog.ray == RaySpec(address="10.0.0.2:6379", cache_dir="/var/cache/s", gpu_fraction=0.25)
    plain = parse_catalog({**MODELS, "budget": "1GiB"})
    assert plain.ray is None and list(plain.servers) == ["local"]
    moved = with_ray(plain, "auto")
    assert moved.servers == {} and moved.ray == RaySpec(address="auto")


@pytest.mark.parametrize("ray, message", [
    ({"adress": "auto"}, "unknown key(s) 'adress'"),
    ({"address": ""}, "ray.address must be a non-empty string"),
    ({"gpu_fraction": 0}, "ray.gpu_fraction must be a number in (0, 1]"),
    ({"gpu_fraction": 2}, "ray.gpu_fraction must be a number in (0, 1]"),
    ({"poll_seconds": -1}, "ray.poll_seconds must be a positive number"),
    ("auto", "ray must be a mapping"),
])
def test_a_bad_ray_entry_is_refused_by_name(ray, message):
    with pytest.raises(ConfigError, match=None) as caught:
        parse_catalog({**MODELS, "ray": ray})
    assert message in str(caught.value)


def test_ray_and_servers_together_are_refused():
    with pytest.raises(ConfigError, match="give 'servers' or 'ray', not both"):
        parse_catalog({**MODELS, "ray": {}, "servers": {"a": {"budget": 1}}})


@pytest.mark.parametrize("args, gpus", [
    ((), 1),
    (("--tensor-parallel-size", "4"), 4),
    (("--tensor-parallel-size=2", "-pp", "2"), 4),
    (("-tp", "8", "--pipeline-parallel-size=2"), 16),
    (("--max-model-len", "4096"), 1),
])
def test_an_engine_asks_for_tensor_times_pipeline_parallel_gpus(args, gpus):
    assert gpus_wanted(ModelSpec(name="m", checkpoint="/m", args=args)) == gpus


def test_a_move_asked_of_a_stream_that_ended_is_given_up_at_once(tmp_path):
    source = LocalEngine(ModelSpec(name="m", checkpoint="/m"), tmp_path, ServerSpec(name="a", budget=1))
    target = LocalEngine(ModelSpec(name="m", checkpoint="/m"), tmp_path, ServerSpec(name="b", budget=1))
    released = []
    migrations = Migrations(lambda name, exclude=None: None, released.append, Metrics())
    flight = migrations.track({"model": "m", "prompt": "x", "stream": True}, source, "/v1/completions")
    assert migrations.streams(source) == [flight]
    migrations.finish(flight, source)          # it ended while the destination started
    reports = asyncio.run(migrations.move([flight], target, timeout=30))
    assert reports == [{"abandoned": "the request ended before it could move"}]
    assert target.inflight == 0 and released == [source]
