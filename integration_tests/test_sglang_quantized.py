"""Quantized checkpoints through SGLang 0.5.23's CPU engine: the streamer loads exactly what
SGLang's own ``safetensors`` loader loads, as far as SGLang gets here.

The checkpoints are ``_quant_models.QUANTIZED`` (tiny Llama / Qwen3-MoE, every decoder linear
written by hand in a real format's tensors, a layer's tensors spread over three shards), plus
``gptq_desc_act_static_groups``: ``gptq_desc_act`` with ``static_groups: true`` in its
config (the tensors unchanged), the only act-order GPTQ SGLang's CPU engine accepts. One
process (``_sglang_quant_job.py``) loads each with both loaders, in the checkpoint's dtype,
through SGLang's ``get_model_loader(LoadConfig(load_format=...)).load_model``, and compares
every parameter and buffer bit for bit (dtype, shape, strides, bytes) after ``load_weights``
and after SGLang's post-processing where that runs; where SGLang's loader fails, the streamer
must fail at the same stage with the same error.

How far SGLang's own loader gets here (no AMX on these CPUs; ``sgl_kernel``'s CPU build is on no
registry, and the stand-in registers no ``torch.ops.sgl_kernel`` op; ``SHIPPED`` holds each
exact error):

- AWQ gemm: loads and post-processes. Without AMX, ``get_quantization_config`` gives the GPU
  ``AWQConfig``; its ``AWQLinearKernel.apply`` calls ``sglang::awq_dequantize``, a CUDA JIT
  kernel registered for CUDA only: no forward.
- GPTQ (desc_act false, or act order with static groups): ``load_weights`` runs; SGLang's CPU
  GPTQ is the Intel AMX kernel on any CPU (``CPUGPTQConfig`` -> ``GPTQIntelAMXLinearKernel``),
  whose post-processing repacks with ``torch.ops.sgl_kernel.convert_weight_packed_scale_zp``
  (and whose forward is ``int4_scaled_mm_cpu``): ops of sgl_kernel's CPU build.
- GPTQ desc_act true without static groups: refused while the model is built
  (``gptq_cpu.py _check_cpu_amx_support``: act order needs ``true_sequential`` and
  ``static_groups``).
- every compressed-tensors format (W8A8 int8, W4A16, FP8 dynamic, the Qwen3-MoE): refused while
  the model is built: ``CompressedTensorsConfig._check_scheme_supported`` calls
  ``torch.cuda.get_device_capability()`` except on XPU and NPU ("Found no NVIDIA driver"),
  whatever sgl_kernel provides.

For the compressed-tensors formats the job loads them again with that one check lifted (what a
GPU of the scheme's capability passes; not SGLang as shipped, reported apart, ``LIFTED``):
SGLang's own compressed-tensors parameters and weight loaders then run on the CPU, and the
streamer is compared against them. W8A8 int8 per channel, FP8 dynamic and the Qwen3-MoE load and
post-process; W8A8 per tensor fails in post-processing (``requantize_with_max_scale`` ->
``scaled_fp8_quant``: ``sgl_per_tensor_quant_fp8`` not defined), W4A16 there too
(``marlin_make_workspace``: CUDA); static input scales fail in SGLang's ``load_weights``
(``input_scale`` is one element, the fused q/k/v loader indexes it by shard: IndexError).

No generate runs: one quantized linear of every model that loads fails on three tokens (the
errors are asserted), so there are no greedy ids to compare; the parameters are.

``SGLANG_QUANT_REPORT=FILE`` writes the table (markdown) there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from test_sglang import SGLANG_PY, _env  # noqa: E402 - skips this module as it skips itself

from _quant_models import QUANTIZED, make_quant_checkpoint  # noqa: E402

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

JOB = HERE / "_sglang_quant_job.py"
_BUILD_CT = ("build", "Found no NVIDIA driver",
             "compressed_tensors.py:416 _check_scheme_supported: torch.cuda.get_device_capability()")
_GPTQ_AMX = ("postprocess", "'sgl_kernel' object has no attribute 'convert_weight_packed_scale_zp'",
             "GPTQIntelAMXLinearKernel: torch.ops.sgl_kernel.convert_weight_packed_scale_zp (sgl_kernel's CPU build)")
#: name -> (stage SGLang's own loader reaches: build / load_weights / postprocess / loaded, a
#: piece of its error (None: none), why): SGLang 0.5.23's CPU engine, no AMX, the stand-in
SHIPPED = {
    "awq_gemm": ("loaded", None, ""),
    "gptq": _GPTQ_AMX,
    "gptq_desc_act": ("build", "desc_act (True) is only supported with sequential and static group on CPU",
                      "gptq_cpu.py _check_cpu_amx_support: act order needs true_sequential and static_groups"),
    "gptq_desc_act_static_groups": _GPTQ_AMX,
    **{name: _BUILD_CT for name, spec in QUANTIZED.items() if spec["scheme"].startswith("ct_")},
}
_STATIC_INPUT = ("load_weights", "IndexError: index 1 is out of bounds for dimension 0 with size 1",
                 "SGLang's input_scale has one element; the fused q/k/v loader indexes it by shard (parameter.py:439)")
_MARLIN = ("postprocess", "Found no NVIDIA driver", "marlin_make_workspace: torch.cuda.get_device_properties")
#: the same with ``_check_scheme_supported`` lifted (compressed-tensors only)
LIFTED = {
    "ct_w8a8_int8_channel": ("loaded", None, ""),
    "ct_w8a8_int8_tensor": ("postprocess", "name 'sgl_per_tensor_quant_fp8' is not defined",
                            "requantize_with_max_scale -> scaled_fp8_quant: sgl_kernel's per-tensor FP8 quant"),
    "ct_w8a8_int8_static": _STATIC_INPUT,
    "ct_w8a8_int8_static_asym": _STATIC_INPUT,
    "ct_w4a16_group": _MARLIN,
    "ct_w4a16_group_asym": _MARLIN,
    "ct_fp8_dynamic": ("loaded", None, ""),
    "qwen3_moe_ct_w8a8_attn": ("loaded", None, ""),
}
#: a piece of the error of one quantized linear's forward, for each model that loads
FORWARD = {
    "awq_gemm": "Could not run 'sglang::awq_dequantize' with arguments from the 'CPU' backend",
    "ct_w8a8_int8_channel": "0 active drivers",          # Triton per_token_quant_int8, no GPU driver
    "qwen3_moe_ct_w8a8_attn": "0 active drivers",
    "ct_fp8_dynamic": "name 'sgl_per_token_quant_fp8' is not defined",
}

_FUSED = r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\."
#: tensors that go through SGLang's load_weights, with real bytes (every other one in place)
THROUGH = {
    # AWQ and GPTQ keep out_features in dim 1 (output_dim=1): a fused layer's shard is a column
    # range, a strided destination the streamer does not fill
    "awq_gemm": _FUSED + r"(qweight|qzeros|scales)$",
    # and GPTQ's g_idx [in_features] is copied whole into the fused layer's one g_idx by every
    # shard (a region written more than once is left to the loader)
    "gptq": _FUSED + r"(qweight|qzeros|scales|g_idx)$",
    # without groups, scales [1, out] and qzeros [1, out / 8] have one row: a column range of
    # one row is contiguous, so only qweight [in / 8, out] is strided
    "gptq_desc_act_static_groups": _FUSED + r"(qweight|g_idx)$",
    # each shard's weight_shape [2] is copied whole into the fused layer's one parameter
    "ct_w4a16_group": _FUSED + r"weight_shape$",
    "ct_w4a16_group_asym": _FUSED + r"weight_shape$",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sglang-quantized")
    out = {name: str(make_quant_checkpoint(name, root / name)) for name in QUANTIZED}
    variant = root / "gptq_desc_act_static_groups"
    shutil.copytree(out["gptq_desc_act"], variant)
    config = json.loads((variant / "config.json").read_text())
    config["quantization_config"]["static_groups"] = True
    (variant / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    out[variant.name] = str(variant)
    return out


@pytest.fixture(scope="module")
def results(checkpoints, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("sglang-quantized-job")
    standin_log = tmp / "standin.log"
    env = {**_env(standin_log), "LOADER_PLUGINS_HISTORY_DIR": str(tmp / "history")}   # this run's recipes only
    args = [f"{name}={path}" for name, path in checkpoints.items()]
    proc = subprocess.run([str(SGLANG_PY), str(JOB), *args, "--lift-capability-check", *LIFTED], env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the SGLang job printed no result (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in result, result["error"] + "\n" + proc.stderr[-3000:]
    result["standin_calls"] = standin_log.read_text().splitlines() if standin_log.exists() else []
    result["checkpoint_tensors"] = {
        name: sorted(json.loads((Path(path) / "model.safetensors.index.json").read_text())["weight_map"])
        for name, path in checkpoints.items()}
    report = os.environ.get("SGLANG_QUANT_REPORT")
    if report:
        Path(report).write_text(_report(result))
    return result


def _rows(result):
    for name, row in result["shipped"].items():
        yield name, "", row, SHIPPED[name]
    for name, row in result["lifted"].items():
        yield name, " (capability check lifted)", row, LIFTED[name]


def _report(result) -> str:
    lines = ["| format | loads with SGLang's loader | identical | in place: tensors / bytes | "
             "through load_weights: tensors / bytes |", "|---|---|---|---|---|"]
    forwards = []
    for name, label, row, _ in _rows(result):
        theirs, st = row["safetensors"], row["stats"]
        if theirs["stage"] == "loaded":
            loads = "yes: load_weights and post-processing"
        elif theirs["stage"] == "postprocess":
            loads = f"load_weights only; post-processing fails: `{theirs['error']}`"
        else:
            loads = f"no, fails in {theirs['stage']}: `{theirs['error']}`"
        same = row["streamer"]["stage"] == theirs["stage"] and row["streamer"]["error"] == theirs["error"]
        compared = [f"{row[w]['tensors']} tensors after {what}" for w, what in
                    (("loaded", "load_weights"), ("post", "post-processing")) if w in row]
        if compared:
            ok = all(not row[w]["differ"] and not row[w]["strides"] and not row[w]["extra"]
                     for w in ("loaded", "post") if w in row)
            identical = ("yes" if ok and same else "**no**") + ": " + ", ".join(compared)
        else:
            identical = "fails the same way (stage, error)" if same else "**fails otherwise**"
        placed = f"{st['in_place']} / {st['in_place_bytes']:,}" if st else ""
        through = f"{st['via_model']} / {st['via_model_bytes']:,}" if st else ""
        if st and st["reasons"]:
            through += " (" + "; ".join(f"{why}: {n}" for why, n in st["reasons"].items()) + ")"
        lines.append(f"| {name}{label} | {loads} | {identical} | {placed} | {through} |")
        if theirs.get("forward_error"):
            forwards.append(f"- {name}{label}: `{theirs['forward_error']}`")
    text = "\n".join(lines) + "\n"
    if forwards:
        text += "\nNo generate: one quantized linear fails on three tokens:\n\n" + "\n".join(forwards) + "\n"
    return text


def test_sglangs_own_loader_gets_as_far_as_listed_and_the_streamer_as_far(results):
    assert set(results["shipped"]) == set(SHIPPED) and set(results["lifted"]) == set(LIFTED)
    for name, label, row, (stage, error, _) in _rows(results):
        theirs, ours = row["safetensors"], row["streamer"]
        assert theirs["stage"] == stage, (name + label, theirs)
        if error is None:
            assert theirs["error"] is None, (name + label, theirs)
        else:
            assert error in (theirs["error"] or ""), (name + label, theirs)
        # where SGLang's loader fails, the streamer fails at the same stage with the same error
        assert ours["stage"] == theirs["stage"] and ours["error"] == theirs["error"], (name + label, ours, theirs)
        assert ours.get("quant_methods") == theirs.get("quant_methods"), name + label


def test_every_parameter_and_buffer_is_sglangs_bit_for_bit(results):
    compared = 0
    for name, label, row, _ in _rows(results):
        stage = row["safetensors"]["stage"]
        assert ("loaded" in row) == (stage in ("postprocess", "loaded")), (name + label, row.keys())
        assert ("post" in row) == (stage == "loaded"), (name + label, row.keys())
        for when in ("loaded", "post"):
            if when in row:
                got = row[when]
                assert got["differ"] == [] and got["strides"] == [] and got["extra"] == [], (name + label, when, got)
                assert got["tensors"] > 0
                compared += 1
    # as shipped: AWQ after load_weights and after post-processing, both GPTQ after load_weights;
    # lifted: six after load_weights, three of them after post-processing too
    assert compared == 13, compared


def test_tensors_in_place_and_through_load_weights(results):
    for name, label, row, _ in _rows(results):
        st = row["stats"]
        if st is None:
            continue
        tensors = results["checkpoint_tensors"][name]
        assert st["in_place"] > 0 and st["unused"] == 0, (name + label, st)
        assert st["in_place"] + st["via_model"] == len(tensors), (name + label, st)
        assert st["in_place_bytes"] + st["via_model_bytes"] == st["checkpoint_bytes"], (name + label, st)
        through = THROUGH.get(name)
        expected = {t for t in tensors if through and re.search(through, t)}
        assert set(st["through"]) == expected, (name + label, sorted(set(st["through"]) ^ expected)[:10])


def test_no_quantized_linear_runs_here_so_no_generate(results):
    for name, label, row, _ in _rows(results):
        theirs = row["safetensors"]
        if theirs["stage"] != "loaded":
            continue
        assert theirs["forward_error"] is not None, (
            f"{name}{label}: a quantized linear now runs on SGLang's CPU engine: compare greedy ids with an "
            "Engine (as _sglang_job.py's engine job does)")
        assert FORWARD[name] in theirs["forward_error"], (name + label, theirs["forward_error"])
        assert row["streamer"]["forward_error"] == theirs["forward_error"], name + label
    # every failure above is SGLang's own (CUDA, Triton, missing torch ops), not the stand-in's
    assert results["standin_calls"] == [], results["standin_calls"]
