"""SGLang's model loading in this process, without an engine: what SGLang's scheduler sets up
before it loads a model (one rank of a tensor-parallel group, CPU or one GPU), then one
``loader.load_model``. For ``bench-sglang`` (the load alone, timed) and the tests (parameters
compared with SGLang's own loader, also per rank at TP 2). Needs SGLang; the plugins (our
``streamer`` format) are loaded first."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

_READY: set[str] = set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process(model_path: str, device: str = "cpu", *, tp_size: int = 1, tp_rank: int = 0,
                 init_method: str | None = None) -> None:
    """SGLang's plugins, server args, parallel groups and MoE/DP state, once per process. With
    ``tp_size`` > 1 every rank's process calls this with its ``tp_rank`` and the same
    ``init_method`` (``tcp://127.0.0.1:PORT``), as SGLang's schedulers do."""
    if _READY:
        return
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
    from sglang.srt.layers.dp_attention import init_dp_gathered_buffer, initialize_dp_attention
    from sglang.srt.layers.moe import initialize_moe_config
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import ServerArgs

    if tp_size > 1 and init_method is None:
        raise ValueError("tensor-parallel ranks need the same init_method (tcp://host:port) in every rank")
    args = ServerArgs(model_path=model_path, device=device, attention_backend="torch_native", max_total_tokens=2048,
                      tp_size=tp_size)
    args.resolve_once()
    publish(args, role="scheduler", ranks=SpawnRanks(world_rank=tp_rank, gpu_id=tp_rank))
    initialize_moe_config()
    init_distributed_environment(world_size=tp_size, rank=tp_rank, local_rank=tp_rank,
                                 backend="gloo" if device == "cpu" else "nccl",
                                 distributed_init_method=init_method or f"tcp://127.0.0.1:{_free_port()}")
    initialize_model_parallel()
    initialize_dp_attention(args)
    init_dp_gathered_buffer(ModelConfig(model_path, dtype="auto"))
    import sglang.srt.models.registry  # noqa: F401 - imports every model class (seconds): set-up, not loading
    _READY.add(device)


def load_once(model_path: str, load_format: str, extra: dict[str, Any] | None = None, *, dtype: str = "auto",
              device: str = "cpu"):
    """``get_model_loader(LoadConfig(load_format=...)).load_model(...)``: (model, loader, seconds
    of ``load_model``). A tensor-parallel rank calls :func:`init_process` first."""
    from sglang.srt.configs.device_config import DeviceConfig
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader import get_model_loader

    init_process(model_path, device)
    config = ModelConfig(model_path, dtype=dtype)
    load_config = LoadConfig(load_format=load_format, model_loader_extra_config=json.dumps(extra or {}))
    loader = get_model_loader(load_config, config)
    t = time.perf_counter()
    model = loader.load_model(model_config=config, device_config=DeviceConfig(device))
    return model, loader, time.perf_counter() - t
