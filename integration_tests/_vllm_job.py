"""Run one offline vLLM engine job in this process and print its result as JSON (for test_vllm.py).

    python integration_tests/_vllm_job.py '{"model": DIR, "load_format": "streamer", "steps": [...]}'

Steps: ``{"generate": true}`` appends the greedy token ids of PROMPT to ``outputs``;
``{"reload": PATH}`` calls ``collective_rpc("reload_weights", kwargs={"weights_path": PATH})``.
The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the caller) for a fast start.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from _smoke_vllm_default import CPU_ENGINE_KWARGS, MAX_TOKENS, PROMPT  # noqa: E402
from _vllm_launcher import patch_vllm_version  # noqa: E402


def main(spec: dict) -> dict:
    patch_vllm_version()
    from vllm import LLM, SamplingParams

    kwargs = dict(CPU_ENGINE_KWARGS)
    if spec.get("extra") is not None:
        kwargs["model_loader_extra_config"] = spec["extra"]
    t0 = time.monotonic()
    llm = LLM(spec["model"], load_format=spec.get("load_format", "streamer"), dtype=spec.get("dtype", "float32"),
              seed=0, **kwargs)
    result: dict = {"start_s": round(time.monotonic() - t0, 2), "outputs": []}
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", MAX_TOKENS))
    for step in spec.get("steps", [{"generate": True}]):
        if step.get("generate"):
            out = llm.generate([PROMPT], params, use_tqdm=False)
            result["outputs"].append(list(out[0].outputs[0].token_ids))
        elif "reload" in step:
            llm.collective_rpc("reload_weights", kwargs={"weights_path": step["reload"]})
    return result


if __name__ == "__main__":
    res = main(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(res), flush=True)
