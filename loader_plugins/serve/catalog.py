"""The serving catalogue: which models exist, how their engines start, how much memory they may hold.

``model-streamer serve --config serve.yaml`` reads YAML (or JSON)::

    budget: 24GiB          # bytes the resident models may hold; default: 90% of the GPU, else half of RAM
    idle_timeout: 300      # seconds without a request before a model is swapped out to host memory
    engine:                # defaults for every model's engine
      args: ["--enforce-eager"]
      env: {}
      start_timeout: 600
    models:
      llama-8b:
        checkpoint: /models/llama-8b
        args: ["--max-model-len", "8192"]

Only ``models`` is required (a name and a ``checkpoint`` each). Every engine is ``vllm serve``
with ``--load-format streamer`` and the swap worker extension, on 127.0.0.1 and a free port.
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
_TOP = ("budget", "idle_timeout", "engine", "models", "api_key")
_ENGINE = ("args", "env", "start_timeout")
_MODEL = ("checkpoint", "args", "env", "start_timeout")
#: flags the router sets on every engine itself
_RESERVED = ("--host", "--port", "--served-model-name", "--load-format", "--worker-extension-cls", "--api-key")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One servable model: its name in requests, its checkpoint and its engine's extra flags."""

    name: str
    checkpoint: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    start_timeout: float = 600.0


@dataclasses.dataclass(frozen=True)
class Catalog:
    models: Mapping[str, ModelSpec]
    budget: int
    idle_timeout: float
    api_key: str | None = None


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


def _seconds(where: str, value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where} must be a positive number of seconds, got {value!r}")
    return float(value)


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
    models = raw.get("models")
    if not isinstance(models, Mapping) or not models:
        raise ConfigError(f"{where}: 'models' must map at least one model name to {{checkpoint: PATH}}")
    specs: dict[str, ModelSpec] = {}
    for name, entry in models.items():
        at = f"{where}.models.{name}"
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{at}: a model name must be a non-empty string")
        if isinstance(entry, str):
            entry = {"checkpoint": entry}
        if not isinstance(entry, Mapping) or not isinstance(entry.get("checkpoint"), str):
            raise ConfigError(f"{at}: needs 'checkpoint: PATH' (a local directory or an s3:// URI)")
        _unknown(at, entry, _MODEL)
        checkpoint = entry["checkpoint"]
        if "://" not in checkpoint and base is not None and not os.path.isabs(checkpoint):
            checkpoint = str(base / checkpoint)
        specs[name] = ModelSpec(name=name, checkpoint=checkpoint, args=common_args + _args(at, entry.get("args")),
                                env={**common_env, **_env(at, entry.get("env"))},
                                start_timeout=_seconds(f"{at}.start_timeout", entry.get("start_timeout"),
                                                       common_timeout))
    try:
        budget = parse_size(raw["budget"]) if raw.get("budget") is not None else default_budget()
    except ValueError as exc:
        raise ConfigError(f"{where}.budget: {exc}") from exc
    if budget <= 0:
        raise ConfigError(f"{where}.budget must be positive, got {raw.get('budget')!r}")
    api_key = raw.get("api_key")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ConfigError(f"{where}.api_key must be a non-empty string")
    return Catalog(models=specs, budget=budget, idle_timeout=_seconds(f"{where}.idle_timeout",
                                                                        raw.get("idle_timeout"), 300.0),
                   api_key=api_key)


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
