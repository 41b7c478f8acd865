"""vLLM adapter: ``vllm serve MODEL --load-format streamer``.

vLLM calls :func:`register` (entry point group ``vllm.general_plugins``) in every process it
starts; the first call registers :class:`~loader_plugins.vllm_adapter.loader.StreamerModelLoader`
under the load format ``streamer`` and later calls do nothing.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

LOAD_FORMAT = "streamer"
_lock = threading.Lock()
_registered = False


def register() -> None:
    """Register the ``streamer`` load format with vLLM (idempotent, safe without vLLM)."""
    global _registered
    with _lock:
        if _registered:
            return
        try:
            from vllm.model_executor.model_loader import register_model_loader
        except ImportError as exc:  # the plugin is installed but vLLM is not importable here
            log.debug("vLLM not importable (%s); the streamer load format is not registered", exc)
            return
        from .loader import StreamerModelLoader

        try:
            from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER as known
        except ImportError:  # private name; only used to stay quiet on re-import
            known = {}
        if known.get(LOAD_FORMAT) is not StreamerModelLoader:
            register_model_loader(LOAD_FORMAT)(StreamerModelLoader)
        from ..swap.vllm_backend import register as register_sleep_backend

        register_sleep_backend()  # idempotent; a no-op where vLLM has no SleepModeBackendFactory
        _registered = True
        log.debug("registered vLLM load format %r", LOAD_FORMAT)


__all__ = ["LOAD_FORMAT", "register"]
