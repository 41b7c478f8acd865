"""The :class:`~loader_plugins.config.StreamerConfig` fields as command-line flags, shared by
every ``model-streamer`` subcommand that reads a checkpoint (``--concurrency 8`` ->
``concurrency=8``). Each flag's help is the field's own doc string and its default."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from .config import StreamerConfig, config_fields, field_docs


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def _help(doc: str, default: Any) -> str:
    text = " ".join(doc.replace("``", "").split())
    shown = "none" if default is None else default
    return f"{text} (default: {shown})".replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per StreamerConfig field (``chunk_bytes`` -> ``--chunk-bytes``)."""
    group = parser.add_argument_group("streamer options (StreamerConfig; the same keys as vLLM's "
                                      "--model-loader-extra-config)")
    docs = field_docs()
    for field in config_fields():
        group.add_argument("--" + field.name.replace("_", "-"), dest="cfg_" + field.name, default=None,
                           metavar=field.name.upper(), help=_help(docs.get(field.name, ""), _default(field)))


def config_from_args(args: argparse.Namespace) -> StreamerConfig:
    """The config the flags given on the command line make (the rest: defaults)."""
    values = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    for key in ("deadline", "s3_endpoint_url", "s3_region", "s3_profile"):
        if isinstance(values.get(key), str) and values[key].lower() in ("none", "null", ""):
            values[key] = None
    return StreamerConfig.from_dict(values, where="option")
