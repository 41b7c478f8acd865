"""Synthetic Llama-like safetensors checkpoints, with a tokenizer, for the demo, tests and benchmarks.

``make_demo(directory, size_bytes)`` writes a sharded Hugging Face style checkpoint
(``model-0000i-of-0000N.safetensors``, ``model.safetensors.index.json``, ``config.json``) whose
tensors have Llama's names and proportions, scaled so that the tensor bytes add up to about
``size_bytes``. Files are written one tensor at a time in bounded memory: each shard is
``8-byte little-endian header length + JSON header + data``, the format ``safetensors`` reads.

Every bit that varies is drawn from the tensor's own seeded ``torch.Generator`` (64 random bits
at a time, then masked): random sign, mantissa and two low exponent bits under a fixed high
exponent, so weights are finite and spread log-uniformly over +-[2**-11, 2**-7), norm weights over
[0.5, 1). No page repeats another, so nothing dedupes; like real bf16 weights, the fixed exponent
bits would let a compressing store shrink it somewhat. Generating this way is several times
faster than drawing floats with ``normal_``/``uniform_`` (docs/measurements.md). Same arguments,
same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import zlib
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..config import parse_size as _config_parse_size
from ..core.header import encode_header
from ..core.reader import progress_bar

__all__ = ["DemoShape", "demo_shape", "make_demo", "parse_size", "write_demo_tokenizer"]

logger = logging.getLogger(__name__)

_DTYPES = {
    # name -> (torch dtype, safetensors dtype string)
    "bfloat16": (torch.bfloat16, "BF16"),
    "float16": (torch.float16, "F16"),
    "float32": (torch.float32, "F32"),
}

_HIDDEN_CANDIDATES = (8192, 6144, 5120, 4096, 3072, 2048, 1536, 1024, 768, 512, 384, 256, 128, 64)
_MIN_LAYERS = 4
_HF_SHARD_BYTES = 5_000_000_000  # transformers' default max_shard_size ("5GB")

# Bytes per generated chunk: the only buffer, reused for every tensor (bounds memory).
_CHUNK_BYTES = 32 << 20

# Floating dtype -> (integer view, mantissa bits, exponent bias): enough to build values bit-wise.
_BITS = {
    torch.bfloat16: (torch.int16, 7, 127),
    torch.float16: (torch.int16, 10, 15),
    torch.float32: (torch.int32, 23, 127),
}

# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------

def parse_size(text: Union[str, int]) -> int:
    """Bytes from a human size: ``3GB``, ``1.5G``, ``512MiB``, ``100MB``, ``"4096"`` or an int.

    The project's one size syntax (:func:`loader_plugins.config.parse_size`): ``K/M/G/T`` with or
    without ``B`` are decimal (``1.5G`` is 1.5e9), ``KiB/MiB/GiB/TiB`` binary; case-insensitive.
    Negative sizes are rejected here as well. Raises ``ValueError``.
    """
    n = _config_parse_size(text)
    if n < 0:
        raise ValueError(f"size must not be negative: {text!r}")
    return n


# --------------------------------------------------------------------------------------------
# Shape
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DemoShape:
    """The Llama dimensions ``make_demo`` picked for a size (and the bytes they come to)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    vocab_size: int
    dtype: str

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=_DTYPES[self.dtype][0]).element_size()

    def tensors(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """(name, shape) of every tensor, in model order (what ``model.state_dict()`` yields)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        inter = self.intermediate_size
        out: List[Tuple[str, Tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab_size, h))]
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            out += [
                (p + "self_attn.q_proj.weight", (q, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, q)),
                (p + "mlp.gate_proj.weight", (inter, h)),
                (p + "mlp.up_proj.weight", (inter, h)),
                (p + "mlp.down_proj.weight", (h, inter)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab_size, h))]
        return out

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors()) * self.element_size

    def config(self) -> dict:
        """A ``config.json`` for ``LlamaForCausalLM`` with these dimensions."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": self.num_hidden_layers,
            "vocab_size": self.vocab_size,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": self.dtype,
        }


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def demo_shape(size_bytes: int, dtype: str = "bfloat16") -> DemoShape:
    """Llama dimensions whose tensors add up to about ``size_bytes``.

    The largest hidden size that still leaves at least 4 layers is taken (4096 from about
    2.3 GB in bf16, 2048 at 1 GB, 8192 from about 8 GB), with Llama-3 proportions: intermediate
    3.5 x hidden, head_dim 32 to 128, a quarter as many KV heads as query heads. The vocabulary
    absorbs what whole layers leave, so the total lands within ``128 x hidden`` elements of the
    target (unless the target is below the smallest model, 64 hidden and one layer).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    el = torch.empty((), dtype=_DTYPES[dtype][0]).element_size()
    size_bytes = parse_size(size_bytes)
    chosen = None
    for h in _HIDDEN_CANDIDATES:
        head_dim = min(128, max(32, h // 16))   # vLLM's CPU attention wants >= 32
        heads = h // head_dim
        kv_heads = max(1, heads // 4)
        inter = _round_to(h * 3.5, 256 if h >= 1024 else 64)
        kv = kv_heads * head_dim
        layer_elems = 2 * h * h + 2 * kv * h + 3 * inter * h + 2 * h
        vocab_nominal = min(32000, 32 * h)
        fixed_elems = 2 * vocab_nominal * h + h
        layers = (size_bytes // el - fixed_elems) // layer_elems
        chosen = (h, head_dim, heads, kv_heads, inter, layer_elems, max(1, layers))
        if layers >= _MIN_LAYERS:
            break
    h, head_dim, heads, kv_heads, inter, layer_elems, layers = chosen
    remainder = size_bytes // el - layers * layer_elems - h
    vocab = max(64, (remainder // (2 * h)) // 64 * 64)
    return DemoShape(
        hidden_size=h,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_hidden_layers=layers,
        vocab_size=vocab,
        dtype=dtype,
    )


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _split_shards(sizes: Sequence[int], shards: int) -> List[int]:
    """Shard index of each tensor: contiguous runs of about equal bytes, none empty."""
    n_tensors, total = len(sizes), sum(sizes)
    if not 1 <= shards <= n_tensors:
        raise ValueError(f"shards must be between 1 and the tensor count ({n_tensors}), got {shards}")
    assign: List[int] = []
    shard, in_shard, cum = 0, 0, 0
    for i, size in enumerate(sizes):
        left = n_tensors - i
        if in_shard and shard < shards - 1 and left <= shards - 1 - shard:
            shard, in_shard = shard + 1, 0
        assign.append(shard)
        in_shard += 1
        cum += size
        if shard < shards - 1 and i + 1 < n_tensors and cum * shards >= (shard + 1) * total:
            shard, in_shard = shard + 1, 0
    if assign[-1] != shards - 1:  # cannot happen; a wrong split must not pass silently
        raise AssertionError(f"shard split left shards empty: {assign}")
    return assign


def _safetensors_header(entries: Sequence[Tuple[str, Tuple[int, ...], int]], st_dtype: str) -> bytes:
    """Length prefix + JSON header, tensors laid out in order, data start 8-aligned."""
    header, _ = encode_header({name: (st_dtype, shape, nbytes) for name, shape, nbytes in entries}, {"format": "pt"})
    return header


def _tensor_seed(seed: int, name: str) -> int:
    # Stable across runs and Python versions (unlike hash()); independent of shard layout.
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF_FFFF


def _masks(dtype: torch.dtype, norm: bool) -> Tuple[int, int]:
    """(keep, fixed): ``bits & keep | fixed`` turns random bits into a value of the wanted range."""
    int_dtype, mantissa_bits, bias = _BITS[dtype]
    width = torch.iinfo(int_dtype).bits
    mantissa = (1 << mantissa_bits) - 1
    if norm:  # [0.5, 1): positive, exponent -1
        keep, fixed = mantissa, (bias - 1) << mantissa_bits
    else:  # +-[2**-11, 2**-7): random sign and two low exponent bits over exponent -11
        keep = (1 << (width - 1)) | (3 << mantissa_bits) | mantissa
        fixed = (bias - 11) << mantissa_bits  # bias - 11 has its two low bits clear for all three
    if keep >= 1 << (width - 1):  # as the signed integer torch's bitwise ops take
        keep -= 1 << width
    return keep, fixed


def _chunks(name: str, nbytes: int, dtype: torch.dtype, seed: int, raw: torch.Tensor) -> Iterator[torch.Tensor]:
    """The tensor's bytes as uint8 views of ``raw`` (an int64 buffer, reused), chunk by chunk."""
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    int_dtype = _BITS[dtype][0]
    el = torch.empty((), dtype=int_dtype).element_size()
    keep, fixed = _masks(dtype, norm=name.endswith("norm.weight"))
    done = 0
    while done < nbytes:
        m = min(raw.numel() * 8, nbytes - done)
        words = raw[: -(-m // 8)].random_(-(2**63), None, generator=gen)  # full 64-bit range
        words.view(int_dtype)[: m // el].bitwise_and_(keep).bitwise_or_(fixed)
        yield words.view(torch.uint8)[:m]
        done += m


def _write_all(f, data) -> None:
    view = memoryview(data)
    while view:  # unbuffered writes may be short
        view = view[f.write(view) :]


def make_demo(
    directory: Union[str, os.PathLike],
    size_bytes: Union[int, str],
    *,
    shards: Optional[int] = None,
    dtype: str = "bfloat16",
    seed: int = 0,
    progress: Optional[bool] = None,
    tokenizer: bool = True,
) -> List[Path]:
    """Write a Llama-like checkpoint of about ``size_bytes`` tensor bytes into ``directory``.

    Writes ``model-0000i-of-0000N.safetensors`` shards, ``model.safetensors.index.json``
    (``weight_map`` and ``metadata.total_size``, the sum of tensor bytes), a ``config.json`` and,
    unless ``tokenizer`` is false, a tokenizer (:func:`write_demo_tokenizer`), and returns the shard
    paths in order. ``size_bytes`` may be a string (``"3GB"``, see
    :func:`parse_size`). ``shards`` defaults to max(2, size / 5 GB), the way transformers shards.
    Memory stays at 32 MiB (one chunk buffer) whatever the size. Same arguments, same bytes.

    ``progress``: a tqdm bar on stderr; ``None`` shows it only when stderr is a terminal.
    Refuses a directory that holds other ``*.safetensors`` files (a loader globbing the directory
    would read them too); files of the same names are overwritten.
    """
    shape = demo_shape(parse_size(size_bytes), dtype)
    torch_dtype, st_dtype = _DTYPES[dtype]
    el = shape.element_size
    specs = [(name, dims, math.prod(dims) * el) for name, dims in shape.tensors()]
    total = sum(nbytes for _, _, nbytes in specs)
    if shards is None:
        shards = max(2, -(-total // _HF_SHARD_BYTES))
    assign = _split_shards([nbytes for _, _, nbytes in specs], shards)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    strangers = sorted(p.name for p in directory.glob("*.safetensors") if p.name not in names)
    if strangers:
        raise FileExistsError(
            f"{directory} already holds other safetensors files ({', '.join(strangers[:5])}"
            f"{', ...' if len(strangers) > 5 else ''}); use an empty directory"
        )

    logger.info(
        "demo checkpoint: %s bytes, hidden %s, %s layers, vocab %s, %s shards in %s",
        total, shape.hidden_size, shape.num_hidden_layers, shape.vocab_size, shards, directory,
    )
    raw = torch.empty(_CHUNK_BYTES // 8, dtype=torch.int64)
    mode = "auto" if progress is None else ("on" if progress else "off")
    bar = progress_bar(total, "demo", mode)
    paths: List[Path] = []
    try:
        for shard in range(shards):
            entries = [spec for spec, s in zip(specs, assign) if s == shard]
            path = directory / names[shard]
            tmp = path.with_name(path.name + ".partial")
            try:
                with open(tmp, "wb", buffering=0) as f:
                    _write_all(f, _safetensors_header(entries, st_dtype))
                    for name, _dims, nbytes in entries:
                        for chunk in _chunks(name, nbytes, torch_dtype, seed, raw):
                            _write_all(f, chunk.numpy())
                            if bar is not None:
                                bar.update(chunk.numel())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            paths.append(path)
    finally:
        if bar is not None:
            bar.close()

    index = {
        "metadata": {"total_size": total},
        "weight_map": {name: names[s] for (name, _, _), s in sorted(zip(specs, assign))},
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    if tokenizer:
        write_demo_tokenizer(directory)
    return paths


def write_demo_tokenizer(directory: Union[str, os.PathLike]) -> None:
    """Give the demo checkpoint in ``directory`` a tokenizer of its ``config.json``'s vocabulary, so that
    ``vllm serve`` can serve it (:mod:`.tokenizer`: a byte-level BPE made locally, no model hub)."""
    from .tokenizer import write_tokenizer

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    write_tokenizer(directory, config["vocab_size"], config["max_position_embeddings"])
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
