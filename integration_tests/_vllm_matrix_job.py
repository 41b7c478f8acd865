"""Load checkpoints with vLLM's ``safetensors`` loader and with ``streamer``, one engine after the
other in this process, and print what each produced (for test_vllm_matrix.py).

    python integration_tests/_vllm_matrix_job.py '{"models": [{"arch": A, "path": DIR}, ...], "tp": 1}'

A model's ``dtype`` (default ``float32``) is the engine's (quantized kernels want bf16/fp16).

Per model and load format (a model's own ``formats`` may list one twice: the second is reported
as ``FORMAT#2``), one ``RESULT {...}`` line: the greedy tokens of PROMPT with the top-5
logprobs of every generated and prompt position, a SHA-256 of every parameter and buffer right
after ``load_weights`` (before vLLM's ``process_weights_after_loading`` repacks them) and again
after it, and for the streamer its ``last_stats`` (tensors and bytes in place / through
``load_weights``). ``tp`` > 1 runs vLLM's multiprocess executor with that many CPU workers
(``VLLM_CPU_OMP_THREADS_BIND`` set by the caller); digests then come from every rank.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import traceback
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from _smoke_vllm_default import CPU_ENGINE_KWARGS, PROMPT  # noqa: E402
from _vllm_launcher import patch_vllm_version  # noqa: E402

MAX_TOKENS = 12
LOGPROBS = 5


def _digest(model) -> dict[str, str]:
    import torch

    out = {}
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        data = t.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8) if data.numel() else data.new_empty(0, dtype=torch.uint8)
        out[name] = f"{data.dtype}{list(data.shape)}:" + hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:24]
    return out


def _fill(model) -> None:
    """The same bytes in every parameter before a load, so that one the checkpoint does not
    initialise (vLLM leaves it as allocated) compares equal across the two loads. Buffers are
    left alone: the model computes them (rotary tables), no checkpoint loads them."""
    import torch

    with torch.no_grad():
        for t in model.parameters():
            if t.numel() and t.device.type != "meta" and t.is_contiguous():
                t.data.reshape(-1).view(torch.uint8).fill_(0x3C)


def _patch_loaders() -> None:
    """Record a digest right after each loader's load_weights (in every process: module level)."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    from loader_plugins.vllm_adapter.loader import StreamerModelLoader

    for cls in (DefaultModelLoader, StreamerModelLoader):
        if getattr(cls.load_weights, "_matrix_patched", False):
            continue
        original = cls.load_weights

        def load_weights(self, model, model_config, _original=original):
            _fill(model)
            result = _original(self, model, model_config)
            model._matrix_loaded_digest = _digest(model)
            model._matrix_stats = dict(getattr(self, "last_stats", {}) or {})
            return result

        load_weights._matrix_patched = True
        cls.load_weights = load_weights


def _worker_report(worker) -> dict:
    model = worker.model_runner.get_model()
    return {"loaded": getattr(model, "_matrix_loaded_digest", None), "final": _digest(model),
            "stats": getattr(model, "_matrix_stats", None)}


def _logprobs(entries) -> list[dict[str, float]]:
    return [{str(k): v.logprob for k, v in sorted(e.items())} if e else {} for e in entries or []]


def run_one(path: str, load_format: str, tp: int, dtype: str = "float32") -> dict:
    from vllm import LLM, SamplingParams

    kwargs = dict(CPU_ENGINE_KWARGS)
    if load_format == "streamer" and tp > 1:
        # these tiny models' rows are shorter than gather_min_row_bytes' 4 KiB default (read
        # whole and cut): at 0, every strided shard is read row by row, which the test checks to
        # the byte (test_sglang.py's TP models are wide enough for the default)
        kwargs["model_loader_extra_config"] = {"gather_min_row_bytes": 0}
    t0 = time.monotonic()
    llm = LLM(path, load_format=load_format, dtype=dtype, seed=0, tensor_parallel_size=tp, **kwargs)
    start_s = time.monotonic() - t0
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=LOGPROBS, prompt_logprobs=LOGPROBS,
                            ignore_eos=True)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    reports = llm.collective_rpc(_worker_report)
    result = {"start_s": round(start_s, 2), "tokens": list(out.outputs[0].token_ids),
              "logprobs": _logprobs(out.outputs[0].logprobs), "prompt_logprobs": _logprobs(out.prompt_logprobs),
              "ranks": reports}
    del llm, out
    return result


def main(spec: dict) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory

    tp = int(spec.get("tp", 1))
    for item in spec["models"]:
        formats = item.get("formats") or spec.get("formats", ["safetensors", "streamer"])
        for n, load_format in enumerate(formats):
            before = formats[:n].count(load_format)   # a format run again: "streamer#2" (a second load)
            record = {"arch": item["arch"], "format": load_format + (f"#{before + 1}" if before else ""), "tp": tp}
            try:
                record.update(run_one(item["path"], load_format, tp, item.get("dtype", "float32")))
            except Exception as exc:  # noqa: BLE001 - reported per model; the test fails on it
                record["error"] = f"{type(exc).__name__}: {exc}"
                record["traceback"] = traceback.format_exc()[-4000:]
            finally:
                cleanup_dist_env_and_memory()   # collects garbage too
            print("RESULT " + json.dumps(record), flush=True)


def _inspect_in_process() -> None:
    """vLLM inspects each architecture's class in a fresh Python process (~15 s here) so that a
    CUDA context is never created in the engine's process; without CUDA there is none to create,
    so do it in this process (cached on disk by vLLM either way)."""
    import torch

    if torch.cuda.is_available():
        return
    try:
        from vllm.model_executor.models import registry
    except ImportError:
        return
    if hasattr(registry, "_run_in_subprocess"):
        registry._run_in_subprocess = lambda fn: fn()


patch_vllm_version()
_patch_loaders()
_inspect_in_process()

if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
