"""The vLLM model loader behind ``--load-format streamer``.

Which checkpoint tensors are streamed straight into the model is asked of the model's own
``load_weights`` (:mod:`loader_plugins.inplace`): a dry run over stand-in tensors shows what it
does with each one. A tensor whose only fate is one plain copy (whole, a tensor-parallel shard,
a row range of a fused q/k/v or gate/up parameter, an expert's slot of a fused MoE weight) is
read straight into that region while the model's loader runs; the loader still sees it and its
copy is checked against the dry run's. Tensors the loader transforms (transposes, permutes,
concatenates, scales, quantizes, inspects) are streamed into buffers and handed to it with their
real bytes, as vLLM's default loader does; tensors it ignores are not read. vLLM's check that
every parameter was loaded runs afterwards.

``--model-loader-extra-config`` takes every :class:`~loader_plugins.StreamerConfig` key plus
``weights_uri`` (weights stored somewhere other than the model directory, e.g. ``s3://...``),
``in_place`` (``false``: every tensor through ``load_weights``; default ``"auto"``) and
``placement_cache`` (default true: placements recorded by one load are reused by the next load of
the same model, :mod:`loader_plugins.inplace.recipe`).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from ..core.checkpoint import expand
from ..engine_options import EXTRA_KEYS, LoaderOptions, engine_key, parse_extra_config  # noqa: F401 - re-exported
from ..errors import DestinationError
from ..inplace import load_into_model
from ..streamer import SafetensorsStreamer

try:  # vLLM's own logger, so our line looks like vLLM's
    from vllm.logger import init_logger

    # vLLM configures its handler on the "vllm" logger tree; a child of it prints in vLLM's format.
    log = init_logger("vllm.model_executor.model_loader.streamer")
except ImportError:  # pragma: no cover
    log = logging.getLogger(__name__)

class StreamerModelLoader(BaseModelLoader):
    """Streams safetensors checkpoints with loader_plugins."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        options = parse_extra_config(load_config.model_loader_extra_config)
        self.options = options
        self.streamer_config = options.config
        self.weights_uri = options.weights_uri
        self.in_place = options.in_place
        self.last_stats: dict[str, Any] = {}

    # ---- where the weights are -------------------------------------------------------------
    def _location(self, model_config: ModelConfig) -> str:
        return self.options.location(model_config.model)

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing is downloaded: check that the weights are where the configuration says."""
        files, _ = expand(self._location(model_config), self.streamer_config)
        log.info("Streamer: %d safetensors file(s) at %s", len(files), self._location(model_config))

    # ---- loading ---------------------------------------------------------------------------
    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        location = self._location(model_config)
        report = load_into_model(model.load_weights, model, location, self.streamer_config, in_place=self.in_place,
                                 engine_key=_engine_key(model_config) if self.options.placement_cache else None)
        self.last_stats = report.stats
        log.info("Streamer loaded %s", report.summary())
        if report.stats["reasons"]:
            log.info("Streamer: through load_weights because %s", report.reasons())
        if model_config.quantization is None and report.result is not None:
            _check_loaded(model, set(report.result), location)
        report.remember()

    def get_all_weights(self, model_config: ModelConfig, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """All checkpoint tensors as (name, tensor), into buffers (vLLM's ``reload_weights``)."""
        with SafetensorsStreamer(self.streamer_config) as streamer:
            streamer.stream_files(self._location(model_config))
            yield from streamer.get_tensors()


def _engine_key(model_config: ModelConfig) -> str:
    import vllm

    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        rank = (get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
    except (ImportError, AssertionError, RuntimeError):   # no parallel state: one rank
        rank = (0, 1)
    return engine_key("vllm", vllm.__version__, model_config.hf_config, model_config.dtype, model_config.quantization,
                      rank)


def _check_loaded(model: nn.Module, loaded: set[str], location: str) -> None:
    """vLLM's own check that every parameter was loaded (``DefaultModelLoader.track_weights_loading``:
    the same exemptions), with the checkpoint's location in the message."""
    try:
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

        track = DefaultModelLoader.track_weights_loading
    except (ImportError, AttributeError):  # an older vLLM: the plain check
        track = None
    if track is not None:
        try:
            track(None, model, set(loaded), quantized=False)
            return
        except ValueError as exc:
            detail = str(exc)
    else:
        missing = {name for name, _ in model.named_parameters()} - loaded
        if not missing:
            return
        detail = str(sorted(missing))
    raise DestinationError(f"the checkpoint at {location} does not initialise every parameter of the model ({detail}); "
                        f"check that the checkpoint matches the model architecture")
