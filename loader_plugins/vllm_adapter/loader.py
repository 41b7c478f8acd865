"""The vLLM model loader behind ``--load-format streamer``.

Checkpoint tensors that map 1:1 onto a parameter (same name and shape, or this rank's
tensor-parallel shard of it; unquantized) are streamed straight into the parameter's own
storage (cast once in the sink when the dtypes differ). So are the parts of fused parameters:
``q_proj`` / ``k_proj`` / ``v_proj`` land in their rows of ``qkv_proj`` and ``gate_proj`` /
``up_proj`` in theirs, found through the model's ``packed_modules_mapping`` and the fused
layer's own shard offsets (``QKVParallelLinear``, ``MergedColumnParallelLinear``; single-rank).
Every other tensor (padded vocabularies, strided shards, quantized layers) is streamed into a
buffer and handed to the model's own ``load_weights``, exactly as vLLM's default loader does.
The strict "every parameter was loaded" check runs afterwards.

``--model-loader-extra-config`` takes every :class:`~loader_plugins.StreamerConfig` key plus
``weights_uri`` (weights stored somewhere other than the model directory, e.g. ``s3://...``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Iterator

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from ..config import StreamerConfig
from ..core.checkpoint import expand
from ..core.sinks.cuda import cuda_sink_available
from ..core.tp import ColumnBlock, shard_block, shard_shape
from ..errors import ConfigError, StreamerError
from ..streamer import SafetensorsStreamer

try:  # vLLM's own logger, so our line looks like vLLM's
    from vllm.logger import init_logger

    # vLLM configures its handler on the "vllm" logger tree; a child of it prints in vLLM's format.
    log = init_logger("vllm.model_executor.model_loader.streamer")
except ImportError:  # pragma: no cover
    log = logging.getLogger(__name__)

EXTRA_KEYS = ("weights_uri",)

# weights_uri -> the model path it was first loaded for. vLLM's reload_weights builds a fresh
# loader and points model_config.model at the new weights; a model path different from the
# recorded one means "reload from that path", not from weights_uri.
_FIRST_MODEL_FOR_URI: dict[str, str] = {}


def parse_extra_config(extra: dict[str, Any] | None) -> tuple[StreamerConfig, str | None]:
    """Validate ``--model-loader-extra-config`` for the streamer; unknown keys are errors."""
    values = dict(extra or {})
    weights_uri = values.pop("weights_uri", None)
    if weights_uri is not None and (not isinstance(weights_uri, str) or not weights_uri):
        raise ConfigError(f"--model-loader-extra-config key 'weights_uri' must be a path or s3:// URI, "
                          f"got {weights_uri!r}")
    try:
        config = StreamerConfig.from_dict(values, where="--model-loader-extra-config")
    except ConfigError as exc:
        if "unknown" in str(exc):
            raise ConfigError(f"{exc}, {', '.join(EXTRA_KEYS)}") from None
        raise
    return config, weights_uri


def _tp_world_size() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_world_size()
    except Exception:  # noqa: BLE001 - not initialised (unit tests): single process
        return 1


def _tp_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except Exception:  # noqa: BLE001 - not initialised (unit tests): single process
        return 0


def _shard_dim(spec, param, rank: int, world: int):
    """None: ``param`` holds the whole tensor; d: this rank's ceil-block shard along d (checked
    against vLLM's ``output_dim`` / ``input_dim`` attributes); False: neither (the model's loader)."""
    if tuple(param.shape) == tuple(spec.shape):
        return None
    if world == 1:
        return False
    for dim in range(len(spec.shape)):
        if (shard_shape(spec, rank, world, dim) == tuple(param.shape)
                and dim in (getattr(param, "output_dim", None), getattr(param, "input_dim", None))):
            return dim
    return False


def _fused_rows(module: nn.Module, index: int) -> tuple[int, int] | None:
    """Rows ``[start, end)`` of part ``index`` inside a fused layer's output dimension (one rank)."""
    try:
        from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear
    except ImportError:  # pragma: no cover
        return None
    if getattr(module, "tp_size", 1) != 1 or getattr(module, "quant_method", None) is None:
        return None
    if type(module.quant_method).__name__ != "UnquantizedLinearMethod":
        return None
    if isinstance(module, QKVParallelLinear):
        if index > 2:
            return None
        sizes = [module.num_heads * module.head_size, module.num_kv_heads * module.head_size,
                 module.num_kv_heads * module.v_head_size]
    elif isinstance(module, MergedColumnParallelLinear):
        sizes = list(module.output_sizes)
        if index >= len(sizes):
            return None
    else:
        return None
    if sum(sizes) != getattr(module, "output_size_per_partition", sum(sizes)):
        return None
    start = sum(sizes[:index])
    return start, start + sizes[index]


def fused_parts(model: nn.Module, names) -> dict[str, tuple[str, int, int, int, int]]:
    """Checkpoint name -> (fused parameter name, part index, first row, end row, number of parts)
    for every checkpoint tensor that is one part of a fused parameter (``packed_modules_mapping``)."""
    packed = getattr(model, "packed_modules_mapping", None) or {}
    if not packed:
        return {}
    modules = dict(model.named_modules())
    out: dict[str, tuple[str, int, int, int, int]] = {}
    for name in names:
        parts = name.split(".")
        for fused, subs in packed.items():
            hit = [(i, j) for i, p in enumerate(parts[:-1]) for j, sub in enumerate(subs) if p == sub]
            if len(hit) != 1 or len(subs) < 2:
                continue
            pos, index = hit[0]
            module_name = ".".join(parts[:pos] + [fused])
            module = modules.get(module_name)
            if module is None or pos != len(parts) - 2:
                continue
            rows = _fused_rows(module, index)
            if rows is not None:
                out[name] = (f"{module_name}.{parts[-1]}", index, *rows, len(subs))
            break
    return out


class StreamerModelLoader(BaseModelLoader):
    """Streams safetensors checkpoints with loader_plugins."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        self.streamer_config, self.weights_uri = parse_extra_config(load_config.model_loader_extra_config)
        self.last_stats: dict[str, Any] = {}

    # ---- where the weights are -------------------------------------------------------------
    def _location(self, model_config: ModelConfig) -> str:
        model = str(model_config.model)
        if self.weights_uri and _FIRST_MODEL_FOR_URI.setdefault(self.weights_uri, model) == model:
            return self.weights_uri
        return model

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing is downloaded: check that the weights are where the configuration says."""
        files, _ = expand(self._location(model_config), self.streamer_config)
        log.info("Streamer: %d safetensors file(s) at %s", len(files), self._location(model_config))

    # ---- loading ---------------------------------------------------------------------------
    def _direct_destinations(self, model: nn.Module, model_config: ModelConfig,
                             specs) -> tuple[dict[str, torch.Tensor], dict[str, ColumnBlock]]:
        """Parameters the checkpoint fills 1:1 (same name, unquantized): the whole tensor, or this
        tensor-parallel rank's shard of it (a dim-0 shard reads only its bytes; a strided one is
        cut on the GPU). On a GPU the CUDA sink fills them; on the CPU, whole tensors and dim-0 shards.
        Parts of fused parameters (q/k/v, gate/up) go to their rows of the fused parameter."""
        if model_config.quantization is not None:
            return {}, {}
        world, rank = _tp_world_size(), _tp_rank()
        params = dict(model.named_parameters())
        out: dict[str, torch.Tensor] = {}
        shards: dict[str, ColumnBlock] = {}
        fused = fused_parts(model, [n for n in specs if n not in params]) if world == 1 else {}
        nparts: dict[str, int] = {}
        for name, (pname, index, start, end, count) in fused.items():
            param, spec = params.get(pname), specs[name]
            if param is None or not self._usable(param, spec) or param.dim() < 1 or end > param.shape[0]:
                continue
            if param.device.type == "cuda" and not cuda_sink_available():
                continue
            view = param.data[start:end]
            if tuple(view.shape) != tuple(spec.shape):
                continue
            out[name] = view
            self._fused_groups.setdefault(pname, {})[name] = index
            nparts[pname] = count
        for pname, members in list(self._fused_groups.items()):
            if len(set(members.values())) != nparts[pname]:   # not every part can be streamed: the model loads them all
                for name in members:
                    out.pop(name, None)
                del self._fused_groups[pname]
        for name, spec in specs.items():
            param = params.get(name)
            if param is None or not self._usable(param, spec):
                continue
            dim = _shard_dim(spec, param, rank, world)
            if dim is False:
                continue
            if dim is not None:
                if param.device.type == "cuda" and not cuda_sink_available():
                    continue   # shards on the GPU need the CUDA sink (CuPy); else the model's weight loader
                block = shard_block(spec, rank, world, dim)
                if param.device.type == "cpu" and (not block.contiguous or param.dtype != src):
                    continue   # strided or cast shards on the CPU: the model's weight loader
                shards[name] = block
            out[name] = param.data
        return out, shards

    @staticmethod
    def _usable(param: torch.Tensor, spec) -> bool:
        if param.device.type not in ("cpu", "cuda") or not param.is_contiguous():
            return False
        src = spec.torch_dtype()
        return param.dtype == src or (param.dtype.is_floating_point and src.is_floating_point)

    def _stream(self, location: str, model: nn.Module, model_config: ModelConfig,
                direct: bool) -> Iterator[tuple[str, torch.Tensor]]:
        t0 = time.perf_counter()
        self._fused_groups: dict[str, dict[str, int]] = {}
        streamer = SafetensorsStreamer(self.streamer_config)
        filled: set[str] = set()
        total = 0
        with streamer:
            from ..core.checkpoint import open_checkpoint

            specs = open_checkpoint(location, self.streamer_config).tensors
            destinations, shards = self._direct_destinations(model, model_config, specs) if direct else ({}, {})
            streamer.stream_files(location, destinations=destinations or None, shards=shards or None)
            parts_of = {n: p for p, members in self._fused_groups.items() for n in members}
            waiting = {p: set(members) for p, members in self._fused_groups.items()}
            for name, tensor in streamer.get_tensors():
                total += specs[name].nbytes
                if name in destinations:
                    pname = parts_of.get(name)
                    if pname is None:
                        filled.add(name)
                    else:
                        waiting[pname].discard(name)
                        if not waiting[pname]:
                            filled.add(pname)
                    continue
                yield name, tensor
        seconds = time.perf_counter() - t0
        in_place = sum(1 for n in specs if n in destinations)
        self.last_stats = {"bytes": total, "seconds": seconds, "gbps": total / seconds / 1e9 if seconds else 0.0,
                           "in_place": in_place, "via_model": len(specs) - in_place, "location": location}
        self._filled = filled
        log.info("Streamer loaded %.3f GB in %.2f seconds (%.2f GB/s) from %s: %d tensors in place, %d through "
                 "the model's weight loader", total / 1e9, seconds, self.last_stats["gbps"], location, in_place,
                 len(specs) - in_place)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        location = self._location(model_config)
        self._filled = set()
        try:
            loaded = model.load_weights(self._stream(location, model, model_config, direct=True))
        except StreamerError:
            raise
        if model_config.quantization is None and loaded is not None:
            loaded = set(loaded) | self._filled
            missing = {name for name, _ in model.named_parameters()} - loaded
            if missing:
                raise StreamerError(
                    f"the checkpoint at {location} does not initialise these parameters: {sorted(missing)}; "
                    f"check that the checkpoint matches the model architecture")

    def get_all_weights(self, model_config: ModelConfig, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """All checkpoint tensors as (name, tensor); used by vLLM's ``reload_weights``."""
        yield from self._stream(self._location(model_config), model, model_config, direct=False)


def _env_flag(name: str) -> bool:  # pragma: no cover - debugging aid
    return os.environ.get(name, "") not in ("", "0")
