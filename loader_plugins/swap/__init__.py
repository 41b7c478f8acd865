"""Hot swapping: offload a model's weight storage to host memory (or disk) and bring it back.

- :func:`offload` / :func:`restore` (:mod:`.snapshot`): one host arena per snapshot, chunked
  copies on several threads (CPU) or CUDA streams, device memory released and re-materialised in
  the same tensors;
- :class:`SnapshotPool` (:mod:`.pool`): snapshots by key within a host-memory budget, the least
  recently used spilled to disk as safetensors;
- :class:`SwapMetrics` (:mod:`.metrics`): bytes, seconds, GB/s per swap, logged and in Prometheus form;
- vLLM: :mod:`.vllm_ext` (``--worker-extension-cls``) and :mod:`.vllm_backend` (a sleep-mode
  backend); neither is imported here.

Nothing here imports torch, CUDA or vLLM at import time.
"""

from .metrics import SwapEvent, SwapMetrics, default_metrics
from .pool import SnapshotPool
from .snapshot import Snapshot, SwapError, named_tensors, offload, plan, restore

__all__ = ["Snapshot", "SnapshotPool", "SwapError", "SwapEvent", "SwapMetrics", "default_metrics", "named_tensors",
           "offload", "plan", "restore"]
