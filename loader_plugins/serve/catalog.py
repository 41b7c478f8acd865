"""The serving catalogue: which models exist, where they may run, how their engines start.

``model-streamer serve --config serve.yaml`` reads YAML (or JSON)::

    budget: 24GiB          # bytes the resident models may hold; default: 90% of the GPU, else half of RAM
    idle_timeout: 300      # seconds without a request before a model is swapped out to host memory
    servers:               # where engines may run (default: one server, "local", with ``budget``)
      gpu0: {budget: 40GiB, cache_dir: /var/cache/streamer}
      gpu1: {budget: 40GiB, cache_dir: /mnt/nvme/streamer, dram_cache_dir: /dev/shm/streamer}
      host2: {url: "http://10.0.0.6:8700", api_key: "..."}   # another host: its ``model-streamer agent``
    ray:                   # instead of ``servers``: the servers are a Ray cluster's nodes (serve --ray ADDRESS)
      address: auto        # ray.init's address: auto, HOST:PORT or ray://HOST:10001
      cache_dir: /var/cache/streamer       # each node's cache tiers (on that node)
      log_dir: /tmp/model-streamer-ray     # each node's engine logs and records (on that node)
    engine:                # defaults for every model's engine
      args: ["--enforce-eager"]
      env: {}
      loader: {concurrency: 16}     # --model-loader-extra-config keys
      start_timeout: 600
    models:
      llama-8b:
        checkpoint: /models/llama-8b          # config and tokenizer (and the weights, unless ``weights``)
        weights: s3://bucket/llama-8b/        # optional: the weights elsewhere (weights_uri)
        loader: {s3_endpoint_url: "http://10.0.0.5:8333"}
        args: ["--max-model-len", "8192"]

Only ``models`` is required (a name and a ``checkpoint`` each). Every engine is ``vllm serve``
with ``--load-format streamer`` and the swap worker extension, on 127.0.0.1 and a free port; its
``--model-loader-extra-config`` is the engine's and the model's ``loader`` keys, the model's
``weights`` as ``weights_uri`` and the server's cache directories (``cache_dir``,
``dram_cache_dir``), so each server loads through its own cache tiers. A server with a ``url`` is
another host, whose agent (:mod:`.agent`) starts its engines and reports its budget (unless the
server sets one), cache directories and bandwidths; ``api_key`` is the agent's (default
``$MODEL_STREAMER_AGENT_KEY``). With ``ray`` the servers are the cluster's nodes that carry the
custom resource ``model_streamer_budget_bytes`` (its quantity: the node's budget in bytes), or every node
with ``budget`` when none does (:mod:`.ray_cluster`); ``servers`` is then not given.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..config import parse_size
from ..errors import ConfigError

#: keys accepted at the top level, under ``engine`` and under each model
_TOP = ("budget", "idle_timeout", "engine", "models", "api_key", "servers", "ray")
_ENGINE = ("args", "env", "start_timeout", "loader")
_MODEL = ("checkpoint", "weights", "args", "env", "start_timeout", "loader")
_SERVER = ("budget", "cache_dir", "dram_cache_dir", "env", "url", "api_key")
_RAY = ("address", "cache_dir", "dram_cache_dir", "env", "log_dir", "poll_seconds", "start_timeout", "gpu_fraction")
#: flags the router sets on every engine itself
_RESERVED = ("--host", "--port", "--served-model-name", "--load-format", "--worker-extension-cls", "--api-key",
             "--model-loader-extra-config")
#: loader keys that belong to the server, not the model
_SERVER_LOADER_KEYS = ("cache_dir", "dram_cache_dir")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One servable model: its name in requests, its checkpoint and its engine's extra flags."""

    name: str
    checkpoint: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    start_timeout: float = 600.0
    weights: str | None = None
    loader: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def weights_location(self) -> str:
        """Where the weights are read from: ``weights`` when set, else the checkpoint directory."""
        return self.weights or self.checkpoint


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    """A place engines run: its memory budget and the cache tiers its loads go through; with a
    ``url``, another host's agent (budget 0: as the agent reports)."""

    name: str
    budget: int
    cache_dir: str | None = None
    dram_cache_dir: str | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    url: str | None = None
    api_key: str | None = dataclasses.field(default=None, repr=False)

    def loader_keys(self) -> dict[str, str]:
        return {k: v for k, v in (("cache_dir", self.cache_dir), ("dram_cache_dir", self.dram_cache_dir)) if v}


@dataclasses.dataclass(frozen=True)
class RaySpec:
    """Serving on a Ray cluster: its address, and what every node's actor is given."""

    address: str = "auto"
    cache_dir: str | None = None
    dram_cache_dir: str | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    log_dir: str = "/tmp/model-streamer-ray"
    poll_seconds: float = 2.0
    start_timeout: float = 120.0
    gpu_fraction: float = 0.1      # of one GPU, held by an engine on one GPU (tensor parallel: whole GPUs)


@dataclasses.dataclass(frozen=True)
class Catalog:
    models: Mapping[str, ModelSpec]
    budget: int
    idle_timeout: float
    api_key: str | None = None
    servers: Mapping[str, ServerSpec] = dataclasses.field(default_factory=dict)
    ray: RaySpec | None = None

    def extra_config(self, model: ModelSpec, server: ServerSpec) -> dict[str, Any]:
        """The engine's ``--model-loader-extra-config`` for ``model`` on ``server``."""
        extra = {**model.loader, **server.loader_keys()}
        if model.weights:
            extra["weights_uri"] = model.weights
        return extra


def default_budget() -> int:
    """90% of the first GPU's memory, else half of this host's RAM."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory * 0.9)
    except ImportError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def _unknown(where: str, given: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    extra = sorted(set(given) - set(allowed))
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, extra))}; allowed: {', '.join(allowed)}")


def _args(where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(a, (str, int, float)) for a in value):
        raise ConfigError(f"{where}.args must be a list of command-line words, got {value!r}")
    words = tuple(str(a) for a in value)
    clash = [w for w in words if w.split("=", 1)[0] in _RESERVED]
    if clash:
        raise ConfigError(f"{where}.args sets {clash}, which the router sets itself ({', '.join(_RESERVED)})")
    return words


def _env(where: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}.env must map variable names to values, got {value!r}")
    return {str(k): str(v) for k, v in value.items()}


def _loader(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}.loader must map --model-loader-extra-config keys to values, got {value!r}")
    from ..config import StreamerConfig

    clash = sorted(set(value) & set(_SERVER_LOADER_KEYS))
    if clash:
        raise ConfigError(f"{where}.loader sets {clash}: cache directories belong to a server (servers.NAME.{clash[0]})")
    if "weights_uri" in value:
        raise ConfigError(f"{where}.loader sets weights_uri: use the model's 'weights' key")
    rest = {k: v for k, v in value.items() if k != "in_place"}
    if not isinstance(value.get("in_place", True), bool) and value.get("in_place") != "auto":
        raise ConfigError(f"{where}.loader.in_place must be true, false or \"auto\", got {value['in_place']!r}")
    StreamerConfig.from_dict(rest, where=f"{where}.loader")   # the engine would refuse what this refuses
    return dict(value)


def _budget(where: str, value: Any, default: int | None = None) -> int:
    try:
        budget = parse_size(value) if value is not None else (default if default is not None else default_budget())
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if budget <= 0:
        raise ConfigError(f"{where} must be positive, got {value!r}")
    return budget


def _servers(where: str, value: Any, budget: int, base: Path | None) -> dict[str, ServerSpec]:
    if value is None:
        return {"local": ServerSpec(name="local", budget=budget)}
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{where}.servers must map at least one server name to {{budget: ..., cache_dir: ...}}")
    out: dict[str, ServerSpec] = {}
    for name, entry in value.items():
        at = f"{where}.servers.{name}"
        if not isinstance(name, str) or not name.strip() or "/" in name:
            raise ConfigError(f"{at}: a server name must be a non-empty string without '/'")
        entry = entry or {}
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{at} must be a mapping (budget, cache_dir, dram_cache_dir, env)")
        _unknown(at, entry, _SERVER)
        url = entry.get("url")
        if url is not None:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ConfigError(f"{at}.url must be the agent's http:// or https:// URL, got {url!r}")
            clash = [k for k in ("cache_dir", "dram_cache_dir") if entry.get(k)]
            if clash:
                raise ConfigError(f"{at} has a url and sets {clash}: another host's cache directories are its "
                                  f"agent's (model-streamer agent --cache-dir ...)")
        agent_key = entry.get("api_key", os.environ.get("MODEL_STREAMER_AGENT_KEY") if url else None)
        if agent_key is not None and (not isinstance(agent_key, str) or not agent_key):
            raise ConfigError(f"{at}.api_key must be a non-empty string")
        dirs = {}
        for key in ("cache_dir", "dram_cache_dir"):
            path = entry.get(key)
            if path is not None and (not isinstance(path, str) or not path):
                raise ConfigError(f"{at}.{key} must be a directory path, got {path!r}")
            if path and base is not None and not os.path.isabs(path):
                path = str(base / path)
            dirs[key] = path
        server_budget = (_budget(f"{at}.budget", entry["budget"]) if url and entry.get("budget") is not None
                         else 0 if url else _budget(f"{at}.budget", entry.get("budget"), budget))
        out[name] = ServerSpec(name=name, budget=server_budget, env=_env(at, entry.get("env")), url=url, api_key=agent_key,
                               **dirs)
    return out


def _seconds(where: str, value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where} must be a positive number of seconds, got {value!r}")
    return float(value)


def parse_model(where: str, name: Any, entry: Any, *, base: Path | None = None,
                defaults: Mapping[str, Any] | None = None) -> ModelSpec:
    """One model's entry (a checkpoint path, or ``{checkpoint, weights, args, env, start_timeout,
    loader}``), validated as the catalogue validates its models: reserved flags, loader keys.
    ``defaults``: the engine-wide ``args``, ``env``, ``start_timeout`` and ``loader`` it adds to
    (already validated); relative paths are taken from ``base``."""
    defaults = defaults or {}
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: a model name must be a non-empty string")
    if isinstance(entry, str):
        entry = {"checkpoint": entry}
    if not isinstance(entry, Mapping) or not isinstance(entry.get("checkpoint"), str):
        raise ConfigError(f"{where}: needs 'checkpoint: PATH' (the model directory: config and tokenizer; "
                          f"the weights too unless 'weights' names where they are)")
    _unknown(where, entry, _MODEL)
    checkpoint = _path(entry["checkpoint"], base)
    weights = entry.get("weights")
    if weights is not None and (not isinstance(weights, str) or not weights):
        raise ConfigError(f"{where}.weights must be a path or an s3:// URI, got {weights!r}")
    return ModelSpec(name=name, checkpoint=checkpoint,
                     args=tuple(defaults.get("args", ())) + _args(where, entry.get("args")),
                     env={**defaults.get("env", {}), **_env(where, entry.get("env"))},
                     start_timeout=_seconds(f"{where}.start_timeout", entry.get("start_timeout"),
                                            defaults.get("start_timeout", 600.0)),
                     weights=_path(weights, base) if weights else None,
                     loader={**defaults.get("loader", {}), **_loader(where, entry.get("loader"))})


def parse_catalog(raw: Mapping[str, Any], *, where: str = "serve config", base: Path | None = None) -> Catalog:
    """Validate a parsed config (see the module docstring); relative checkpoints are taken from ``base``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a mapping with a 'models' key")
    _unknown(where, raw, _TOP)
    engine = raw.get("engine") or {}
    if not isinstance(engine, Mapping):
        raise ConfigError(f"{where}.engine must be a mapping")
    _unknown(f"{where}.engine", engine, _ENGINE)
    common_args = _args(f"{where}.engine", engine.get("args"))
    common_env = _env(f"{where}.engine", engine.get("env"))
    common_timeout = _seconds(f"{where}.engine.start_timeout", engine.get("start_timeout"), 600.0)
    common_loader = _loader(f"{where}.engine", engine.get("loader"))
    models = raw.get("models")
    if not isinstance(models, Mapping) or not models:
        raise ConfigError(f"{where}: 'models' must map at least one model name to {{checkpoint: PATH}}")
    defaults = {"args": common_args, "env": common_env, "start_timeout": common_timeout, "loader": common_loader}
    specs = {name: parse_model(f"{where}.models.{name}", name, entry, base=base, defaults=defaults)
             for name, entry in models.items()}
    budget = _budget(f"{where}.budget", raw.get("budget"))
    api_key = raw.get("api_key")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ConfigError(f"{where}.api_key must be a non-empty string")
    ray = _ray(f"{where}.ray", raw.get("ray"))
    if ray is not None and raw.get("servers") is not None:
        raise ConfigError(f"{where}: give 'servers' or 'ray', not both (with ray the servers are the cluster's nodes)")
    return Catalog(models=specs, budget=budget, idle_timeout=_seconds(f"{where}.idle_timeout",
                                                                        raw.get("idle_timeout"), 300.0),
                   api_key=api_key, servers={} if ray else _servers(where, raw.get("servers"), budget, base), ray=ray)


def with_ray(catalog: Catalog, address: str) -> Catalog:
    """``catalog`` served on the Ray cluster at ``address`` (``serve --ray``)."""
    ray = dataclasses.replace(catalog.ray or RaySpec(), address=address)
    return dataclasses.replace(catalog, servers={}, ray=ray)


def _ray(where: str, value: Any) -> RaySpec | None:
    if value is None:
        return None
    if value is True:
        return RaySpec()
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping ({', '.join(_RAY)})")
    _unknown(where, value, _RAY)
    strings = {}
    for key in ("address", "cache_dir", "dram_cache_dir", "log_dir"):
        item = value.get(key)
        if item is not None and (not isinstance(item, str) or not item):
            raise ConfigError(f"{where}.{key} must be a non-empty string, got {item!r}")
        if item is not None:
            strings[key] = item
    fraction = value.get("gpu_fraction", 0.1)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"{where}.gpu_fraction must be a number in (0, 1], got {fraction!r}")
    return RaySpec(**strings, env=_env(where, value.get("env")), gpu_fraction=float(fraction),
                   poll_seconds=_seconds(f"{where}.poll_seconds", value.get("poll_seconds"), 2.0),
                   start_timeout=_seconds(f"{where}.start_timeout", value.get("start_timeout"), 120.0))


def _path(value: str, base: Path | None) -> str:
    if "://" not in value and base is not None and not os.path.isabs(value):
        return str(base / value)
    return value


def load_catalog(path: str | os.PathLike) -> Catalog:
    """Read a YAML or JSON serve config (relative checkpoint paths are relative to the file)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the serve config ({exc.strerror})") from exc
    if path.suffix == ".json":
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    else:
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return parse_catalog(raw, where=str(path), base=path.parent)
