"""The job of test_sglang_quantized.py, run by .venv-sglang's Python (SGLang 0.5.23's CPU engine;
the stand-in ``sgl_kernel`` on PYTHONPATH). Prints one line ``RESULT <json>`` at the end.

``NAME=PATH...``
    In this process, for each quantized checkpoint: SGLang's ``safetensors`` loader and ours
    (``get_model_loader(LoadConfig(load_format=...)).load_model``, as _sglang_job.py's ``unit``)
    load it in the checkpoint's dtype. Each load goes as far as SGLang goes here: building the
    model (the quantization method's ``create_weights``), ``load_weights``, post-processing
    (``process_weights_after_loading``: the CPU kernels' repacking). Every parameter and buffer
    is snapshotted after ``load_weights`` and again after post-processing where that ran, and the
    two loaders' snapshots are compared bit for bit (dtype, shape, strides, bytes). Where a load
    fails, the stage and the exact error are reported, for both loaders (ours must fail where
    SGLang's does, with the same error). Then one quantized linear layer of the loaded model runs
    on a few tokens: its error tells whether a generate can run at all.

``--lift-capability-check NAME...``
    Also load those (compressed-tensors) checkpoints, both loaders, with
    ``CompressedTensorsConfig._check_scheme_supported`` returning True: SGLang 0.5.23 asks
    ``torch.cuda.get_device_capability()`` for every compressed-tensors scheme except on XPU
    and NPU, so on a CPU it fails before any weight exists. With the check lifted (what a GPU
    of the scheme's capability passes) SGLang's own parameter classes and loaders run on the
    CPU, and the comparison checks the streamer against them. Not SGLang as shipped: reported
    apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from _sglang_job import _differ, _state  # noqa: E402

#: where the load is while it runs, set by the wrappers below: the stage a failure happened in
_STAGE: dict = {}


def _snapshot(model) -> dict:
    return {n: t.detach().clone() for n, t in _state(model).items()}


def _watch_stages() -> None:
    """Wrap SGLang's two steps (both loaders call them by ``DefaultModelLoader.<name>`` at call
    time): ``load_weights_only`` marks the stage, ``postprocess_weights`` snapshots the
    parameters as ``load_weights`` left them, then post-processes, and keeps its error (the
    model as it stands is still compared: post-processing stopped at its first layer)."""
    from sglang.srt.model_loader.loader import DefaultModelLoader

    load_weights_only = DefaultModelLoader.load_weights_only
    postprocess_weights = DefaultModelLoader.postprocess_weights

    def watched_load(model, weights, target_device):
        _STAGE["stage"] = "load_weights"
        return load_weights_only(model, weights, target_device)

    def watched_postprocess(model, target_device):
        _STAGE["loaded"] = _snapshot(model)
        _STAGE["stage"] = "postprocess"
        try:
            postprocess_weights(model, target_device)
        except Exception as exc:  # noqa: BLE001 - reported: how far SGLang gets here
            _STAGE["postprocess_error"] = _error(exc)
            return
        _STAGE["stage"] = "loaded"

    DefaultModelLoader.load_weights_only = staticmethod(watched_load)
    DefaultModelLoader.postprocess_weights = staticmethod(watched_postprocess)


def _error(exc: BaseException) -> str:
    """The exception and where SGLang raised it (its innermost sglang frame)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/sglang/" in f.filename]
    where = ""
    if frames:
        where = f" (at {frames[-1].filename.split('/sglang/', 1)[1]}:{frames[-1].lineno} {frames[-1].name})"
    text = str(exc).split("\n", 1)[0]
    return f"{type(exc).__name__}: {text[:300]}{where}"


def _forward_error(model) -> str | None:
    """Run the first quantized linear layer on three tokens: None if it runs, else its error."""
    import torch
    from sglang.srt.layers.linear import LinearBase

    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(module, LinearBase) and method is not None and "Unquantized" not in type(method).__name__:
            dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
            x = torch.randn(3, module.input_size, dtype=dtype)
            try:
                with torch.no_grad():
                    module(x)
            except Exception as exc:  # noqa: BLE001 - reported: why a generate cannot run here
                return f"{name}: {_error(exc)}"
            return None
    return "no quantized linear layer"


def _one(path: str, load_format: str) -> dict:
    from loader_plugins.sglang_adapter.inprocess import load_once

    _STAGE.clear()
    _STAGE["stage"] = "build"
    out: dict = {}
    try:
        model, loader, seconds = load_once(path, load_format, {"concurrency": 4} if load_format == "streamer" else None,
                                           dtype="auto")   # the checkpoint's (float16 or bfloat16)
    except Exception as exc:  # noqa: BLE001 - reported: the stage and the error
        out.update(stage=_STAGE["stage"], error=_error(exc))
        return out
    out.update(stage=_STAGE["stage"], error=_STAGE.get("postprocess_error"), seconds=round(seconds, 3))
    out["loaded"] = _STAGE.get("loaded")
    out["post"] = _snapshot(model) if out["stage"] == "loaded" else None
    out["forward_error"] = _forward_error(model) if out["stage"] == "loaded" else None
    out["quant_methods"] = sorted({type(getattr(m, "scheme", None) or m.quant_method).__name__
                                   for m in model.modules() if getattr(m, "quant_method", None) is not None})
    if load_format == "streamer":
        stats = loader.last_stats
        out["stats"] = {k: stats[k] for k in ("in_place", "in_place_bytes", "via_model", "via_model_bytes", "unused",
                                              "unused_bytes", "checkpoint_bytes", "through", "reasons")}
    return out


def _strides(mine: dict, ref: dict) -> list[str]:
    return sorted(n for n in ref if n in mine and mine[n].stride() != ref[n].stride())


def compare(path: str) -> dict:
    theirs, ours = _one(path, "safetensors"), _one(path, "streamer")
    result = {"safetensors": {k: v for k, v in theirs.items() if k not in ("loaded", "post")},
              "streamer": {k: v for k, v in ours.items() if k not in ("loaded", "post", "stats")},
              "stats": ours.get("stats")}
    for when in ("loaded", "post"):
        ref, mine = theirs.get(when), ours.get(when)
        if ref is None or mine is None:
            continue
        result[when] = {"tensors": len(ref), "bytes": sum(t.nbytes for t in ref.values()),
                        "differ": _differ(mine, ref)[:10], "strides": _strides(mine, ref)[:10],
                        "extra": sorted(set(mine) - set(ref))[:10]}
    return result


@contextlib.contextmanager
def lifted_capability_check():
    from sglang.srt.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    check = CompressedTensorsConfig.__dict__["_check_scheme_supported"]
    CompressedTensorsConfig._check_scheme_supported = lambda self, min_capability, error=True: True
    try:
        yield
    finally:
        CompressedTensorsConfig._check_scheme_supported = check


def main() -> int:
    args = sys.argv[1:]
    lift: list[str] = []
    if "--lift-capability-check" in args:
        cut = args.index("--lift-capability-check")
        args, lift = args[:cut], args[cut + 1:]
    models = dict(a.split("=", 1) for a in args)
    try:
        from loader_plugins.sglang_adapter.inprocess import init_process

        init_process(next(iter(models.values())))
        _watch_stages()
        result: dict = {"shipped": {}, "lifted": {}}
        for name, path in models.items():
            result["shipped"][name] = compare(path)
        with lifted_capability_check():
            for name in lift:
                result["lifted"][name] = compare(models[name])
    except Exception:  # noqa: BLE001 - reported to the test, which fails with it
        result = {"error": traceback.format_exc()}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
