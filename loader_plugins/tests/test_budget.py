"""MemoryBudget: how memory_limit is split, and what a real load reports it used."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from loader_plugins import SafetensorsStreamer, StreamerConfig
from loader_plugins.core.budget import MemoryBudget
from loader_plugins.core.sources.base import staging_bytes_for

MiB = 1 << 20


def test_the_rule():
    budget = MemoryBudget(2048 * MiB, 16 * MiB)
    assert (budget.ring_bytes, budget.staging_bytes) == (512 * MiB, 512 * MiB)
    assert budget.staging_buffers(17 * MiB, workers=8) == 16          # two per worker, within a quarter
    assert budget.staging_buffers(17 * MiB, workers=32) == 512 // 17  # the quarter caps it
    assert MemoryBudget(4 * MiB, 16 * MiB).staging_buffers(17 * MiB, 4) == 1   # at least one
    assert budget.held_bytes(272 * MiB) == 1776 * MiB and budget.window_bytes(1776 * MiB) == 888 * MiB
    tiny = MemoryBudget(8 * MiB, 16 * MiB)
    assert tiny.held_bytes(8 * MiB) == 16 * MiB and tiny.window_bytes(16 * MiB) == 16 * MiB   # never below a chunk


def test_a_load_reports_the_split_it_used(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({f"t{i}": torch.full((256, 1024), i, dtype=torch.float32) for i in range(8)}, str(path))   # 8 MiB
    config = StreamerConfig(memory_limit=64 * MiB, chunk_bytes=1 * MiB, concurrency=2, direct_io="on")
    with SafetensorsStreamer(config) as streamer:
        streamer.stream_file(str(path))
        loaded = dict(streamer.get_tensors())
        memory = streamer.stats["memory"]
    assert sorted(loaded) == [f"t{i}" for i in range(8)]
    staging = 4 * staging_bytes_for(1 * MiB, config.alignment)       # two buffers per worker
    assert memory == {"limit": 64 * MiB, "ring": 0, "staging": staging, "held": 64 * MiB - staging,
                      "window": (64 * MiB - staging) // 2}
