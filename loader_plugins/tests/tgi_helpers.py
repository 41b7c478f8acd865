"""Helpers of the TGI adapter's tests (unit and integration): a checkpoint and the calls to compare.

* :func:`write_checkpoint`: a small two-file checkpoint whose tensors exercise TGI's rules
  (ceil blocks that do not divide, packed QKV, every dtype of the cast exemption list and a few
  outside it, a scalar, an empty and a 3-D tensor); :func:`checkpoint_tensors` its tensors.
* :func:`call_matrix`: every ``Weights`` call worth comparing for one tensor; :func:`outcome`
  runs one, a value or an error.

TGI's module and the one-rank process group are shipped code, in
:mod:`loader_plugins.tgi_adapter.tgi_source` (the TGI benchmark uses them too).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

__all__ = ["checkpoint_tensors", "write_checkpoint", "call_matrix", "outcome"]


def checkpoint_tensors(seed: int = 0) -> tuple[dict, dict]:
    """The two files' tensors (``{name: tensor}`` each)."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def floats(shape, dtype):
        return torch.randn(shape, generator=gen).to(dtype)

    def ints(shape, dtype, low=-100, high=100):
        return torch.randint(low, high, shape, generator=gen).to(dtype)

    first = {
        "model.embed_tokens.weight": floats((10, 8), torch.bfloat16),       # 10 rows: ceil blocks
        "model.layers.0.self_attn.qkv_proj.weight": floats((16, 8), torch.bfloat16),  # packed [2,1,1]
        "model.layers.0.self_attn.o_proj.weight": floats((8, 16), torch.float32),
        "model.layers.0.mlp.gate_up_proj.weight": floats((12, 6), torch.float16),
        "model.norm.weight": floats((8,), torch.float32),
        "quant.qweight": ints((4, 8), torch.int32),
        "quant.g_idx": ints((8,), torch.int64, 0, 4),      # int64: get_partial_sharded casts it
        "quant.scales": floats((2, 8), torch.float16),
        "exl2.q_weight": ints((4, 6), torch.int16),
        "int8.weight": ints((6, 4), torch.int8),
        "u8.weight": ints((6, 2), torch.uint8, 0, 255),
        "mask": ints((4,), torch.bool, 0, 2),
        "scalar": floats((), torch.float32),
        "empty": floats((0, 4), torch.float32),
        "conv.weight": floats((4, 3, 2), torch.float32),
    }
    if getattr(torch, "float8_e4m3fn", None) is not None:
        first["fp8.weight"] = floats((4, 4), torch.float8_e4m3fn)
        first["fp8e5.weight"] = floats((4, 4), torch.float8_e5m2)       # not exempt: cast
    second = {
        "lm_head.weight": floats((10, 8), torch.bfloat16),
        "model.layers.1.mlp.down_proj.weight": floats((6, 12), torch.bfloat16),
        "model.layers.1.self_attn.qkv_proj.bias": floats((16,), torch.float32),
        "model.layers.1.wide": floats((3, 10), torch.float64),
    }
    return first, second


def write_checkpoint(directory: os.PathLike, seed: int = 0) -> tuple[list[str], dict]:
    """Write ``model-00001-of-00002.safetensors`` and ``...00002...``; returns (files, all tensors)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    first, second = checkpoint_tensors(seed)
    files = []
    for i, part in enumerate((first, second), 1):
        path = directory / f"model-0000{i}-of-00002.safetensors"
        save_file(part, str(path), metadata={"format": "pt"})
        files.append(str(path))
    return files, {**first, **second}


def call_matrix(name: str, shape: tuple) -> Iterator[tuple[str, tuple, dict]]:
    """(method, args, kwargs) calls that exercise ``name`` of shape ``shape``."""
    yield "get_shape", (name,), {}
    yield "has_tensor", (name,), {}
    for to_dtype in (True, False):
        yield "get_tensor", (name,), {"to_dtype": to_dtype}
    yield "get_tensor", (name,), {"to_device": False}
    for dim in (0, 1, 2):
        for to_dtype in (True, False):
            yield "get_partial_sharded", (name, dim), {"to_dtype": to_dtype}
            yield "get_sharded", (name, dim), {"to_dtype": to_dtype}
        for blocks in (2, [2, 1, 1], 1):
            yield "get_packed_sharded", (name, dim, blocks), {}
        yield "get_packed_sharded", (name, dim, 2), {"to_dtype": False}
    yield "_get_slice[]", (name, (slice(None),)), {}
    if len(shape) >= 1:
        yield "_get_slice[]", (name, (slice(1, 3),)), {}
        yield "_get_slice[]", (name, (slice(-2, None),)), {}
        yield "_get_slice[]", (name, (slice(5, 100),)), {}
    if len(shape) >= 2:
        yield "_get_slice[]", (name, (slice(None), slice(1, 3))), {}
        yield "_get_slice[]", (name, (slice(None), slice(-2, None))), {}


def outcome(weights: Any, method: str, args: tuple, kwargs: dict) -> tuple[str, Any]:
    """Run one call: ``("ok", value)`` or ``("error", (type name, message))``."""
    try:
        if method == "_get_slice[]":
            name, key = args
            slice_ = weights._get_slice(name)
            value = (list(slice_.get_shape()), slice_[key if len(key) > 1 else key[0]])
        else:
            value = getattr(weights, method)(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the error is the outcome being compared
        return "error", (type(exc).__name__, str(exc))
    return "ok", value
