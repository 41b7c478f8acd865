"""``model-streamer bench-cuda``: the CUDA path, page cache to device memory, stage by stage.

One process run, warm page cache (the checkpoint is read once first), each cell the median of
``--repeat`` loads into destinations allocated (and faulted in) before the clock starts, as an
engine's weights are:

* ``read``: the page-cache read rate: the reader filling host tensors (one copy, no device);
* ``streamer``: the same checkpoint through :class:`~loader_plugins.core.sinks.cuda.CudaSink`
  (pinned ring, streams, events) into device memory;
* ``--device sim`` (the default without CUDA): the device is
  :class:`~loader_plugins.core.sinks.cuda_sim.SimulatedCudaBackend`, its link throttled to
  ``--link-gbps``; its copies are ``memmove`` on the host's own cores, so a second row,
  ``streamer-dma``, runs the same pipeline against a device whose copies cost the host no CPU
  (``move_bytes=False``: time on the link only, as a DMA engine; nothing lands, so that row is
  not verified). ``--device cuda``: the real device through CuPy, next to safetensors'
  ``load_file(device="cuda")`` and a pinned host-to-device copy (the link's measured rate).

Pipeline efficiency = streamer ÷ min(read rate, link rate). With the copying simulation the host
copies every byte twice (read, then the simulated DMA) on the same cores, so the table also gives
the ceiling of two copies in a row, 1 ÷ (1/read + 1/memcpy) with ``memcpy`` the host's copy rate
over the device's streams, measured in the same run. Every verified load's bytes are compared with
the first read's: a wrong byte fails the run. Not a test: timings go to the table only.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from typing import Any

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("bench-cuda", help="the CUDA path stage by stage: page cache -> pinned ring -> device "
                       "(a simulated device without CUDA)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="+", help="safetensors file(s) or a checkpoint directory")
    p.add_argument("--device", choices=("auto", "sim", "cuda"), default="auto",
                   help="sim: the simulated device; cuda: the real one; auto: cuda when torch sees one")
    p.add_argument("--link-gbps", type=float, default=50.0, help="the simulated device's host-to-device link")
    p.add_argument("--repeat", type=int, default=3, help="loads per method (median reported)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    from ..cli_options import add_config_flags

    add_config_flags(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import torch

    from ..cli_options import config_from_args
    from ..core.checkpoint import open_checkpoint

    cfg = config_from_args(args).replace(progress="off")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "sim"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench-cuda: --device cuda, but torch sees no CUDA device here; use --device sim", file=sys.stderr)
        return 2
    with open_checkpoint(args.path if len(args.path) > 1 else args.path[0], cfg, keep_open=True) as ckpt:
        specs = list(ckpt.tensors.values())
        total = sum(s.nbytes for s in specs)
        host = _empty(specs, "cpu")
        from .runner import _warm

        _warm(ckpt.files)           # buffered reads: direct_io=auto reads what is not cached with O_DIRECT,
        #                             which would leave it uncached; the table is for a warm page cache
        _load(ckpt, specs, cfg, host, None)                 # the reference bytes
        reference = {n: t.clone() for n, t in host.items()}
        rows: dict[str, list[float]] = {"read": [], "streamer": []}
        reports: list[dict] = []
        dests = host if device == "sim" else _empty(specs, "cuda")
        backend = None
        if device == "sim":     # one device for the run, as a process has: its pinned ring is kept between loads
            from ..core.sinks.cuda_sim import SimulatedCudaBackend

            backend = SimulatedCudaBackend(args.link_gbps)
        first_load = None
        for _ in range(max(1, args.repeat) + 1):          # the first load allocates the ring: reported apart
            read_s = _load(ckpt, specs, cfg, host, None)[0]
            _poison(dests)
            seconds, report = _load(ckpt, specs, cfg, dests, _sink(cfg, backend, ckpt))
            _verify(dests, reference)
            if first_load is None:
                first_load = {"seconds": round(seconds, 4), "stages": report}
                continue
            rows["read"].append(read_s)
            rows["streamer"].append(seconds)
            reports.append(report)
        if device == "sim":
            from ..core.sinks.cuda_sim import SimulatedCudaBackend

            dma = SimulatedCudaBackend(args.link_gbps, move_bytes=False)
            _load(ckpt, specs, cfg, dests, _sink(cfg, dma, ckpt))          # allocates its ring
            rows["streamer-dma"] = [_load(ckpt, specs, cfg, dests, _sink(cfg, dma, ckpt))[0]
                                    for _ in range(max(1, args.repeat))]
        from ..core.sinks.cuda import free_idle_rings

        free_idle_rings()
        link = args.link_gbps if device == "sim" else _pinned_h2d_gbps(total)
        if device == "cuda":
            rows["safetensors"] = _safetensors_cuda(ckpt.files, args.repeat, reference)
    med = {k: statistics.median(v) for k, v in rows.items()}
    gbps = {k: total / s / 1e9 for k, s in med.items()}
    best = min(gbps["read"], link)
    extra: dict[str, Any] = {}
    if device == "sim":
        memcpy = _host_copy_gbps(min(total, 1 << 30), 2)
        ceiling = min(link, 1 / (1 / gbps["read"] + 1 / memcpy))
        extra = {"host_memcpy_gbps": round(memcpy, 3), "two_copy_ceiling_gbps": round(ceiling, 3),
                 "efficiency_vs_two_copies": round(gbps["streamer"] / ceiling, 3),
                 "efficiency_dma": round(gbps["streamer-dma"] / best, 3)}
    stages = reports[sorted(range(len(reports)), key=lambda i: rows["streamer"][i])[len(reports) // 2]]
    result = {"device": device, "bytes": total, "tensors": len(specs), "repeat": args.repeat,
              "link_gbps": round(link, 3), "seconds": {k: round(v, 4) for k, v in med.items()},
              "gbps": {k: round(v, 3) for k, v in gbps.items()},
              "efficiency": round(gbps["streamer"] / best, 3), "bound_by": "link" if link < gbps["read"] else "reads",
              "stages": stages, "first_load": first_load, **extra}
    if args.json:
        print(json.dumps(result))
        return 0
    _print(result)
    return 0


def _empty(specs, device: str) -> dict[str, Any]:
    import torch

    out = {}
    for s in specs:
        t = torch.empty(s.shape, dtype=s.torch_dtype(), device=device)
        if t.numel():
            t.view(-1).view(torch.uint8).fill_(0x5A)         # faulted in before the clock, as an engine's weights
        out[s.name] = t
    return out


def _poison(dests) -> None:
    import torch

    for t in dests.values():
        if t.numel():
            t.view(-1).view(torch.uint8).fill_(0x7B)


def _sink(cfg, backend, ckpt):
    """The sink a load with CUDA destinations gets (the reader's own rule for the ring's size)."""
    from ..core.budget import MemoryBudget
    from ..core.sinks.cuda import CudaSink

    budget = MemoryBudget(cfg.memory_limit, cfg.chunk_bytes)
    workers = cfg.workers(any(src.remote for src in ckpt.sources.values()))
    return CudaSink(cfg, backend=backend, memory_limit=budget.ring_bytes, workers=workers)


def _load(ckpt, specs, cfg, dests, sink) -> tuple[float, dict | None]:
    from ..core.reader import StreamReader
    from ..core.sinks.cpu import CpuSink
    from ..core.sources.base import BorrowedSource

    sources = {f: BorrowedSource(ckpt.sources[f]) for f in ckpt.files}
    sinks = [sink, CpuSink(cfg)] if sink is not None else None
    t0 = time.perf_counter()
    reader = StreamReader(specs, sources, cfg, destinations=dests, sinks=sinks)
    reader.start()
    for _ in reader:
        pass
    seconds = time.perf_counter() - t0
    return seconds, (reader.sink_reports[0] if reader.sink_reports else None)


def _verify(dests, reference) -> None:
    import torch

    for name, want in reference.items():
        got = dests[name]
        if got.numel() and not torch.equal(got.reshape(-1).view(torch.uint8).cpu(), want.reshape(-1).view(torch.uint8)):
            raise AssertionError(f"bench-cuda: tensor {name} differs from the reference read: the CUDA path "
                                 f"landed wrong bytes")


def _host_copy_gbps(nbytes: int, threads: int) -> float:
    """memmove rate of ``threads`` threads at once (the simulated device's streams), warm buffers."""
    import ctypes
    import threading

    import torch

    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8).fill_(2)
    part = nbytes // threads

    def run(i: int) -> None:
        ctypes.memmove(dst.data_ptr() + i * part, src.data_ptr() + i * part, part)

    best = float("inf")
    for _ in range(3):
        ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        best = min(best, time.perf_counter() - t)
    return part * threads / best / 1e9


def _pinned_h2d_gbps(total: int) -> float:
    import torch

    n = min(total, 4 << 30)
    src = torch.empty(n, dtype=torch.uint8).pin_memory()
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t) / 1e9


def _safetensors_cuda(files, repeat: int, reference) -> list[float]:
    import torch
    from safetensors.torch import load_file

    out = []
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        got = {}
        for f in files:
            got.update(load_file(f, device="cuda"))
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
        _verify(got, reference)
        del got
    return out


def _print(r: dict) -> None:
    gb = r["bytes"] / 1e9
    print(f"bench-cuda: {gb:.2f} GB, {r['tensors']} tensors, device {r['device']}, link {r['link_gbps']:g} GB/s "
          f"({'simulated' if r['device'] == 'sim' else 'pinned host-to-device, measured'}); warm page cache; "
          f"median of {r['repeat']}")
    print(f"{'method':<12} {'s':>8} {'GB/s':>8} {'÷ streamer':>11}")
    for name, s in r["seconds"].items():
        print(f"{name:<12} {s:8.3f} {r['gbps'][name]:8.2f} {r['gbps']['streamer'] / r['gbps'][name]:10.2f}x")
    print(f"first load of the run (pinned ring allocated): {r['first_load']['seconds']:.3f} s; the rows above reuse "
          f"the ring (pinned_ring=keep)")
    print(f"pipeline efficiency: {r['efficiency']:.2f} (streamer ÷ min(read rate, link rate); bounded by the "
          f"{r['bound_by']})")
    if "efficiency_dma" in r:
        print(f"  with a DMA that costs the host no CPU (streamer-dma): {r['efficiency_dma']:.2f}")
        print(f"  against two copies in a row on these cores (read {r['gbps']['read']:.2f}, memcpy "
              f"{r['host_memcpy_gbps']:.2f} GB/s -> ceiling {r['two_copy_ceiling_gbps']:.2f} GB/s): "
              f"{r['efficiency_vs_two_copies']:.2f}")
    st = r["stages"] or {}
    print("stages of the median streamer load (seconds; read, waits and submits summed over workers):")
    for key in ("wall_s", "first_byte_s", "start_sync_s", "ring_alloc_s", "read_s", "slot_wait_s", "submit_s",
                "final_sync_s"):
        if st.get(key) is not None:
            print(f"  {key:<14} {st[key]:8.4f}")
    if st.get("device"):
        print(f"  {'link busy':<14} {st['device']['link_busy_s']:8.4f}   kernels {st['device']['kernel_s']:.4f}")
    if st.get("workers"):
        busy = list(st["workers"].values())
        print(f"  workers        {len(busy)}, busy {min(busy):.3f}-{max(busy):.3f} s each")
    print(f"  bound by: {st.get('bound')}")
