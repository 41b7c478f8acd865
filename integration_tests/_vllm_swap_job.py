"""Run one offline vLLM engine with the swap worker extension and print its result as JSON.

    python integration_tests/_vllm_swap_job.py '{"model": DIR, "steps": [...]}'

The engine gets ``worker_extension_cls="loader_plugins.swap.vllm_ext.StreamerSwapExtension"`` and
runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the caller), so the steps below can also
look at the worker directly through ``collective_rpc(function)``. Steps, in order:

- ``{"generate": true}``: greedy token ids of PROMPT appended to ``outputs``;
- ``{"digest": LABEL}``: sha256 of every tensor the swap covers (KV cache excluded), by name;
- ``{"offload": {kwargs}}`` / ``{"restore": true}`` / ``{"stats": true}``: the extension's RPCs;
- ``{"snapshot_digest": LABEL}``: sha256 of the snapshot's host copy, by name (while offloaded);
- ``{"resident": LABEL}``: per swapped storage, its size, the bytes of its whole pages and how many of
  those are resident (``resident_pages``: mincore), plus the KV cache storages.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from _smoke_vllm_default import CPU_ENGINE_KWARGS, MAX_TOKENS, PROMPT  # noqa: E402
from _vllm_launcher import patch_vllm_version  # noqa: E402

EXTENSION = "loader_plugins.swap.vllm_ext.StreamerSwapExtension"


def _digest(tensor) -> str:
    """sha256 of the tensor's bytes, with its dtype and shape."""
    import torch

    flat = tensor.detach().contiguous().cpu().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return f"{hashlib.sha256(data).hexdigest()}:{tensor.dtype}:{tuple(tensor.shape)}"


def _worker(obj):
    """collective_rpc(function) passes vLLM's WorkerWrapperBase; the extension's state is on the worker."""
    return getattr(obj, "worker", obj)


def model_digests(worker) -> dict:
    """sha256 of every tensor the swap covers (the KV cache excluded), by name."""
    from loader_plugins.swap import named_tensors
    from loader_plugins.swap.snapshot import _plan_entries
    from loader_plugins.swap.vllm_ext import _kv_tensors

    model = worker.model_runner.model
    entries, _, _ = _plan_entries(model, _kv_tensors(_worker(worker)))
    covered = {v.name for e in entries for v in e.views}
    return {name: _digest(t) for name, t in named_tensors(model) if name in covered}


def snapshot_digests(worker) -> dict:
    from loader_plugins.swap.vllm_ext import _state

    snapshot = _state(_worker(worker)).weights
    return {name: _digest(t) for name, t in snapshot.host_tensors().items()}


def residency(worker) -> dict:
    from loader_plugins.swap.snapshot import _plan_entries, resident_pages
    from loader_plugins.swap.vllm_ext import _kv_tensors

    worker = _worker(worker)
    out = {"weights": {}, "kv_cache": []}
    entries, _, _ = _plan_entries(worker.model_runner.model, _kv_tensors(_worker(worker)))
    for e in entries:
        whole, resident = resident_pages(e.address, e.nbytes)
        out["weights"][e.name] = {"nbytes": e.nbytes, "whole_page_bytes": whole, "resident_bytes": resident}
    seen = set()
    for t in _kv_tensors(worker):
        s = t.untyped_storage()
        if s.data_ptr() in seen or not s.nbytes():
            continue
        seen.add(s.data_ptr())
        whole, resident = resident_pages(s.data_ptr(), s.nbytes())
        out["kv_cache"].append({"nbytes": s.nbytes(), "whole_page_bytes": whole, "resident_bytes": resident})
    return out


def main(spec: dict) -> dict:
    patch_vllm_version()
    from vllm import LLM, SamplingParams

    t0 = time.monotonic()
    llm = LLM(spec["model"], load_format=spec.get("load_format", "safetensors"), dtype=spec.get("dtype", "float32"),
              seed=0, worker_extension_cls=EXTENSION, **CPU_ENGINE_KWARGS)
    result: dict = {"start_s": round(time.monotonic() - t0, 2), "outputs": [], "digests": {}, "snapshot_digests": {},
                    "offload": [], "restore": [], "stats": [], "resident": {}}
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", MAX_TOKENS))
    for step in spec["steps"]:
        if step.get("generate"):
            out = llm.generate([PROMPT], params, use_tqdm=False)
            result["outputs"].append(list(out[0].outputs[0].token_ids))
        elif "digest" in step:
            result["digests"][step["digest"]] = llm.collective_rpc(model_digests)[0]
        elif "snapshot_digest" in step:
            result["snapshot_digests"][step["snapshot_digest"]] = llm.collective_rpc(snapshot_digests)[0]
        elif "resident" in step:
            result["resident"][step["resident"]] = llm.collective_rpc(residency)[0]
        elif "offload" in step:
            result["offload"].append(llm.collective_rpc("streamer_offload", kwargs=step["offload"])[0])
        elif step.get("restore"):
            result["restore"].append(llm.collective_rpc("streamer_restore")[0])
        elif step.get("stats"):
            result["stats"].append(llm.collective_rpc("streamer_swap_stats")[0])
        else:
            raise ValueError(f"unknown step {step}")
    return result


if __name__ == "__main__":
    res = main(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(res), flush=True)
