"""Load pooling checkpoints with vLLM's ``safetensors`` loader and with ``streamer``, one engine
after the other in this process, and print what each produced (for test_vllm_pooling.py).

    python integration_tests/_vllm_pooling_job.py '{"models": [{"name": N, "path": DIR, "task": T, "engine": {}}]}'

(``engine``: more ``LLM(...)`` arguments, e.g. ``hf_overrides``.)

Per model and load format, one ``RESULT {...}`` line: the outputs of ``task`` (``embed``: the
pooled embedding of each of PROMPTS; ``classify``: the class probabilities of each prompt;
``score``: the cross-encoder score of QUERY with each of DOCUMENTS), the prompt token ids, the
class vLLM built, and, as the generation matrix records them (:mod:`_vllm_matrix_job`, whose
loader patches this module installs by importing it), a SHA-256 of every parameter and buffer
right after ``load_weights`` and after post-processing, and the streamer's ``last_stats``.
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

from _smoke_vllm_default import CPU_ENGINE_KWARGS, PROMPT  # noqa: E402
from _vllm_matrix_job import _worker_report  # noqa: E402  (importing it patches both loaders)

PROMPTS = [PROMPT, "The model is a world of names and the name is a model", "Hello"]
QUERY = "What is my name?"
DOCUMENTS = ["My name is the model of the world.", "Hello world", "A world of names and models in the world."]


def _outputs(llm, task: str) -> dict:
    if task == "embed":
        pooled = llm.embed(PROMPTS, use_tqdm=False)
        return {"embedding": [list(o.outputs.embedding) for o in pooled],
                "prompt_token_ids": [list(o.prompt_token_ids) for o in pooled]}
    if task == "classify":
        classes = llm.classify(PROMPTS, use_tqdm=False)
        return {"probs": [list(o.outputs.probs) for o in classes],
                "prompt_token_ids": [list(o.prompt_token_ids) for o in classes]}
    if task == "score":
        scores = llm.score(QUERY, DOCUMENTS, use_tqdm=False)
        return {"score": [o.outputs.score for o in scores],
                "prompt_token_ids": [list(o.prompt_token_ids) for o in scores]}
    raise ValueError(f"unknown task {task!r}")


def _model_class(worker) -> str:
    return type(worker.model_runner.get_model()).__name__


def run_one(item: dict, load_format: str) -> dict:
    from vllm import LLM

    t0 = time.monotonic()
    llm = LLM(item["path"], load_format=load_format, dtype="float32", seed=0, runner="pooling",
              **CPU_ENGINE_KWARGS, **item.get("engine", {}))
    start_s = time.monotonic() - t0
    result = {"start_s": round(start_s, 2), "tasks": sorted(llm.supported_tasks), **_outputs(llm, item["task"]),
              "model_class": llm.collective_rpc(_model_class)[0], "ranks": llm.collective_rpc(_worker_report)}
    del llm
    return result


def main(spec: dict) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory

    for item in spec["models"]:
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
