"""What an engine adapter is told through the engine's ``--model-loader-extra-config`` (vLLM and
SGLang take the same flag and the same keys): every :class:`~loader_plugins.StreamerConfig` key,
its sections' keys (the cache's), plus ``weights_uri``, ``in_place`` and ``placement_cache``. Engine-neutral: no
engine is imported here."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .config import StreamerConfig
from .errors import ConfigError

EXTRA_KEYS = ("weights_uri", "in_place", "placement_cache")
FLAG = "--model-loader-extra-config"

# weights_uri -> the model path it was first loaded for. An engine's reload (vLLM's
# reload_weights, SGLang's update_weights_from_disk) points the model path at the new weights; a
# model path different from the recorded one means "load from that path", not from weights_uri.
_FIRST_MODEL_FOR_URI: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """``--model-loader-extra-config``, validated."""

    config: StreamerConfig
    weights_uri: str | None = None
    in_place: bool | str = "auto"
    placement_cache: bool = True

    def location(self, model_path: str) -> str:
        """Where the weights of ``model_path`` are: ``weights_uri`` for the model it was given
        with, the model path itself otherwise (a reload from another path)."""
        model = str(model_path)
        if self.weights_uri and _FIRST_MODEL_FOR_URI.setdefault(self.weights_uri, model) == model:
            return self.weights_uri
        return model


def parse_extra_config(extra: dict[str, Any] | str | None) -> LoaderOptions:
    """Validate the extra config (a mapping, or its JSON text) for the streamer; unknown keys
    are errors that list the allowed ones."""
    if isinstance(extra, str):
        try:
            extra = json.loads(extra or "{}")
        except ValueError as exc:
            raise ConfigError(f"{FLAG} is not valid JSON ({exc}): {extra!r}") from None
    if extra is not None and not isinstance(extra, dict):
        raise ConfigError(f"{FLAG} must be a JSON object, got {extra!r}")
    values = dict(extra or {})
    weights_uri = values.pop("weights_uri", None)
    if weights_uri is not None and (not isinstance(weights_uri, str) or not weights_uri):
        raise ConfigError(f"{FLAG} key 'weights_uri' must be a path or s3:// URI, got {weights_uri!r}")
    in_place = values.pop("in_place", "auto")
    if not isinstance(in_place, bool) and in_place != "auto":
        raise ConfigError(f"{FLAG} key 'in_place' must be true, false or \"auto\", got {in_place!r}")
    placement_cache = values.pop("placement_cache", True)
    if not isinstance(placement_cache, bool):
        raise ConfigError(f"{FLAG} key 'placement_cache' must be true or false, got {placement_cache!r}")
    try:
        config = StreamerConfig.from_dict(values, where=FLAG)
    except ConfigError as exc:
        if "unknown" in str(exc):
            raise ConfigError(f"{exc}, {', '.join(EXTRA_KEYS)}") from None
        raise
    return LoaderOptions(config, weights_uri, in_place, placement_cache)


def engine_key(engine: str, version: str, hf_config: Any, dtype: Any, quantization: Any, rank: tuple[int, int]) -> str:
    """What a recorded load's placements depend on in an engine (:mod:`loader_plugins.inplace.recipe`):
    its name and version, the model's config, dtype and quantization, the tensor-parallel rank."""
    text = hf_config.to_json_string() if hasattr(hf_config, "to_json_string") else repr(hf_config)
    return json.dumps([engine, version, text, str(dtype), str(quantization), list(rank)])
