"""The SGLang model loader behind ``--load-format streamer``.

SGLang's default loader builds the model, hands every checkpoint tensor to the model's own
``load_weights`` and post-processes (quantization methods). This one builds the model the same
way and post-processes the same way; in between, the checkpoint goes through
:func:`~loader_plugins.inplace.load_into_model`: the model's ``load_weights`` is asked, by a dry
run over stand-in tensors, what it does with each tensor; tensors it only copies (whole, a
tensor-parallel shard, a slot of a fused parameter) are streamed straight into the parameters
while it runs, the rest reach it as real tensors, exactly as SGLang's loader would hand them.

``--model-loader-extra-config`` takes the same keys as vLLM's (every
:class:`~loader_plugins.StreamerConfig` key, ``weights_uri``, ``in_place``).
``update_weights_from_disk(..., load_format="streamer")`` streams the new weights through
``load_weights`` (SGLang's reload path).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
from sglang.srt.model_loader.loader import DefaultModelLoader, _get_quantization_config, _initialize_model
from sglang.srt.model_loader.utils import set_default_torch_dtype
from torch import nn

from ..core.checkpoint import expand
from ..engine_options import engine_key, parse_extra_config
from ..inplace import load_into_model
from ..streamer import SafetensorsStreamer

log = logging.getLogger("sglang.srt.model_loader.streamer")


class StreamerSGLangLoader(DefaultModelLoader):
    """Streams safetensors checkpoints with loader_plugins (see the module docstring)."""

    def __init__(self, load_config):
        self.options = parse_extra_config(load_config.model_loader_extra_config)
        self.streamer_config = self.options.config
        self.last_stats: dict[str, Any] = {}
        # SGLang's loader checks the extra config against its own keys: it has been read here.
        load_config.model_loader_extra_config = {}
        super().__init__(load_config)

    def download_model(self, model_config) -> None:
        """Nothing is downloaded: check that the weights are where the configuration says."""
        location = self.options.location(model_config.model_path)
        files, _ = expand(location, self.streamer_config)
        log.info("Streamer: %d safetensors file(s) at %s", len(files), location)

    def load_model(self, *, model_config, device_config) -> nn.Module:
        if getattr(model_config, "modelopt_quant", None):
            from ..errors import ConfigError

            raise ConfigError("--load-format streamer does not load ModelOpt-quantized models (they are "
                              "quantized while loading); use --load-format auto for this model")
        target_device = torch.device(device_config.device)
        quant_config = _get_quantization_config(model_config, self.load_config)
        location = self.options.location(model_config.model_path)
        with set_default_torch_dtype(model_config.dtype):
            with target_device:
                model = _initialize_model(model_config, self.load_config, quant_config)

            def load_weights(weights):
                return DefaultModelLoader.load_weights_only(model, weights, target_device)

            report = load_into_model(load_weights, model, location, self.streamer_config,
                                     in_place=self.options.in_place,
                                     engine_key=_engine_key(model_config) if self.options.placement_cache else None)
            self.last_stats = report.stats
            log.info("Streamer loaded %s", report.summary())
            if report.stats["reasons"]:
                log.info("Streamer: through load_weights because %s", report.reasons())
            for source in getattr(model, "secondary_weights", ()) or ():
                DefaultModelLoader.load_weights_only(model, self._get_weights_iterator(source), target_device)
            DefaultModelLoader.postprocess_weights(model, target_device)
            report.remember()
        return model.eval()

    def _get_weights_iterator(self, source, **_: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of ``source`` (SGLang's ``Source``) as ``(prefix + name, tensor)``,
        streamed (SGLang's ``update_weights_from_disk`` and secondary weight sources)."""
        location = self.options.location(source.model_or_path)
        prefix = getattr(source, "prefix", "") or ""
        with SafetensorsStreamer(self.streamer_config) as streamer:
            streamer.stream_files(location)
            for name, tensor in streamer.get_tensors():
                yield prefix + name, tensor



def _engine_key(model_config) -> str:
    import sglang

    try:
        from sglang.srt.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        rank = (get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
    except (ImportError, AssertionError, RuntimeError):   # no parallel state: one rank
        rank = (0, 1)
    return engine_key("sglang", getattr(sglang, "__version__", "?"), getattr(model_config, "hf_config", None),
                      getattr(model_config, "dtype", None), getattr(model_config, "quantization", None), rank)
