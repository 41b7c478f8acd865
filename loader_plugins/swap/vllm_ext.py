"""vLLM worker extension: offload and restore a running engine's weights through ``collective_rpc``.

    vllm serve MODEL --worker-extension-cls loader_plugins.swap.vllm_ext.StreamerSwapExtension
    LLM(MODEL, worker_extension_cls="loader_plugins.swap.vllm_ext.StreamerSwapExtension")

    llm.collective_rpc("streamer_offload")     # or POST /collective_rpc {"method": "streamer_offload"}
    llm.collective_rpc("streamer_restore")     # (HTTP needs VLLM_SERVER_DEV_MODE=1)
    llm.collective_rpc("streamer_swap_stats")  # state, last swaps, Prometheus text

vLLM mixes this class into its worker class, so every method runs in each worker process on that
worker's model (``self.model_runner.model``) and returns one JSON-friendly dict per worker.

How the memory is given back depends on where the weights live:

* CUDA with ``--enable-sleep-mode`` (weights in vLLM's cumem pool): the allocations tagged
  ``weights`` are copied out, unmapped, later mapped back **at the same addresses** and refilled
  (CUDA graphs stay valid);
* CUDA without it: storages resized to 0 and back (``release="resize"``): addresses change, so it is
  refused unless the engine runs eagerly (``--enforce-eager``);
* CPU: pages dropped (``madvise``), addresses kept. vLLM's CPU build repacks linear weights after
  loading into oneDNN handlers that own their memory natively (not tensors, not reachable from
  Python): they stay resident and are reported as ``opaque`` in the stats. Everything the model
  holds as tensors (parameters, buffers, tensors in ``cpu_linear`` closures) is swapped.

``discard_kv_cache=true`` also gives the KV cache memory back (contents dropped, zero-filled on
restore). The engine must not run the model while its weights are out: pause it first
(``POST /sleep?level=0``), and after a KV discard reset the prefix cache (``POST /reset_prefix_cache``);
resume with ``POST /wake_up?tags=scheduling`` after ``streamer_restore``.

On CUDA, ``streamer_use_sleep_backend`` makes vLLM's own ``/sleep`` and ``/wake_up`` use
:class:`~loader_plugins.swap.vllm_backend.StreamerSleepBackend` (vLLM 0.32 has no flag to select it).
"""

from __future__ import annotations

import logging
from typing import Any

from .metrics import default_metrics
from .snapshot import Snapshot, SwapError, offload, restore

try:  # vLLM configures handlers on its "vllm" logger tree only: log there so the swap lines show up
    from vllm.logger import init_logger

    log = init_logger("vllm.loader_plugins.swap")
except ImportError:  # pragma: no cover
    log = logging.getLogger(__name__)

_STATE_ATTR = "_loader_plugins_swap_state"
_TRUE = ("1", "true", "yes", "on")


def _flag(value: Any) -> bool:
    """Arguments through the HTTP endpoint arrive as strings."""
    if isinstance(value, str):
        if value.strip().lower() not in _TRUE + ("0", "false", "no", "off", ""):
            raise SwapError(f"expected a boolean (true/false), got {value!r}")
        return value.strip().lower() in _TRUE
    return bool(value)


class _State:
    def __init__(self) -> None:
        self.mechanism: str | None = None      # cumem / tensors, while offloaded
        self.weights: Snapshot | None = None
        self.spent: Snapshot | None = None     # restored (CUDA: its pinned arena is reused)
        self.cumem = None                      # CumemWeightsSwap, kept for its arena
        self.cumem_tags: tuple[str, ...] = ()
        self.kv: Snapshot | None = None
        self.last_offload: dict[str, Any] = {}
        self.last_restore: dict[str, Any] = {}


def _state(worker) -> _State:
    state = worker.__dict__.get(_STATE_ATTR)
    if state is None:
        state = _State()
        setattr(worker, _STATE_ATTR, state)
        default_metrics().logger = log
    return state


def _model(worker):
    runner = worker.model_runner
    get = getattr(runner, "get_model", None)
    return get() if callable(get) else runner.model


def _on_cuda(model) -> bool:
    return any(p.is_cuda for p in model.parameters())


def _cuda_graphs(worker) -> bool:
    config = worker.vllm_config
    if getattr(config.model_config, "enforce_eager", False):
        return False
    mode = getattr(getattr(config, "compilation_config", None), "cudagraph_mode", None)
    return mode is not None and getattr(mode, "name", str(mode)) != "NONE"


def _kv_tensors(worker) -> list:
    import torch

    out = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)

    walk(getattr(worker.model_runner, "kv_caches", None) or [])
    return out


def opaque_weights(model) -> dict[str, Any]:
    """Weights vLLM's CPU build holds natively (oneDNN handlers in ``cpu_linear`` closures)."""
    import types

    modules, nbytes = 0, 0
    for _, mod in model.named_modules():
        fn = vars(mod).get("cpu_linear")
        if not isinstance(fn, types.FunctionType):
            continue
        for cell in fn.__closure__ or ():
            handler = getattr(cell, "cell_contents", None)
            if handler is not None and hasattr(handler, "handler_tensor") and hasattr(handler, "n"):
                weight = getattr(mod, "weight", None)
                itemsize = weight.dtype.itemsize if weight is not None else 4
                modules += 1
                nbytes += int(handler.n) * int(handler.k) * itemsize
    return {"modules": modules, "bytes": nbytes,
            "what": "oneDNN-packed linear weights owned by native handlers (vLLM CPU); not offloadable"}


class StreamerSwapExtension:
    """Mixed into vLLM's worker by ``--worker-extension-cls`` (names must not clash with the worker's)."""

    def streamer_offload(self, release: str = "auto", discard_kv_cache: Any = False) -> dict[str, Any]:
        """Copy this worker's weights to host memory and give the device memory back."""
        state = _state(self)
        if state.mechanism is not None:
            raise SwapError("the weights are offloaded already; call streamer_restore first")
        model = _model(self)
        discard_kv = _flag(discard_kv_cache)
        on_cuda = _on_cuda(model)
        from .vllm_backend import CumemWeightsSwap, cumem_weights_active

        if on_cuda and cumem_weights_active():
            if state.cumem is None:
                state.cumem = CumemWeightsSwap(name="vllm-weights")
            stats = dict(state.cumem.offload())
            tags = ("weights", "kv_cache") if discard_kv else ("weights",)
            state.cumem.allocator.discard(tags)
            state.cumem_tags, state.mechanism = tags, "cumem"
            stats["kv_cache_discarded"] = discard_kv
        else:
            if on_cuda and release in ("auto", "resize") and _cuda_graphs(self):
                raise SwapError("this engine replays CUDA graphs, and resizing the weights' storage moves them: start "
                                "vLLM with --enable-sleep-mode (weights swapped at the same addresses) or "
                                "--enforce-eager")
            kv = _kv_tensors(self)  # attention layers reference it (attn.kv_cache): not weights
            state.weights = offload(model, release=release, reuse=state.spent, exclude=kv, name="vllm-weights")
            state.spent = None
            stats = dict(state.weights.stats)
            state.mechanism = "tensors"
            if discard_kv:
                state.kv = offload(kv, release=release, contents=False, name="vllm-kv-cache")
                stats["kv_cache_released_bytes"] = state.kv.stats["released_bytes"]
        stats["mechanism"] = state.mechanism
        if not on_cuda:
            stats["opaque"] = opaque_weights(model)
        state.last_offload = stats
        return stats

    def streamer_restore(self) -> dict[str, Any]:
        """Bring the weights back into the same tensors (and the KV cache memory, zeroed)."""
        state = _state(self)
        if state.mechanism is None:
            raise SwapError("nothing to restore: call streamer_offload first")
        if state.mechanism == "cumem":
            state.cumem.allocator.wake_up(list(state.cumem_tags))
            stats = dict(state.cumem.restore())
        else:
            keep = any(e.is_cuda for e in state.weights.entries)  # pinned arenas are worth keeping
            stats = dict(restore(state.weights, keep_arena=keep))
            state.spent = state.weights if keep else None
            state.weights = None
            if state.kv is not None:
                restore(state.kv)
                state.kv = None
        stats["mechanism"] = state.mechanism
        state.mechanism = None
        state.last_restore = stats
        return stats

    def streamer_swap_stats(self) -> dict[str, Any]:
        """State, last offload / restore, totals, and the Prometheus text of this worker's swaps."""
        state = _state(self)
        metrics = default_metrics()
        backend = getattr(self, "_sleep_mode_backend", None)
        return {
            "state": "offloaded" if state.mechanism else "resident",
            "mechanism": state.mechanism,
            "last_offload": state.last_offload,
            "last_restore": state.last_restore,
            "sleep_backend": backend.stats() if hasattr(backend, "stats") else None,
            "totals": metrics.summary(),
            "prometheus": metrics.render(),
        }

    def streamer_use_sleep_backend(self) -> dict[str, Any]:
        """Make vLLM's ``/sleep`` and ``/wake_up`` use the streamer sleep backend (CUDA, sleep mode on)."""
        from .vllm_backend import BACKEND_NAME, StreamerSleepBackend

        if not StreamerSleepBackend.is_supported():
            return {"installed": False, "reason": "needs CUDA and vLLM's cumem allocator; on CPU vLLM's sleep and "
                                                  "wake-up are no-ops: use streamer_offload / streamer_restore"}
        if not getattr(self.vllm_config.model_config, "enable_sleep_mode", False):
            return {"installed": False, "reason": "start vLLM with --enable-sleep-mode (weights must be in the "
                                                  "cumem pool)"}
        if "_sleep_mode_backend" not in vars(self) and not hasattr(type(self), "sleep_mode_backend"):
            return {"installed": False, "reason": "this vLLM worker has no pluggable sleep-mode backend"}
        current = vars(self).get("_sleep_mode_backend")
        if isinstance(current, StreamerSleepBackend):
            return {"installed": True, "backend": BACKEND_NAME, "already": True}
        if current is not None and current.state() != "RUNNING":
            raise SwapError(f"the engine is asleep with the {type(current).__name__} backend; wake it up first")
        self._sleep_mode_backend = StreamerSleepBackend()
        log.info("vLLM sleep mode now uses the %r backend (loader_plugins.swap)", BACKEND_NAME)
        return {"installed": True, "backend": BACKEND_NAME}


__all__ = ["StreamerSwapExtension", "opaque_weights"]
