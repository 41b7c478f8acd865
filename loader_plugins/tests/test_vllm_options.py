"""``--model-loader-extra-config`` for ``--load-format streamer`` (needs vLLM importable)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed")

from loader_plugins import ConfigError, StreamerConfig  # noqa: E402
from loader_plugins.vllm_adapter.loader import parse_extra_config  # noqa: E402


def test_defaults():
    options = parse_extra_config(None)
    assert options.config == StreamerConfig() and options.weights_uri is None and options.in_place == "auto"


def test_every_streamer_key_and_the_adapter_keys():
    options = parse_extra_config({"concurrency": 4, "memory_limit": "1GiB", "weights_uri": "s3://b/m",
                                  "in_place": False})
    assert options.config.concurrency == 4 and options.config.memory_limit == 1 << 30
    assert options.weights_uri == "s3://b/m" and options.in_place is False


def test_unknown_key_names_the_allowed_ones():
    with pytest.raises(ConfigError) as exc:
        parse_extra_config({"concurency": 4})
    message = str(exc.value)
    assert "'concurency'" in message and "concurrency" in message and "weights_uri" in message
    assert "in_place" in message


@pytest.mark.parametrize("extra, words", [
    ({"in_place": "yes"}, "'in_place' must be true, false or \"auto\""),
    ({"weights_uri": ""}, "'weights_uri' must be a path or s3:// URI"),
    ({"weights_uri": 3}, "'weights_uri' must be a path or s3:// URI"),
    ({"direct_io": "maybe"}, "must be one of auto, on, off"),
])
def test_bad_values(extra, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        parse_extra_config(extra)


def test_shipped_configs_parse():
    import json
    from pathlib import Path

    expected = {   # file -> (config, weights_uri, in_place)
        "vllm-local.json": (StreamerConfig(concurrency=8, chunk_bytes=16 << 20, memory_limit=2 << 30,
                                           direct_io="auto"), None, True),
        "vllm-s3.json": (StreamerConfig(concurrency=16, chunk_bytes=16 << 20, memory_limit=2 << 30,
                                        s3_addressing_style="path", request_timeout=30, max_retries=8),
                         "s3://my-bucket/models/Llama-3.1-8B-Instruct", "auto"),
    }
    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("vllm-*.json"))
    assert {p.name for p in configs} == set(expected), "each configs/vllm-*.json needs its values here"
    for path in configs:
        options = parse_extra_config(json.loads(path.read_text()))
        config, weights_uri, in_place = expected[path.name]
        assert options.config == config, path.name
        assert options.weights_uri == weights_uri and options.in_place == in_place, path.name
