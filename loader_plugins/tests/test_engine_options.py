"""The extra config both engine adapters take (engine_options.py), and the SGLang plugin's
registration where SGLang is absent (the SGLang engine itself: integration_tests/test_sglang.py)."""

from __future__ import annotations

import importlib.util

import pytest

from loader_plugins.engine_options import LoaderOptions, parse_extra_config
from loader_plugins.errors import ConfigError


def test_json_text_and_mappings_give_the_same_options():
    a = parse_extra_config('{"concurrency": 4, "cache_dir": "/c", "weights_uri": "s3://b/m", "in_place": false}')
    b = parse_extra_config({"concurrency": 4, "cache_dir": "/c", "weights_uri": "s3://b/m", "in_place": False})
    assert a == b and a.config.concurrency == 4 and a.config.section("cache").cache_dir == "/c"
    assert parse_extra_config("") == parse_extra_config(None) == LoaderOptions(parse_extra_config({}).config)


@pytest.mark.parametrize("bad, match", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ({"concurency": 1}, r"unknown --model-loader-extra-config key\(s\) 'concurency'; allowed keys are: .*, "
                        r"weights_uri, in_place"),
    ({"in_place": "yes"}, "'in_place' must be true, false or \"auto\""),
    ({"weights_uri": ""}, "'weights_uri' must be a path or s3:// URI"),
])
def test_bad_extra_config_is_refused_with_what_to_do(bad, match):
    with pytest.raises(ConfigError, match=match):
        parse_extra_config(bad)


def test_weights_uri_is_for_the_model_it_came_with_and_a_reload_elsewhere_reads_there():
    options = parse_extra_config({"weights_uri": "s3://bucket/unit-test-model"})
    assert options.location("/models/a") == "s3://bucket/unit-test-model"
    assert options.location("/models/a") == "s3://bucket/unit-test-model"
    assert options.location("/models/new-weights") == "/models/new-weights"     # a reload from another path
    assert parse_extra_config({}).location("/models/a") == "/models/a"


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="SGLang is installed here")
def test_the_sglang_plugin_is_inert_without_sglang():
    import loader_plugins.sglang_adapter as adapter

    adapter.register()
    adapter.register()
    assert adapter._registered is False
    assert adapter._is_streamer(" Streamer ") and not adapter._is_streamer("safetensors")
    assert not adapter._is_streamer(object)


@pytest.mark.parametrize("name", ["sglang-local.json", "sglang-s3.json", "vllm-local.json", "vllm-s3.json"])
def test_every_shipped_extra_config_is_valid(name):
    import json
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "configs" / name).read_text()
    options = parse_extra_config(json.loads(text))
    assert options.config.memory_limit > 0
    assert parse_extra_config(text) == options                     # as SGLang passes it: JSON text
