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
    ({"models": {"a": {"checkpoint": "/m", "args": ["--model-loader-extra-config", "{}"]}}}, "the router sets"),
    ({"models": {"a": {"checkpoint": "/m", "loader": {"concurency": 4}}}}, "unknown"),
    ({"models": {"a": {"checkpoint": "/m", "loader": {"cache_dir": "/c"}}}}, "belong to a server"),
    ({"models": {"a": {"checkpoint": "/m", "loader": {"weights_uri": "s3://b/k"}}}}, "use the model's 'weights'"),
    ({"models": {"a": {"checkpoint": "/m", "loader": {"in_place": "no"}}}}, "true, false or"),
    ({"models": {"a": {"checkpoint": "/m", "weights": 3}}}, "weights must be"),
    ({"models": {"a": "/m"}, "servers": {}}, "at least one server"),
    ({"models": {"a": "/m"}, "servers": {"x/y": {}}}, "without '/'"),
    ({"models": {"a": "/m"}, "servers": {"x": {"cache": "/c"}}}, "unknown key(s) 'cache'"),
    ({"models": {"a": "/m"}, "servers": {"x": {"budget": 0}}}, "must be positive"),
    ({"models": {"a": "/m"}, "servers": {"x": {"url": "10.0.0.6:8700"}}}, "http:// or https://"),
    ({"models": {"a": "/m"}, "servers": {"x": {"url": "http://h:1", "cache_dir": "/c"}}}, "its agent's"),
    ({"models": {"a": "/m"}, "servers": {"x": {"url": "http://h:1", "api_key": ""}}}, "api_key must be"),
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


def test_servers_and_the_extra_config_each_engine_gets(tmp_path):
    catalog = parse_catalog({"budget": "1GiB", "engine": {"loader": {"concurrency": 4}},
                             "servers": {"near": {"cache_dir": "cache/near"},
                                         "far": {"budget": "2GiB", "dram_cache_dir": "/dev/shm/x", "env": {"E": 1}}},
                             "models": {"a": {"checkpoint": "/m", "weights": "s3://b/a/",
                                              "loader": {"s3_endpoint_url": "http://127.0.0.1:1"}},
                                        "b": "/m/b"}}, base=tmp_path)
    near, far = catalog.servers["near"], catalog.servers["far"]
    assert (near.budget, far.budget) == (1 << 30, 2 << 30)   # the top-level budget is each server's default
    assert near.cache_dir == str(tmp_path / "cache/near") and far.env == {"E": "1"}
    assert catalog.extra_config(catalog.models["a"], near) == {
        "concurrency": 4, "s3_endpoint_url": "http://127.0.0.1:1", "cache_dir": str(tmp_path / "cache/near"),
        "weights_uri": "s3://b/a/"}
    assert catalog.extra_config(catalog.models["b"], far) == {"concurrency": 4, "dram_cache_dir": "/dev/shm/x"}
    assert catalog.models["a"].weights_location == "s3://b/a/" and catalog.models["b"].weights_location == "/m/b"
    single = parse_catalog({"models": {"a": "/m"}, "budget": 5})
    assert list(single.servers) == ["local"] and single.servers["local"].budget == 5


def test_a_server_with_a_url_is_another_hosts_agent(monkeypatch):
    monkeypatch.setenv("MODEL_STREAMER_AGENT_KEY", "from-env")
    catalog = parse_catalog({"budget": "1GiB", "models": {"a": "/m"},
                             "servers": {"here": {}, "there": {"url": "http://10.0.0.6:8700"},
                                         "keyed": {"url": "https://h:1", "api_key": "s3cr3t-key", "budget": "3GiB"}}})
    here, there, keyed = (catalog.servers[n] for n in ("here", "there", "keyed"))
    assert (here.url, here.api_key, here.budget) == (None, None, 1 << 30)
    # budget 0: the agent's own, asked when the router connects; the key from the environment
    assert (there.url, there.api_key, there.budget) == ("http://10.0.0.6:8700", "from-env", 0)
    assert (keyed.api_key, keyed.budget) == ("s3cr3t-key", 3 << 30)
    assert "s3cr3t" not in repr(keyed)   # keys stay out of logs
