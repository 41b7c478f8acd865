"""The TGI adapter's settings, read from the environment (TGI's launcher passes its whole
environment to every shard, so the environment is how options reach the Python server).

* ``TGI_LOAD_FORMAT=streamer`` switches the adapter on (see :mod:`.hook`).
* ``TGI_STREAMER_WEIGHTS_URI`` (optional): where the ``*.safetensors`` live when they are not in
  the model directory, e.g. ``s3://bucket/llama-3-8b/`` (config and tokenizer stay local).
* ``TGI_STREAMER_<FIELD>`` for every :class:`~loader_plugins.config.StreamerConfig` field, e.g.
  ``TGI_STREAMER_CONCURRENCY=16``, ``TGI_STREAMER_MEMORY_LIMIT=4GiB``,
  ``TGI_STREAMER_S3_ENDPOINT_URL=http://127.0.0.1:9000``.

This module is the adapter's edge: the environment is read here, once per call of
:func:`settings_from_env`, and turned into a typed :class:`TGIStreamerSettings`. It imports
neither torch nor TGI.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping

from ..config import StreamerConfig, config_fields
from ..errors import ConfigError

LOAD_FORMAT_ENV = "TGI_LOAD_FORMAT"
LOAD_FORMAT_STREAMER = "streamer"
ENV_PREFIX = "TGI_STREAMER_"
WEIGHTS_URI_ENV = ENV_PREFIX + "WEIGHTS_URI"

# StreamerConfig fields that may be None: an empty value or "none" in the environment means None.
_NULLABLE = ("s3_endpoint_url", "s3_region", "s3_profile", "deadline")
# Fields typed int (annotations are strings here: `from __future__ import annotations` in config.py).
def _int_fields() -> dict[str, bool]:
    return {f.name: str(f.type) in ("int", "<class 'int'>") for f in config_fields()}
# Keys that are the adapter's own, not StreamerConfig fields.
_ADAPTER_KEYS = ("weights_uri",)


def streamer_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``TGI_LOAD_FORMAT=streamer`` (case and surrounding blanks ignored)."""
    env = os.environ if environ is None else environ
    return env.get(LOAD_FORMAT_ENV, "").strip().lower() == LOAD_FORMAT_STREAMER


def env_name(key: str) -> str:
    """``"memory_limit"`` -> ``"TGI_STREAMER_MEMORY_LIMIT"``."""
    return ENV_PREFIX + key.upper()


def allowed_env_names() -> list[str]:
    return [env_name(k) for k in (*_ADAPTER_KEYS, *StreamerConfig.allowed_keys())]


@dataclasses.dataclass(frozen=True)
class TGIStreamerSettings:
    """What the adapter was told: the reader's config, where the weights are, which keys were set."""

    config: StreamerConfig
    weights_uri: str | None = None
    explicit: frozenset = frozenset()
    """StreamerConfig fields set explicitly (the adapter only changes defaults of the others)."""


def settings_from_env(environ: Mapping[str, str] | None = None) -> TGIStreamerSettings:
    """Build the settings from ``TGI_STREAMER_*`` variables; unknown ones are rejected by name."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    weights_uri: str | None = None
    allowed = set(StreamerConfig.allowed_keys())
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX):].lower()
        raw = env[name]
        if key == "weights_uri":
            weights_uri = raw.strip() or None
            continue
        if key not in allowed:
            raise ConfigError(
                f"environment variable {name}: {key!r} is not a streamer option; allowed: "
                f"{', '.join(allowed_env_names())}")
        text = raw.strip()
        if key in _NULLABLE and text.lower() in ("", "none", "null"):
            values[key] = None
        elif _int_fields().get(key) and re.fullmatch(r"[+-]?[0-9]+", text):
            values[key] = int(text)   # StreamerConfig.from_dict takes integers, not digit strings
        else:
            values[key] = text
    for key, value in values.items():   # name the variable at fault
        try:
            StreamerConfig.from_dict({key: value}, where="option")
        except ConfigError as exc:
            raise ConfigError(f"environment variable {env_name(key)}={env[env_name(key)]!r}: {exc}") from exc
    config = StreamerConfig.from_dict(values, where=f"environment ({ENV_PREFIX}*)")
    return TGIStreamerSettings(config=config, weights_uri=weights_uri, explicit=frozenset(values))
