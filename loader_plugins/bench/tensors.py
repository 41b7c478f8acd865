"""Per-tensor cost: checkpoints of many small tensors, this project next to safetensors.

    model-streamer bench-tensors [--counts 10000,100000] [--index 91000x163] [--repeat 3] [--dir DIR]

For each count, one file of that many small bf16 tensors (shapes as a per-expert MoE's, 8 KiB
each by default): ``load_file`` against safetensors' ``load_file`` + ``clone()`` (safetensors'
own returns views of a mapping), warm page cache, median of ``--repeat``, in one process with
the two alternating, and the microseconds per tensor of each. ``--index NxS``: a sharded
checkpoint of N tensors in S shards with ``model.safetensors.index.json`` (DeepSeek-V3 has about
91,000 in 163), timed for what comes before any byte of data moves: listing, reading and
parsing every header and the index (``open_checkpoint``), and planning the reads
(``StreamReader``'s set-up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("bench-tensors", help="per-tensor cost on many small tensors, and header + plan time of a "
                       "DeepSeek-size index", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="10000,100000", help="tensor counts of the one-file checkpoints")
    p.add_argument("--shape", default="32x128", help="shape of each tensor (bf16)")
    p.add_argument("--index", default="91000x163", help="TENSORSxSHARDS of the sharded checkpoint ('' to skip)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the checkpoints are written (default: a temporary directory)")
    p.set_defaults(func=run)


def _write(path: Path, count: int, shape: tuple[int, ...], prefix: str = "") -> None:
    import torch
    from safetensors.torch import save_file

    base = torch.randn((count,) + shape, generator=torch.Generator().manual_seed(count)).to(torch.bfloat16)
    save_file({f"{prefix}model.layers.{i // 384}.mlp.experts.{i % 384}.weight": base[i] for i in range(count)},
              str(path))


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_load(directory: Path, count: int, shape: tuple[int, ...], repeat: int) -> dict:
    import torch  # noqa: F401
    from safetensors.torch import load_file as st_load

    from .. import load_file

    path = directory / f"tensors-{count}.safetensors"
    if not path.exists():
        _write(path, count, shape)
    path.read_bytes()   # warm
    ours, theirs = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        got = load_file(str(path))
        ours.append(time.perf_counter() - t0)
        del got
        t0 = time.perf_counter()
        got = {k: v.clone() for k, v in st_load(str(path)).items()}
        theirs.append(time.perf_counter() - t0)
        del got
    return {"count": count, "bytes": path.stat().st_size, "streamer_s": _median(ours), "safetensors_s": _median(theirs)}


def bench_index(directory: Path, tensors: int, shards: int, repeat: int) -> dict:
    import torch
    from safetensors.torch import save_file

    from ..config import StreamerConfig
    from ..core.checkpoint import open_checkpoint
    from ..core.reader import StreamReader

    root = directory / f"index-{tensors}x{shards}"
    if not (root / "model.safetensors.index.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        weight_map = {}
        per = -(-tensors // shards)
        value = torch.zeros(2, dtype=torch.bfloat16)
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            names = [f"model.layers.{i // 768}.mlp.experts.{i % 256}.w{i % 3}.weight"
                     for i in range(s * per, min(tensors, (s + 1) * per))]
            save_file({n: value.clone() for n in names}, str(root / fname))
            weight_map.update({n: fname for n in names})
        (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = StreamerConfig()
    opened, planned = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        with open_checkpoint(str(root), config, keep_open=True) as ckpt:
            t1 = time.perf_counter()
            reader = StreamReader(list(ckpt.tensors.values()), ckpt.sources, config)
            for window in reader._windows:
                reader._prepare(window)
            t2 = time.perf_counter()
            reader.close()
            count = len(ckpt.tensors)
        opened.append(t1 - t0)
        planned.append(t2 - t1)
    return {"tensors": count, "shards": shards, "header_s": _median(opened), "plan_s": _median(planned)}


def run(args: argparse.Namespace) -> int:
    shape = tuple(int(x) for x in args.shape.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.dir or tmp)
        directory.mkdir(parents=True, exist_ok=True)
        rows = [bench_load(directory, int(c), shape, args.repeat) for c in args.counts.split(",") if c]
        print(f"\nload_file of many small tensors ({'x'.join(map(str, shape))} bf16), warm, median of {args.repeat}")
        print("| tensors | MB | streamer s | streamer µs/tensor | safetensors + clone s | safetensors µs/tensor | "
              "streamer ÷ safetensors |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['count']} | {r['bytes'] / 1e6:.0f} | {r['streamer_s']:.3f} | "
                  f"{r['streamer_s'] / r['count'] * 1e6:.1f} | {r['safetensors_s']:.3f} | "
                  f"{r['safetensors_s'] / r['count'] * 1e6:.1f} | {r['streamer_s'] / r['safetensors_s']:.2f}x |")
        if args.index:
            n, s = (int(x) for x in args.index.split("x"))
            r = bench_index(directory, n, s, args.repeat)
            print(f"\nheader + plan of {r['tensors']} tensors in {r['shards']} shards (index.json), median of "
                  f"{args.repeat}: headers and index {r['header_s']:.3f} s, plan {r['plan_s']:.3f} s, "
                  f"together {r['header_s'] + r['plan_s']:.3f} s ({(r['header_s'] + r['plan_s']) / r['tensors'] * 1e6:.1f} "
                  f"µs per tensor)")
    return 0
