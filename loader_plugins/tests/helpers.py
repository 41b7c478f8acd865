"""Shared test helpers: checkpoints over every dtype, bit-exact comparison."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

_TORCH_DTYPES = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                 "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "uint16", "uint32", "uint64",
                 "complex64"]

SHAPES = [(), (0,), (3, 0), (1,), (7,), (3, 5), (2, 3, 5), (17, 33), (1, 1, 1, 1), (129, 257)]


def all_dtypes() -> list[torch.dtype]:
    return [getattr(torch, n) for n in _TORCH_DTYPES if getattr(torch, n, None) is not None]


def random_tensor(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    numel = 1
    for d in shape:
        numel *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape).clone()


def tensor_set(seed: int = 0, shapes=SHAPES, dtypes=None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for dtype in dtypes or all_dtypes():
        for shape in shapes:
            name = f"{str(dtype).replace('torch.', '')}.{'x'.join(map(str, shape)) or 'scalar'}"
            out[name] = random_tensor(shape, dtype, gen)
    return out


def as_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    return bytes(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def assert_bit_exact(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected), (sorted(set(got) ^ set(expected)))[:10]
    for name, ref in expected.items():
        t = got[name]
        assert t.dtype == ref.dtype, (name, t.dtype, ref.dtype)
        assert tuple(t.shape) == tuple(ref.shape), (name, t.shape, ref.shape)
        assert as_bytes(t) == as_bytes(ref), f"{name}: bytes differ"


def write_raw(path: os.PathLike, header: dict | bytes, data: bytes = b"", *, length: int | None = None) -> Path:
    """Write a safetensors-like file by hand (for corrupt inputs)."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if length is None else length
    Path(path).write_bytes(struct.pack("<Q", n) + body + data)
    return Path(path)
