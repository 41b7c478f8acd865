"""Hugging Face TGI 3.x adapter: stream a model's safetensors through the core.

TGI has no plugin mechanism and its launcher is Rust, so the adapter works from inside the
Python server:

* :class:`StreamerWeights` (``from loader_plugins.tgi_adapter import StreamerWeights``, where TGI
  is importable) is a subclass of TGI's ``text_generation_server.utils.weights.Weights`` with
  the same constructor; it parses headers and streams bytes with the core.
* :mod:`.hook`, run from the ``loader_plugins_tgi.pth`` file at interpreter start-up, does
  nothing unless ``TGI_LOAD_FORMAT=streamer``; then it swaps ``StreamerWeights`` into TGI as
  soon as TGI's weights module is imported, and serves ``TGI_STREAMER_WEIGHTS_URI``.
* ``tgi-streamer-launcher --load-format streamer [--streamer-* ...] ARGS...`` (:mod:`.launcher`)
  sets that environment and execs ``text-generation-launcher ARGS...``.

Importing this package imports neither TGI nor torch.
"""

from __future__ import annotations

from .settings import TGIStreamerSettings, settings_from_env, streamer_enabled

__all__ = ["StreamerWeights", "TGIStreamerSettings", "settings_from_env", "streamer_enabled"]


def __getattr__(name: str):
    if name == "StreamerWeights":
        from .weights import streamer_weights_class

        try:
            return streamer_weights_class()
        except ImportError as exc:
            raise ImportError(
                f"loader_plugins.tgi_adapter.StreamerWeights needs TGI's Python server "
                f"(text_generation_server) importable: {exc}. Run inside a TGI 3.x image, or use "
                f"loader_plugins.tgi_adapter.weights.StandaloneStreamerWeights without TGI") from exc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
