"""A vLLM sleep-mode backend that moves the weights with :mod:`loader_plugins.swap` (CUDA).

vLLM (0.32, RFC #34303) dispatches ``/sleep`` and ``/wake_up`` to a pluggable
``SleepModeBackend`` chosen by name from ``SleepModeBackendFactory``. The built-in ``cumem``
backend copies each cumem allocation tagged ``"weights"`` with a synchronous ``cudaMemcpy`` into a
freshly pinned buffer of its own, on every sleep. This backend, ``streamer``, keeps vLLM's
mechanism for *memory* (the cumem pool unmaps the physical pages and maps them back at the same
virtual addresses, so CUDA graphs stay valid) and replaces the *copies*: one page-locked arena,
allocated once and reused by every later sleep, filled and drained in large chunks over several
CUDA streams, with bytes / seconds / GB/s logged and counted (:mod:`.metrics`).

Needs ``--enable-sleep-mode`` (that is what puts the weights in the cumem pool). Selecting it:

* vLLM versions with a ``--sleep-mode-backend`` flag: ``--sleep-mode-backend streamer``
  (:func:`register`, called from the plugin hook, registers the name);
* vLLM 0.32 has the factory and ``ModelConfig.sleep_mode_backend`` but no CLI flag or engine
  argument for it: call ``collective_rpc("streamer_use_sleep_backend")`` once after start-up (the
  worker extension :class:`~loader_plugins.swap.vllm_ext.StreamerSwapExtension` installs it).

On CPU, vLLM's sleep and wake-up are no-ops (``CPUWorker.sleep`` only logs a warning); use the
worker extension's ``streamer_offload`` / ``streamer_restore`` there.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any, Callable

from .metrics import SwapMetrics, default_metrics
from .snapshot import Snapshot, offload, restore

log = logging.getLogger(__name__)

BACKEND_NAME = "streamer"
WEIGHTS_TAG = "weights"
_KEPT_TAGS = ("runtime", "cudagraph")  # what the cumem backend backs up besides the weights (vLLM 0.32)

try:  # vLLM >= 0.32; older versions have no pluggable sleep-mode backends
    from vllm.device_allocator.sleep_mode_backend import SleepModeBackend as _SleepModeBackend
except ImportError:  # pragma: no cover - depends on the installed vLLM
    _SleepModeBackend = object  # type: ignore[assignment,misc]

_lock = threading.Lock()
_registered = False


def register() -> bool:
    """Register the ``streamer`` sleep-mode backend with vLLM (idempotent; False when vLLM has no factory)."""
    global _registered
    with _lock:
        if _registered:
            return True
        try:
            from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory
        except ImportError as exc:
            log.debug("vLLM has no SleepModeBackendFactory (%s); the streamer sleep backend is not registered", exc)
            return False
        try:
            SleepModeBackendFactory.register_backend(BACKEND_NAME, __name__, "StreamerSleepBackend")
        except ValueError:  # "already registered": by an earlier import of this module in this process
            pass
        _registered = True
        log.debug("registered vLLM sleep-mode backend %r", BACKEND_NAME)
        return True


# ----------------------------------------------------------------------------------------------
# Raw device memory as tensors
# ----------------------------------------------------------------------------------------------

class _CudaRange:
    """Exposes ``nbytes`` of device memory at ``ptr`` through ``__cuda_array_interface__``."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


def cuda_memory_tensor(ptr: int, nbytes: int, device: int):
    """A uint8 tensor over device memory it does not own (no copy, never freed by torch)."""
    import torch

    return torch.as_tensor(_CudaRange(ptr, nbytes), device=f"cuda:{device}")


def host_memory_tensor(ptr: int, nbytes: int, device: int = 0):
    """The CPU counterpart of :func:`cuda_memory_tensor` (tests on machines without CUDA)."""
    import torch

    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------
# The weights of the cumem pool
# ----------------------------------------------------------------------------------------------

class CumemWeightsSwap:
    """Copies vLLM's cumem allocations tagged ``"weights"`` to one host arena and back.

    The allocator frees and re-maps the memory itself (``sleep`` / ``discard`` / ``wake_up``); this
    class only moves bytes: :meth:`offload` before the allocator unmaps, :meth:`restore` after it
    has mapped the same virtual addresses again. The arena is kept between cycles.
    """

    def __init__(self, allocator: Any = None, *, wrap: Callable[[int, int, int], Any] | None = None,
                 metrics: SwapMetrics | None = None, name: str = "vllm-weights", workers: int | None = None):
        self._allocator = allocator
        self._wrap = wrap or cuda_memory_tensor
        self.metrics = metrics
        self.name = name
        self.workers = workers
        self.snapshot: Snapshot | None = None   # holds weights while pending
        self._spent: Snapshot | None = None     # restored; its arena is reused by the next offload
        self.last: dict[str, Any] = {}

    @property
    def allocator(self):
        if self._allocator is None:
            from vllm.device_allocator import get_mem_allocator_instance

            self._allocator = get_mem_allocator_instance()
        return self._allocator

    def allocations(self, tag: str = WEIGHTS_TAG) -> list[tuple[int, int, int]]:
        """(ptr, nbytes, device) of the mapped allocations carrying ``tag``."""
        out = []
        for ptr, data in self.allocator.pointer_to_data.items():
            if data.tag == tag and not data.is_asleep:
                device, nbytes = data.handle[0], data.handle[1]
                out.append((int(ptr), int(nbytes), int(device)))
        return sorted(out)

    @property
    def pending(self) -> bool:
        return self.snapshot is not None and self.snapshot.state == "offloaded"

    def offload(self) -> dict[str, Any]:
        if self.pending:
            raise RuntimeError("the weights are offloaded already; restore them first")
        tensors = {f"{WEIGHTS_TAG}@{ptr:#x}": self._wrap(ptr, nbytes, device)
                   for ptr, nbytes, device in self.allocations()}
        self.snapshot = offload(tensors, release="none", reuse=self._spent, workers=self.workers,
                                name=self.name, metrics=self.metrics)
        self._spent = None
        self.last = dict(self.snapshot.stats)
        return self.last

    def restore(self) -> dict[str, Any]:
        if not self.pending:
            return {}
        snapshot = self.snapshot
        self.last = restore(snapshot, keep_arena=True, workers=self.workers, metrics=self.metrics)
        self.snapshot, self._spent = None, snapshot
        return self.last

    def forget(self) -> None:
        """Drop pending weights (level-2 sleep, discard): vLLM reloads them from the checkpoint."""
        if self.snapshot is not None:
            self.snapshot.state = "discarded-by-vllm"
            if self.snapshot.arena is not None:
                self.snapshot.arena.close()
            self.snapshot = None


def cumem_weights_active() -> bool:
    """True when vLLM's cumem allocator holds mapped weights in this process (``--enable-sleep-mode`` on CUDA)."""
    try:
        from vllm.device_allocator.cumem import CuMemAllocator
    except Exception:  # noqa: BLE001 - CPU builds lack the cumem extension
        return False
    instance = getattr(CuMemAllocator, "instance", None)
    if instance is None:
        return False
    return any(d.tag == WEIGHTS_TAG for d in instance.pointer_to_data.values())


class StreamerSleepBackend(_SleepModeBackend):  # type: ignore[misc,valid-type]
    """``--sleep-mode-backend streamer``: cumem memory management, streamer copies.

    ``suspend(1)`` copies the weights into the (reused) pinned arena, then lets the cumem
    allocator back up the ``runtime`` / ``cudagraph`` tags as vLLM's own backend does and unmap
    everything; ``suspend(2)`` keeps no weights (vLLM reloads them). ``resume(tags)`` maps the
    memory back at the same addresses and, when ``weights`` wake, copies them back over several
    streams.
    """

    def __init__(self, allocator: Any = None, *, wrap: Callable[[int, int, int], Any] | None = None,
                 metrics: SwapMetrics | None = None):
        if _SleepModeBackend is not object:
            super().__init__()
        self._state = "RUNNING"
        self.swap = CumemWeightsSwap(allocator, wrap=wrap, metrics=metrics, name="vllm-sleep")
        try:  # vLLM only prints its own logger tree
            from vllm.logger import init_logger

            (metrics or default_metrics()).logger = init_logger("vllm.loader_plugins.swap")
        except ImportError:
            pass

    def suspend(self, level: int = 1) -> None:
        allocator = self.swap.allocator
        if level == 1:
            self.swap.offload()
        else:
            self.swap.forget()
        self._state = "SUSPENDED"
        allocator.sleep(offload_tags=_KEPT_TAGS)  # weights are ours now: the allocator discards them

    def resume(self, tags: list[str] | None = None) -> None:
        self._state = "RESUMING"
        self.swap.allocator.wake_up(tags)
        if tags is None or WEIGHTS_TAG in tags:
            self.swap.restore()
        self._state = "RUNNING"

    def discard(self, tags: tuple[str, ...]) -> None:
        self.swap.allocator.discard(tags)
        if WEIGHTS_TAG in tags:
            self.swap.forget()
        self._state = "SUSPENDED"

    def state(self) -> str:
        return self._state

    def stats(self) -> dict[str, Any]:
        return {"backend": BACKEND_NAME, "state": self._state, "weights_pending": self.swap.pending,
                "last": self.swap.last}

    @classmethod
    def is_supported(cls) -> bool:
        try:
            import torch

            from vllm.device_allocator.cumem import cumem_available
        except Exception:  # noqa: BLE001 - CPU builds lack the cumem extension
            return False
        return bool(cumem_available) and bool(torch.cuda.is_available())

    @classmethod
    def preserves_communicators(cls) -> bool:
        return True  # like cumem: only memory is suspended


__all__ = ["BACKEND_NAME", "CumemWeightsSwap", "StreamerSleepBackend", "cuda_memory_tensor", "cumem_weights_active",
           "host_memory_tensor", "register"]
