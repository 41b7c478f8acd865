"""Load multimodal checkpoints with vLLM's ``safetensors`` loader and with ``streamer``, one engine
after the other in this process, and print what each produced (for test_vllm_multimodal.py).

    python integration_tests/_vllm_mm_job.py '{"models": [{"name": N, "path": DIR, "write": true}, ...]}'

(``write``: first write the checkpoint there, ``_mm_models.make_mm_checkpoint``: transformers'
processor classes import torchvision, so this runs where the stand-in is.)

Run with ``torchvision_standin/`` first on ``PYTHONPATH`` (the CUDA-built torchvision does not
load against the CPU torch); image processing takes transformers' PIL processors
(``mm_processor_kwargs={"use_fast": False}``: the image processor's ``backend="pil"``; a
``backend`` argument itself would also reach Qwen2-VL's video processor, which has no PIL
backend), so no torchvision function runs.

Per model and load format, one ``RESULT {...}`` line: for each prompt (two text prompts, then one
prompt with each of two pictures drawn in code, ``_mm_models.make_image``) the prompt token ids,
the greedy tokens and the top-5 logprobs of every generated and prompt position; as the generation matrix
records them (:mod:`_vllm_matrix_job`, whose loader patches this module installs by importing
it), a SHA-256 of every parameter and buffer right after ``load_weights`` and after
post-processing, and the streamer's ``last_stats`` with, added here, the names of the tensors it
put in place and of those it did not read (``placed_names``, ``unused_names``).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from _mm_models import MM_MODELS, make_image, make_mm_checkpoint  # noqa: E402
from _smoke_vllm_default import CPU_ENGINE_KWARGS, PROMPT  # noqa: E402
from _vllm_matrix_job import LOGPROBS, MAX_TOKENS, _logprobs, _worker_report  # noqa: E402  (patches both loaders)

TEXT_PROMPTS = [PROMPT, "The model is a world of names and the name is a model"]
IMAGE_SEEDS = (0, 1)   # two pictures: their prompts' logprobs differ only through the vision tower
#: modalities vLLM's processor knows for a model beyond images, switched off
OTHER_MODALITIES = {"qwen2_vl": {"video": 0}, "qwen2_5_vl": {"video": 0}}


def _record_names() -> None:
    """Add the in-place and unread tensor names to the streamer's stats (the counts are there)."""
    from loader_plugins.inplace import load

    if getattr(load._stats, "_mm_patched", False):
        return
    original = load._stats

    def _stats(location, specs, prediction, mode, seconds, read_bytes, _original=original):
        stats = _original(location, specs, prediction, mode, seconds, read_bytes)
        materialized = mode.materialized if mode is not None else set()
        stats["placed_names"] = sorted(prediction.placements)
        stats["unused_names"] = sorted(prediction.unused - materialized)
        return stats

    _stats._mm_patched = True
    load._stats = _stats


def _model_class(worker) -> str:
    return type(worker.model_runner.get_model()).__name__


def run_one(item: dict, load_format: str) -> dict:
    from vllm import LLM, SamplingParams

    model = MM_MODELS[item["name"]]
    t0 = time.monotonic()
    llm = LLM(item["path"], load_format=load_format, dtype="float32", seed=0, **CPU_ENGINE_KWARGS,
              limit_mm_per_prompt={"image": 1, **OTHER_MODALITIES.get(item["name"], {})},
              mm_processor_kwargs={"use_fast": False})
    start_s = time.monotonic() - t0
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=LOGPROBS, prompt_logprobs=LOGPROBS,
                            ignore_eos=True)
    images = [make_image(model.image_size, seed) for seed in IMAGE_SEEDS]
    prompts = [*TEXT_PROMPTS, *({"prompt": model.image_prompt, "multi_modal_data": {"image": im}} for im in images)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = {"start_s": round(start_s, 2), "model_class": llm.collective_rpc(_model_class)[0],
              "prompts": [{"prompt_token_ids": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids),
                           "logprobs": _logprobs(o.outputs[0].logprobs),
                           "prompt_logprobs": _logprobs(o.prompt_logprobs)} for o in outputs],
              "ranks": llm.collective_rpc(_worker_report)}
    del llm, outputs
    return result


def main(spec: dict) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory

    _record_names()
    for item in spec["models"]:
        if item.get("write"):
            make_mm_checkpoint(item["name"], item["path"])
        for load_format in spec.get("formats", ["safetensors", "streamer"]):
            record = {"name": item["name"], "format": load_format}
            try:
                record.update(run_one(item, load_format))
            except Exception as exc:  # noqa: BLE001 - reported per model; the test fails on it
                record["error"] = f"{type(exc).__name__}: {exc}"
                record["traceback"] = traceback.format_exc()[-4000:]
            finally:
                cleanup_dist_env_and_memory()   # collects garbage too
            print("RESULT " + json.dumps(record), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
