"""Tiny Llama-style Hugging Face checkpoints, written locally (no model hub).

``make_tiny_llama(dir)`` writes everything vLLM and ``transformers.AutoTokenizer`` need to load a model
with ``HF_HUB_OFFLINE=1``:

- ``config.json``: ``LlamaForCausalLM``, hidden 128, 4 attention heads of 32 (head_dim >= 32 as vLLM's CPU
  attention wants), 2 KV heads (so grouped-query attention is exercised), untied ``lm_head``;
- ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``
  when ``shards > 1`` (tensors are dealt out in checkpoint order, balanced by bytes);
- ``tokenizer.json`` (a byte-level BPE trained with the ``tokenizers`` library on generated
  pseudo-words, :mod:`loader_plugins.bench.tokenizer`; its vocabulary is exactly ``vocab_size``), ``tokenizer_config.json``,
  ``special_tokens_map.json`` and ``generation_config.json``.

Weights are random, drawn from ``torch.Generator().manual_seed(seed)``: the same seed gives byte-identical
files, another seed other weights. The tokenizer does not depend on the seed. Scales are chosen so that
greedy decoding walks through many different tokens instead of repeating one: embeddings and ``lm_head``
have unit std (the logits are dominated by a random token-to-token map), projections ``1/sqrt(fan_in)``,
norms around 1. The ``lm_head`` rows of the special tokens and of tokens that do not decode to printable
ASCII are zero, so greedy decoding practically never picks ``</s>`` (generation runs to ``max_tokens``)
and the generated text is readable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from loader_plugins.bench.tokenizer import write_tokenizer

__all__ = ["make_tiny_llama", "tiny_llama_tensor_names"]



def tiny_llama_tensor_names(layers: int = 2) -> list[str]:
    """The tensor names of a ``make_tiny_llama`` checkpoint, in the order they are written."""
    names = ["model.embed_tokens.weight"]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [
            p + "input_layernorm.weight",
            p + "self_attn.q_proj.weight",
            p + "self_attn.k_proj.weight",
            p + "self_attn.v_proj.weight",
            p + "self_attn.o_proj.weight",
            p + "post_attention_layernorm.weight",
            p + "mlp.gate_proj.weight",
            p + "mlp.up_proj.weight",
            p + "mlp.down_proj.weight",
        ]
    names += ["model.norm.weight", "lm_head.weight"]
    return names


def make_tiny_llama(
    dir: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    shards: int = 1,
    seed: int = 0,
    vocab_size: int = 512,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    max_position_embeddings: int = 1024,
) -> Path:
    """Write a tiny random Llama checkpoint with its tokenizer into ``dir`` (created if missing).

    ``dtype`` is ``"float32"`` or ``"bfloat16"`` (``"float16"`` also works). ``shards`` > 1 splits the
    weights over that many files with an index. Returns ``Path(dir)``.
    """
    import torch
    from safetensors.torch import save_file

    torch_dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in torch_dtypes:
        raise ValueError(f"dtype must be one of {sorted(torch_dtypes)}, got {dtype!r}")
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden ({hidden}) must divide by heads ({heads}), heads by kv_heads ({kv_heads})")
    n_tensors = len(tiny_llama_tensor_names(layers))
    if not 1 <= shards <= n_tensors:
        raise ValueError(f"shards must be in 1..{n_tensors} for {layers} layers, got {shards}")
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 byte tokens + specials + merges), got {vocab_size}")

    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    intermediate = intermediate or 2 * hidden

    # The tokenizer first: its vocabulary decides which lm_head rows are silenced.
    quiet_ids = write_tokenizer(out, vocab_size, max_position_embeddings)

    # --- weights -------------------------------------------------------------------------------------
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    def norm_weight() -> torch.Tensor:
        # Around 1, not exactly 1, so a loader that drops a norm is caught.
        return 1.0 + randn(hidden, std=0.1)

    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": randn(vocab_size, hidden, std=1.0)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = norm_weight()
        tensors[p + "self_attn.q_proj.weight"] = randn(heads * head_dim, hidden, std=hidden**-0.5)
        tensors[p + "self_attn.k_proj.weight"] = randn(kv_heads * head_dim, hidden, std=hidden**-0.5)
        tensors[p + "self_attn.v_proj.weight"] = randn(kv_heads * head_dim, hidden, std=hidden**-0.5)
        tensors[p + "self_attn.o_proj.weight"] = randn(hidden, heads * head_dim, std=(heads * head_dim) ** -0.5)
        tensors[p + "post_attention_layernorm.weight"] = norm_weight()
        tensors[p + "mlp.gate_proj.weight"] = randn(intermediate, hidden, std=hidden**-0.5)
        tensors[p + "mlp.up_proj.weight"] = randn(intermediate, hidden, std=hidden**-0.5)
        tensors[p + "mlp.down_proj.weight"] = randn(hidden, intermediate, std=intermediate**-0.5)
    tensors["model.norm.weight"] = norm_weight()
    lm_head = randn(vocab_size, hidden, std=1.0)
    lm_head[quiet_ids] = 0.0  # keep greedy decoding away from </s> and unprintable bytes
    tensors["lm_head.weight"] = lm_head
    assert list(tensors) == tiny_llama_tensor_names(layers)
    tensors = {k: v.to(torch_dtypes[dtype]).contiguous() for k, v in tensors.items()}

    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()
    metadata = {"format": "pt"}
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
    else:
        groups = _split_by_bytes(tensors, shards)
        weight_map: dict[str, str] = {}
        for i, names in enumerate(groups, start=1):
            fname = f"model-{i:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in names}, str(out / fname), metadata=metadata)
            weight_map.update({n: fname for n in names})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(out / "model.safetensors.index.json", index)

    # --- config --------------------------------------------------------------------------------------
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": dtype,
        "use_cache": True,
    }
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    return out


def _split_by_bytes(tensors: dict, shards: int) -> list[list[str]]:
    """Contiguous groups of names in checkpoint order, each near ``total / shards`` bytes, none empty."""
    names = list(tensors)
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    target = sum(sizes) / shards
    groups: list[list[str]] = []
    current: list[str] = []
    acc = 0
    for idx, (name, size) in enumerate(zip(names, sizes)):
        current.append(name)
        acc += size
        left_names = len(names) - idx - 1
        left_groups = shards - len(groups) - 1
        if left_groups and (acc >= target * (len(groups) + 1) or left_names == left_groups):
            groups.append(current)
            current = []
    groups.append(current)
    assert len(groups) == shards and all(groups)
    return groups


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


if __name__ == "__main__":  # pragma: no cover - manual use: python _tiny_models.py DIR [SHARDS]
    import sys

    target = make_tiny_llama(sys.argv[1], shards=int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    print(target, sorted(p.name for p in target.iterdir()))
