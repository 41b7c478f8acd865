"""Every shipped TGI example config (configs/tgi*.env) parses into valid settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from loader_plugins.tgi_adapter.settings import settings_from_env, streamer_enabled

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("tgi*.env"))


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
    assert {p.name for p in CONFIGS} >= {"tgi-local.env", "tgi-s3.env"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    env = read_env_file(path)
    assert streamer_enabled(env)
    settings = settings_from_env(env)
    assert settings.config.workers() >= 1
    if "s3" in path.name:
        assert settings.weights_uri.startswith("s3://")
