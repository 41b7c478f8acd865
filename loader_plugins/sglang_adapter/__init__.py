"""SGLang adapter: ``python -m sglang.launch_server --model-path M --load-format streamer``.

SGLang calls :func:`register` (entry point group ``sglang.srt.plugins``) in every process it
starts (server, scheduler, detokenizer). The first call, when SGLang is importable:

* adds ``streamer`` to the CLI's ``--load-format`` choices (``add_load_format_choices``);
* hooks ``LoadConfig._verify_load_format`` (AROUND, SGLang's ``HookRegistry``): a load config
  whose format is ``"streamer"`` gets :class:`~.loader.StreamerSGLangLoader` as its format,
  which ``get_model_loader`` instantiates; any other format goes to SGLang's own check;
* hooks ``ServerArgs.check_server_args`` (BEFORE): ``--model-loader-extra-config`` is
  validated in the launching process, before any engine process starts, so a bad key fails at
  once with the allowed ones listed.

Later calls do nothing; without SGLang it does nothing. ``load_plugins`` applies the hooks.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

LOAD_FORMAT = "streamer"
_lock = threading.Lock()
_registered = False

VERIFY_TARGET = "sglang.srt.configs.load_config.LoadConfig._verify_load_format"
CHECK_ARGS_TARGET = "sglang.srt.server_args.ServerArgs.check_server_args"


def _is_streamer(load_format) -> bool:
    return isinstance(load_format, str) and load_format.strip().lower() == LOAD_FORMAT


def _verify_load_format(original, load_config, *args, **kwargs):
    """AROUND ``LoadConfig._verify_load_format``: ``"streamer"`` becomes the loader class."""
    if _is_streamer(load_config.load_format):
        from ..engine_options import parse_extra_config
        from .loader import StreamerSGLangLoader

        parse_extra_config(load_config.model_loader_extra_config)   # a bad key fails here too
        load_config.load_format = StreamerSGLangLoader
        return None
    return original(load_config, *args, **kwargs)


def _check_server_args(server_args, *args, **kwargs):
    """BEFORE ``ServerArgs.check_server_args``: validate the streamer's extra config early."""
    if _is_streamer(getattr(server_args, "load_format", None)):
        from ..engine_options import parse_extra_config

        parse_extra_config(getattr(server_args, "model_loader_extra_config", None))
    return None


def register() -> None:
    """Register the ``streamer`` load format with SGLang (idempotent, safe without SGLang)."""
    global _registered
    with _lock:
        if _registered:
            return
        try:
            from sglang.srt.plugins.hook_registry import HookRegistry, HookType
            from sglang.srt.server_args import LOAD_FORMAT_CHOICES, add_load_format_choices
        except ImportError as exc:   # the plugin is installed but SGLang is not importable here
            log.debug("SGLang not importable (%s); the streamer load format is not registered", exc)
            return
        if LOAD_FORMAT not in LOAD_FORMAT_CHOICES:
            add_load_format_choices([LOAD_FORMAT])
        HookRegistry.register(VERIFY_TARGET, _verify_load_format, HookType.AROUND)
        HookRegistry.register(CHECK_ARGS_TARGET, _check_server_args, HookType.BEFORE)
        _registered = True
        log.debug("registered SGLang load format %r", LOAD_FORMAT)


__all__ = ["LOAD_FORMAT", "register"]
