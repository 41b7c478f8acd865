"""Distributed mode (core/distributed.py): the pure partition, then two real processes
exchanging with gloo on 127.0.0.1, compared bit for bit with safetensors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loader_plugins.core.distributed import LAYOUT_ALIGN, partition
from loader_plugins.core.header import TensorSpec

safetensors_torch = pytest.importorskip("safetensors.torch")

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120


def _specs(sizes, files=3):
    specs, pos = [], {}
    for i, n in enumerate(sizes):
        f = f"f{i % files}"
        specs.append(TensorSpec(f"t{i}", "U8", (n,), f, pos.get(f, 8), n))
        pos[f] = pos.get(f, 8) + n
    return specs


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3000), max_size=30), st.integers(1, 6), st.integers(1, 5000))
def test_partition_reads_every_byte_once_balanced(sizes, world, window):
    specs = _specs(sizes)
    plan = partition(specs, world, window)
    seen = {s.name: [0] * s.nbytes for s in specs}
    per_rank = [0] * world
    for w in range(len(plan.windows)):
        for rank in range(world):
            lo, hi = plan.rank_range(w, rank)
            for p in plan.pieces(w, rank):
                assert lo <= p.flat_offset and p.flat_offset + p.length <= hi
                assert plan.offsets[plan.specs.index(p.spec)] + p.start == p.flat_offset
                for b in range(p.start, p.end):
                    seen[p.spec.name][b] += 1
                per_rank[rank] += p.length
    assert all(all(c == 1 for c in counts) for counts in seen.values()), "a byte read twice or never"
    assert sum(per_rank) == sum(sizes)
    # each rank reads at most its part of every window: about 1/world of the flat buffer
    assert max(per_rank, default=0) <= -(-plan.flat_bytes // world)
    assert plan.flat_bytes < plan.data_end + world * max(1, len(plan.windows)) + 1
    assert all(o % LAYOUT_ALIGN == 0 for o in plan.offsets)
    starts = [s for s, _ in plan.windows]
    assert starts == sorted(starts) and all(b - a == world * part for (a, part), b in zip(plan.windows, starts[1:]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker() -> None:
    """One rank (run in a subprocess): load, compare with safetensors, report as JSON."""
    import datetime

    import torch.distributed as dist

    from loader_plugins.core.distributed import load_distributed
    from loader_plugins.tests.helpers import as_bytes

    args = json.loads(os.environ["LP_TEST_ARGS"])
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args['port']}", rank=rank,
                            world_size=args["world"], timeout=datetime.timedelta(seconds=60))
    try:
        report = {"rank": rank, "runs": []}
        for names in (None, args["subset"]):
            stats: dict = {}
            got = load_distributed(args["files"], config={"concurrency": 2, "progress": "off"}, names=names,
                                   window_bytes=args["window"], stats=stats)
            expected = {}
            for f in args["files"]:
                expected.update(safetensors_torch.load_file(f))
            if names is not None:
                expected = {n: expected[n] for n in names}
            bad = sorted(n for n, ref in expected.items() if n not in got or got[n].dtype != ref.dtype
                         or tuple(got[n].shape) != tuple(ref.shape) or as_bytes(got[n]) != as_bytes(ref))
            report["runs"].append({"names": sorted(got), "expected": sorted(expected), "bad": bad,
                                   "bytes_read": stats["bytes_read"], "bytes_total": stats["bytes_total"],
                                   "windows": stats["windows"]})
        from loader_plugins.errors import StreamerError

        try:   # ranks asking for different tensors: an error on every rank, not a hang
            load_distributed(args["files"], config={"progress": "off"}, names=args["subset"][:rank + 1])
            report["mismatch"] = "no error"
        except StreamerError as exc:
            report["mismatch"] = str(exc)
        with open(args["out"] + f".{rank}", "w") as fh:
            json.dump(report, fh)
    finally:
        dist.destroy_process_group()


def _run_ranks(tmp_path: Path, files: list[str], subset: list[str], world: int = 2, window: int = 96 << 10):
    args = {"port": _free_port(), "world": world, "files": files, "subset": subset, "window": window,
            "out": str(tmp_path / "report")}
    env = {**os.environ, "LP_TEST_ARGS": json.dumps(args), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", "from loader_plugins.tests.test_distributed import _worker; "
                               "_worker()"], env={**env, "RANK": str(r)}, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"
    return [json.loads((tmp_path / f"report.{r}").read_text()) for r in range(world)]


def test_two_ranks_with_gloo_bit_exact_and_each_reads_half(tmp_path: Path):
    from loader_plugins.tests.helpers import tensor_set

    tensors = tensor_set(seed=5)
    names = sorted(tensors)
    # two shards, every dtype and shape of the helper set (including empty and scalar tensors)
    files = []
    for i in range(2):
        part = {n: tensors[n] for n in names[i::2]}
        path = tmp_path / f"model-{i}.safetensors"
        safetensors_torch.save_file(part, str(path))
        files.append(str(path))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    subset = [n for n in names if n.startswith(("bfloat16", "float8_e4m3fn.", "int64"))]
    reports = _run_ranks(tmp_path, files, subset)

    for run_index, wanted in enumerate((names, sorted(subset))):
        runs = [r["runs"][run_index] for r in reports]
        for rank, run in enumerate(runs):
            assert run["bad"] == [], f"rank {rank}: tensors differ from safetensors: {run['bad'][:5]}"
            assert run["names"] == wanted == run["expected"]
        want_total = total if run_index == 0 else sum(tensors[n].numel() * tensors[n].element_size() for n in subset)
        read = [run["bytes_read"] for run in runs]
        assert sum(read) == want_total == runs[0]["bytes_total"], read     # every byte read once, by one rank
        slack = runs[0]["windows"] * LAYOUT_ALIGN * 2
        assert all(abs(n - want_total / 2) <= slack for n in read), (read, want_total)
    assert reports[0]["runs"][0]["windows"] > 3        # the exchange ran over several windows
    for report in reports:
        assert "every rank must pass the same path and names" in report["mismatch"], report["mismatch"]


def test_needs_a_process_group():
    from loader_plugins.core.distributed import load_distributed
    from loader_plugins.errors import StreamerError

    with pytest.raises(StreamerError, match="init_process_group"):
        load_distributed("/nonexistent")
