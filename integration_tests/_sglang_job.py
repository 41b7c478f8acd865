"""Jobs for test_sglang.py, run by .venv-sglang's Python (SGLang 0.5.23's CPU engine; the stand-in
``sgl_kernel`` on PYTHONPATH). Each prints one line ``RESULT <json>`` at the end.

``unit MODEL... --truncated DIR``
    In this process: SGLang's plugins loaded (our entry point), then for each model
    ``get_model_loader(LoadConfig(load_format="streamer"))`` and ``(load_format="safetensors")``
    load it, and every parameter and buffer is compared bit for bit. Also: the loader's stats
    (tensors in place), the error a truncated shard (``DIR``) gives, and a bad extra-config key.
``tp MODEL...``
    Two processes, the two ranks of a tensor-parallel group (gloo), as SGLang's schedulers at
    ``--tp 2``: each loads every model with SGLang's ``safetensors`` loader and with ours (twice:
    the second load is measured) and compares its own shard of every parameter and buffer bit for
    bit. The bytes each rank really read are counted by the kernel (``/proc/self/io`` ``rchar``,
    the bytes of every read call) around the second streamer load: a rank reads its own shards,
    not the whole checkpoint.
``engine MODEL... [--tp N]``
    For each model, one ``sglang.Engine(load_format="streamer")``: greedy ids and logprobs of a few
    prompts; then ``update_weights_from_disk`` to the same architecture with other weights
    (SGLang's loader: the answers must change, so a reload takes effect), then back to the model's
    own weights with SGLang's ``safetensors`` loader: ids and logprobs must equal the streamer's.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROMPTS = ["The quick brown fox", "Once upon a time there", "1 2 3 4 5"]
MAX_NEW = 12


# ---- unit: the loader in this process ------------------------------------------------------------

def _load(model_path: str, load_format: str, extra: dict | None = None):
    from loader_plugins.sglang_adapter.inprocess import load_once

    return load_once(model_path, load_format, extra, dtype="float32")


def _state(model) -> dict:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _differ(mine: dict, ref: dict) -> list[str]:
    """Names of ``ref``'s tensors that ``mine`` lacks or holds with another dtype, shape or bytes."""
    import torch

    return sorted(n for n in ref if n not in mine or mine[n].dtype != ref[n].dtype or mine[n].shape != ref[n].shape
                  or not torch.equal(mine[n].detach().reshape(-1).view(torch.uint8),
                                     ref[n].detach().reshape(-1).view(torch.uint8)))


def unit(models: list[str]) -> dict:
    out: dict = {"models": {}}
    for path in models:
        ours, loader, seconds = _load(path, "streamer", {"concurrency": 4})
        theirs, _, their_seconds = _load(path, "safetensors")
        mine, ref = _state(ours), _state(theirs)
        differ = _differ(mine, ref)
        stats = loader.last_stats
        out["models"][os.path.basename(path)] = {
            "loader": type(loader).__name__, "tensors": len(ref), "differ": differ[:10], "extra": sorted(set(mine) - set(ref)),
            "in_place": stats.get("in_place"), "in_place_bytes": stats.get("in_place_bytes"),
            "via_model": stats.get("via_model"), "bytes": stats.get("bytes"), "seconds": round(seconds, 3),
            "safetensors_seconds": round(their_seconds, 3)}
        del ours, theirs
    return out


def unit_errors(model: str, truncated: str) -> dict:
    out = {}
    try:
        _load(truncated, "streamer")
        out["truncated"] = "no error"
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        out["truncated"] = f"{type(exc).__name__}: {exc}"
    try:
        _load(model, "streamer", {"concurency": 4})
        out["bad_key"] = "no error"
    except Exception as exc:  # noqa: BLE001
        out["bad_key"] = f"{type(exc).__name__}: {exc}"
    return out


# ---- tp: each rank of a tensor-parallel group loads its own shards ----------------------------------

def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _tp_rank(rank: int, world: int, init_method: str, models: list[str], queue) -> None:
    try:
        from loader_plugins.sglang_adapter.inprocess import init_process

        init_process(models[0], "cpu", tp_size=world, tp_rank=rank, init_method=init_method)
        out = {}
        for path in models:
            theirs, _, _ = _load(path, "safetensors")
            _load(path, "streamer", {"concurrency": 2})        # not measured: imports, first-touch costs
            before = _rchar()
            ours, loader, _ = _load(path, "streamer", {"concurrency": 2})
            read = _rchar() - before
            mine, ref = _state(ours), _state(theirs)
            differ = _differ(mine, ref)
            stats = loader.last_stats
            out[os.path.basename(path)] = {
                "differ": differ[:10], "tensors": len(ref), "extra": sorted(set(mine) - set(ref)),
                "rchar": read, "checkpoint_bytes": stats["checkpoint_bytes"],
                "param_bytes": sum(t.nbytes for t in ref.values()),
                **{k: stats[k] for k in ("in_place", "in_place_bytes", "in_place_shards", "via_model",
                                         "via_model_bytes", "through", "read_bytes")}}
        queue.put((rank, out))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test with it
        queue.put((rank, {"error": traceback.format_exc()}))


def tp(models: list[str], world: int = 2) -> dict:
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init_method = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_tp_rank, args=(r, world, init_method, models, queue)) for r in range(world)]
    for p in procs:
        p.start()
    ranks = {}
    try:
        for _ in procs:
            rank, result = queue.get(timeout=600)
            if "error" in result:
                raise RuntimeError(f"rank {rank}:\n{result['error']}")
            ranks[rank] = result
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return {"ranks": [ranks[r] for r in range(world)]}


# ---- engine: greedy ids and logprobs, streamer vs SGLang's safetensors -------------------------------

def _answers(engine) -> list[dict]:
    outs = engine.generate(prompt=PROMPTS, sampling_params={"temperature": 0.0, "max_new_tokens": MAX_NEW},
                           return_logprob=True)
    return [{"ids": o["output_ids"], "logprobs": [lp[0] for lp in o["meta_info"]["output_token_logprobs"]]}
            for o in outs]


def engine(pairs: list[str], tp_size: int = 1) -> dict:
    import sglang

    out: dict = {"models": {}}
    for pair in pairs:
        path, other = pair.split(",")
        t = time.perf_counter()
        eng = sglang.Engine(model_path=path, load_format="streamer", device="cpu", attention_backend="torch_native",
                            sampling_backend="pytorch", max_total_tokens=2048, dtype="float32",
                            model_loader_extra_config=json.dumps({"concurrency": 4}), log_level="warning",
                            random_seed=0, disable_radix_cache=True, tp_size=tp_size)
        start_s = time.perf_counter() - t
        try:
            streamer = _answers(eng)
            ok_other, msg_other = eng.update_weights_from_disk(other, load_format="safetensors")[:2]
            changed = _answers(eng)
            ok_back, msg_back = eng.update_weights_from_disk(path, load_format="safetensors")[:2]
            reference = _answers(eng)
        finally:
            eng.shutdown()
        out["models"][os.path.basename(path)] = {
            "start_seconds": round(start_s, 1), "streamer": streamer, "safetensors": reference,
            "other_weights": changed, "reloads": [[ok_other, str(msg_other)], [ok_back, str(msg_back)]]}
    return out


def main() -> int:
    mode, args = sys.argv[1], sys.argv[2:]
    try:
        if mode == "unit":
            cut = args.index("--truncated")
            result = unit(args[:cut])
            result["errors"] = unit_errors(args[0], args[cut + 1])
        elif mode == "tp":
            result = tp(args)
        elif mode == "engine":
            tp_size = 1
            if "--tp" in args:
                cut = args.index("--tp")
                tp_size, args = int(args[cut + 1]), args[:cut] + args[cut + 2:]
            result = engine(args, tp_size)
        else:
            raise SystemExit(f"unknown mode {mode}")
    except Exception:  # noqa: BLE001 - reported to the test, which fails with it
        result = {"error": traceback.format_exc()}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
