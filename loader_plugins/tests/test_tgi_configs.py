"""Every shipped TGI example config (configs/tgi*.env) parses into valid settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from loader_plugins import StreamerConfig
from loader_plugins.tgi_adapter.settings import settings_from_env, streamer_enabled

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("tgi*.env"))

#: what each shipped file must parse to: the config, the weights URI and the options it sets
EXPECTED = {
    "tgi-local.env": {
        "config": StreamerConfig(concurrency=16, memory_limit=4 << 30, direct_io="auto"),
        "weights_uri": None,
        "explicit": {"concurrency", "memory_limit", "direct_io"},
    },
    "tgi-s3.env": {
        "config": StreamerConfig(concurrency=16, memory_limit=4 << 30, s3_region="us-east-1", request_timeout=60,
                                 max_retries=8),
        "weights_uri": "s3://my-bucket/models/Llama-3.1-8B-Instruct/",
        "explicit": {"concurrency", "memory_limit", "s3_region", "request_timeout", "max_retries"},
    },
}


def read_env_file(path: Path) -> dict[str, str]:
    """``docker run --env-file`` syntax: KEY=VALUE lines, ``#`` comments, no quoting."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
            env[key] = value
    return env


def test_there_are_tgi_configs():
    assert {p.name for p in CONFIGS} == set(EXPECTED), "each configs/tgi*.env needs its values in EXPECTED"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    env = read_env_file(path)
    assert streamer_enabled(env)
    settings = settings_from_env(env)
    expected = EXPECTED[path.name]
    assert settings.config == expected["config"]
    assert settings.config.workers() == 16                     # TGI_STREAMER_CONCURRENCY, not the default
    assert settings.weights_uri == expected["weights_uri"]
    assert settings.explicit == expected["explicit"]
