"""Qwen3-MoE checkpoints shaped like the Hub's, small enough for a 2-core machine.

    model-streamer make-moe DIR [--layout per-expert|fused] [--layers 24] [--experts 128] [--shards 8]

``per-expert`` writes one tensor per expert and projection (``model.layers.L.mlp.experts.E.
gate_proj.weight``), as the Hub's Qwen3-MoE, DeepSeek and Mixtral checkpoints do: the defaults
give 9,435 tensors (Qwen3-30B-A3B has about 18,900, DeepSeek-V3 about 91,000). ``fused`` writes
transformers 5's layout (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj``
[E, H, I]): 267 tensors holding the same experts. Both load in vLLM's and SGLang's Qwen3-MoE
``load_weights``. Values are seeded random bf16, the same for the same arguments.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LAYOUTS = ("per-expert", "fused")


def moe_config(layers: int, experts: int, hidden: int, intermediate: int, vocab: int) -> dict:
    heads, kv_heads, head_dim = max(1, hidden // 32), max(1, hidden // 64), 32
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "torch_dtype": "bfloat16",
        "hidden_size": hidden, "intermediate_size": intermediate * 4, "moe_intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "num_experts": experts, "num_experts_per_tok": min(8, experts),
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "vocab_size": vocab,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
        "eos_token_id": 1, "output_router_logits": False, "router_aux_loss_coef": 0.001,
    }


def moe_tensors(cfg: dict, layout: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in the Hub's order."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    h, i, e, v = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"], cfg["vocab_size"]
    q, kv, hd = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"], cfg["head_dim"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,)),
                (p + "mlp.gate.weight", (e, h))]
        if layout == "fused":
            out += [(p + "mlp.experts.gate_up_proj", (e, 2 * i, h)), (p + "mlp.experts.down_proj", (e, h, i))]
        else:
            for x in range(e):
                out += [(f"{p}mlp.experts.{x}.gate_proj.weight", (i, h)), (f"{p}mlp.experts.{x}.up_proj.weight", (i, h)),
                        (f"{p}mlp.experts.{x}.down_proj.weight", (h, i))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def make_moe(directory: str | os.PathLike, *, layout: str = "per-expert", layers: int = 24, experts: int = 128,
             hidden: int = 128, intermediate: int = 32, vocab: int = 1024, shards: int = 8, seed: int = 0) -> list[Path]:
    """Write a sharded Qwen3-MoE checkpoint (``config.json``, ``model-*-of-*.safetensors``,
    ``model.safetensors.index.json``) to ``directory``; returns the files written."""
    import torch
    from safetensors.torch import save_file

    cfg = moe_config(layers, experts, hidden, intermediate, vocab)
    entries = moe_tensors(cfg, layout)
    gen = torch.Generator().manual_seed(seed)
    total = sum(_numel(s) for _, s in entries)
    per_shard = -(-total // max(1, shards))
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, shape in entries:
        if groups[-1] and filled >= per_shard * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append((name, shape))
        filled += _numel(shape)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    weight_map, written = {}, []
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            t = torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02
            tensors[name] = (t + 1.0 if name.endswith("norm.weight") else t).to(torch.bfloat16)
            weight_map[name] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        written.append(out / fname)
    index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return written + [out / "model.safetensors.index.json", out / "config.json"]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
