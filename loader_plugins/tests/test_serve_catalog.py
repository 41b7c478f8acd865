"""The serve config: what it accepts, what it refuses, and the defaults it fills in."""

from __future__ import annotations

import json

import pytest

from loader_plugins.errors import ConfigError
from loader_plugins.serve.catalog import load_catalog, parse_catalog


def test_models_only_is_enough_and_defaults_fill_the_rest(tmp_path):
    catalog = parse_catalog({"models": {"a": "/m/a", "b": {"checkpoint": "rel/b", "args": ["--max-model-len", 64]}}},
                            base=tmp_path)
    assert catalog.models["a"].checkpoint == "/m/a" and catalog.models["a"].args == ()
    assert catalog.models["b"].checkpoint == str(tmp_path / "rel/b")
    assert catalog.models["b"].args == ("--max-model-len", "64")
    assert catalog.budget > 0 and catalog.idle_timeout == 300.0 and catalog.api_key is None


def test_engine_defaults_are_merged_under_each_model():
    catalog = parse_catalog({"budget": "2GiB", "idle_timeout": 5,
                             "engine": {"args": ["--enforce-eager"], "env": {"A": 1}, "start_timeout": 30},
                             "models": {"a": {"checkpoint": "/m", "args": ["--seed", "1"], "env": {"B": "2"}}}})
    spec = catalog.models["a"]
    assert spec.args == ("--enforce-eager", "--seed", "1") and spec.env == {"A": "1", "B": "2"}
    assert spec.start_timeout == 30.0 and catalog.budget == 2 << 30 and catalog.idle_timeout == 5.0


@pytest.mark.parametrize("raw, message", [
    ({}, "'models' must map"),
    ({"models": {"a": {}}}, "needs 'checkpoint"),
    ({"models": {"a": "/m"}, "budgte": 1}, "unknown key(s) 'budgte'"),
    ({"models": {"a": {"checkpoint": "/m", "argz": []}}}, "unknown key(s) 'argz'"),
    ({"models": {"a": {"checkpoint": "/m", "args": ["--port", "9"]}}}, "the router sets itself"),
    ({"models": {"a": {"checkpoint": "/m", "args": ["--load-format=safetensors"]}}}, "the router sets itself"),
    ({"models": {"a": "/m"}, "budget": "lots"}, "budget"),
    ({"models": {"a": "/m"}, "idle_timeout": -1}, "positive number of seconds"),
    ({"models": {"a": "/m"}, "engine": {"args": "--enforce-eager"}}, "list of command-line words"),
])
def test_bad_configs_say_what_is_wrong(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_catalog(raw)


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "s.yaml").write_text("budget: 1GB\nmodels:\n  a: ckpt/a\n")
    (tmp_path / "s.json").write_text(json.dumps({"models": {"a": "/abs/a"}}))
    assert load_catalog(tmp_path / "s.yaml").models["a"].checkpoint == str(tmp_path / "ckpt/a")
    assert load_catalog(tmp_path / "s.json").models["a"].checkpoint == "/abs/a"
    (tmp_path / "bad.yaml").write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_catalog(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_catalog(tmp_path / "missing.yaml")


def test_shipped_serve_configs_parse():
    from pathlib import Path

    shipped = sorted((Path(__file__).resolve().parents[2] / "configs").glob("serve-*.yaml"))
    assert shipped
    for path in shipped:
        catalog = load_catalog(path)
        assert catalog.models and catalog.budget > 0, path
