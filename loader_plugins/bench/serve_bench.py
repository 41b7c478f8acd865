"""``model-streamer bench-serve``: time to first token through ``model-streamer serve``, and how
well placement predicts startups.

For each demo checkpoint size (``make-demo``), one router with two servers on this host (``a``
and ``b``, each with a budget of one model) serves one model per size. Per size:

* **cold**: the first request (no engine anywhere): placement between two cold servers, the
  engine starts with ``--load-format streamer``;
* **warm**: requests to the running engine;
* **swapped**: the model is swapped out to host memory, then requested: placement weighs its
  restore on ``a`` against a cold start on ``b``;
* the other candidate of each decision is then started on purpose (``/admin/models/M/start``),
  so every decision is checked against what each server really took;
* **migration**: with the model running on both servers, a greedy stream is moved from one to
  the other after 8 tokens; the client's largest gap between two tokens is set against its
  median gap and against the time the destination took to prefill the moved tokens.

With ``--ray ADDRESS`` the router serves on that Ray cluster (``serve --ray``): its first two
servers (nodes carrying ``model_streamer_budget_bytes``) play ``a`` and ``b``.

TTFT is measured by the client, from sending a streaming request to its first token. Prompts
are token ids (the demo checkpoints have no tokenizer: engines run with
``--skip-tokenizer-init``). Prints a TTFT table per size and a placement table (estimated vs
measured, per candidate).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: engine flags for the CPU build (small KV cache, no graphs); on a GPU pass --engine-args
CPU_ENGINE_ARGS = ("--enforce-eager", "--max-model-len", "128", "--max-num-seqs", "2", "--max-num-batched-tokens",
                   "128", "--kv-cache-memory-bytes", str(64 << 20), "--disable-log-stats")
ENGINE_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
PROMPT_IDS = [1, 450, 4996, 17354, 1701, 432, 17204, 975]
KEY = "bench-serve"


def add_parser(sub) -> None:
    p = sub.add_parser("bench-serve", help="TTFT through model-streamer serve (warm, swapped out, cold) per model "
                                           "size, and placement estimates against measured startups")
    p.add_argument("--sizes", default="0.25GB,1GB", help="demo checkpoint sizes, comma separated")
    p.add_argument("--dir", default=None, help="where demo checkpoints are written (default: a temporary directory)")
    p.add_argument("--repeat", type=int, default=2, help="swap-out/in cycles and warm requests per size")
    p.add_argument("--engine-args", default=None,
                   help="extra vllm serve flags (default on CPU: a small KV cache and --enforce-eager)")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--parts", default="ttft,migration", help="what to measure: ttft (with placement), migration")
    p.add_argument("--migrate-tokens", type=int, default=64,
                   help="tokens of the greedy stream moved between servers mid-generation")
    p.add_argument("--json", metavar="FILE", help="also write every measurement as JSON")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="serve on this Ray cluster (serve --ray ADDRESS); its first two servers play a and b")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import httpx

    from .demo import make_demo, parse_size

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    with contextlib.ExitStack() as stack:
        root = Path(args.dir) if args.dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        models = {}
        for size in sizes:
            path = root / f"serve-demo-{size}"
            if not (path / "config.json").exists():
                print(f"writing a {size} demo checkpoint to {path}", file=sys.stderr, flush=True)
                make_demo(path, parse_size(size))
            models[f"demo-{size}"] = {"checkpoint": str(path)}
        engine_args = args.engine_args.split() if args.engine_args else list(_default_engine_args())
        config = {"budget": 1, "idle_timeout": 3600,
                  **({"ray": {"address": args.ray, "log_dir": str(root / "bench-serve" / "nodes")}} if args.ray
                     else {"servers": {"a": {}, "b": {}}}),
                  "engine": {"args": ["--skip-tokenizer-init", *engine_args], "env": ENGINE_ENV,
                             "start_timeout": args.start_timeout},
                  "models": models}
        workdir = root / "bench-serve"
        workdir.mkdir(parents=True, exist_ok=True)
        router = stack.enter_context(_router(config, workdir))
        client = stack.enter_context(httpx.Client(base_url=router, headers={"Authorization": f"Bearer {KEY}"},
                                                  timeout=args.start_timeout + 60))
        parts = {x.strip() for x in args.parts.split(",")}
        pair = _pair(client)
        results = {name: _bench_model(client, name, args.repeat, pair) for name in models} if "ttft" in parts else {}
        placements = client.get("/admin/placements").json()["placements"]
        if results:         # printed before the migrations, which take a while and may fail
            _print_ttft(results, {f"demo-{s}": parse_size(s) for s in sizes})
            _print_placements(placements, results)
        moves = [_bench_migration(client, name, args.migrate_tokens, pair) for name in models] \
            if "migration" in parts else []
    if moves:
        _print_migrations(moves)
    if args.json:
        Path(args.json).write_text(json.dumps({"ttft": results, "placements": placements, "migrations": moves},
                                              indent=2))
    return 0


def _default_engine_args() -> tuple[str, ...]:
    try:
        import torch

        if torch.cuda.is_available():
            return ("--gpu-memory-utilization", "0.4")
    except ImportError:
        pass
    return CPU_ENGINE_ARGS


@contextlib.contextmanager
def _router(config: dict, workdir: Path):
    import httpx

    from ..serve.process import free_port, stop_process_group

    (workdir / "serve.json").write_text(json.dumps(config))
    port = free_port()
    log = open(workdir / "router.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "loader_plugins.cli", "serve", "--config",
                             str(workdir / "serve.json"), "--port", str(port), "--api-key", KEY, "--log-dir",
                             str(workdir / "engines")], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **ENGINE_ENV})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the router did not start; see {workdir / 'router.log'}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.3)
        print(f"router at {base}, log {workdir / 'router.log'}", file=sys.stderr, flush=True)
        yield base
    finally:
        stop_process_group(proc, 90)   # the router stops its engines on the way out
        log.close()


def _ttft(client, model: str, prompt: list[int] | None = None) -> float:
    """Seconds from sending a streaming completion to its first token."""
    body = {"model": model, "prompt": prompt or PROMPT_IDS, "max_tokens": 4, "temperature": 0, "stream": True,
            "ignore_eos": True}
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {reply.status_code} {reply.read()[:500]!r}")
        for line in reply.iter_lines():
            if first is None and line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"{model}: {chunk['error']}")
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError(f"{model}: the stream had no token")
    return first


def _admin(client, model: str, op: str, server: str) -> dict:
    reply = client.post(f"/admin/models/{model}/{op}", params={"server": server})
    if reply.status_code != 200:
        raise RuntimeError(f"{op} {model} on {server}: HTTP {reply.status_code} {reply.text[:500]}")
    return reply.json()


def _pair(client) -> tuple[str, str]:
    """The two servers the bench uses: ``a`` and ``b``, or a Ray cluster's first two nodes."""
    servers = sorted(client.get("/admin/models").json()["servers"])
    if len(servers) < 2:
        raise RuntimeError(f"bench-serve needs two servers; the router has {servers}")
    return ("a", "b") if {"a", "b"} <= set(servers) else (servers[0], servers[1])


def _bench_model(client, model: str, repeat: int, pair: tuple[str, str] = ("a", "b")) -> dict:
    say = lambda text: print(f"  {model}: {text}", file=sys.stderr, flush=True)  # noqa: E731
    out: dict = {"cold": [], "warm": [], "swapped": [], "other": []}
    out["cold"].append(_ttft(client, model))
    say(f"cold TTFT {out['cold'][-1]:.2f} s")
    where = _where(client, model)
    other = pair[1] if where == pair[0] else pair[0]
    t0 = time.perf_counter()
    _admin(client, model, "start", other)   # the other candidate of the cold decision, measured
    out["other"].append({"server": other, "how": "cold", "seconds": time.perf_counter() - t0})
    _admin(client, model, "stop", other)
    for _ in range(repeat):
        out["warm"].append(_ttft(client, model))
        _admin(client, model, "swap_out", where)
        out["swapped"].append(_ttft(client, model))
        say(f"warm TTFT {out['warm'][-1]:.3f} s, swapped-out TTFT {out['swapped'][-1]:.3f} s")
    _admin(client, model, "stop", where)
    return out


#: a stream that ended on its source before the destination caught up is tried again this many
#: times, each with 4x the tokens (a fast decode can finish 64 tokens within the catch-up)
MIGRATION_TRIES = 3


def _bench_migration(client, model: str, tokens: int, pair: tuple[str, str] = ("a", "b")) -> dict:
    for server in pair:
        _admin(client, model, "start", server)
    for attempt in range(MIGRATION_TRIES):
        out = _migrate_once(client, model, tokens * 4 ** attempt)
        if out is not None:
            break
        print(f"  {model}: the stream ended on its source before the move; again with "
              f"{tokens * 4 ** (attempt + 1)} tokens", file=sys.stderr, flush=True)
    else:
        raise RuntimeError(f"{model}: the stream was not migrated in {MIGRATION_TRIES} tries")
    for server in pair:
        _admin(client, model, "stop", server)
    print(f"  {model}: migrated after {out['tokens_moved']} tokens, largest gap {out['max_gap']:.3f} s",
          file=sys.stderr, flush=True)
    return out


def _migrate_once(client, model: str, tokens: int) -> dict | None:
    """One greedy stream moved after 8 tokens; None when it ended on its source first."""
    import threading

    body = {"model": model, "prompt": PROMPT_IDS, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    gaps: list[float] = []
    moved: dict = {}
    n, last = 0, None
    with client.stream("POST", "/v1/completions", json=body) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            n += len(json.loads(line[6:])["choices"][0].get("token_ids") or ())
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            last = now
            if n >= 8 and not moved:
                source = [m["server"] for m in client.get("/admin/models").json()["models"]
                          if m["model"] == model and m["inflight"]]
                moved["thread"] = threading.Thread(target=lambda: moved.update(
                    reply=_admin(client, model, "migrate", source[0])))
                moved["thread"].start()
    moved["thread"].join()
    report = (moved["reply"].get("moved") or [{}])[0]
    if "tokens_moved" not in report:
        if "finished on its source" in str(report.get("abandoned", "")):
            return None
        raise RuntimeError(f"{model}: the stream was not migrated: {moved['reply']}")
    prompt = (PROMPT_IDS * 64)[:len(PROMPT_IDS) + report["tokens_moved"]]
    prefill = statistics.median(_ttft(client, model, prompt) for _ in range(3))
    return {"model": model, "tokens": n, "max_gap": max(gaps), "median_gap": statistics.median(gaps),
            "prefill_ttft": prefill, **report}


def _print_migrations(moves: list[dict]) -> None:
    print("\nLive migration of a greedy stream (moved after 8 tokens)")
    print("| model | tokens | moved at | median gap s | largest gap s | catch-up s | prefill of the moved tokens s |")
    print("|---|---|---|---|---|---|---|")
    for m in moves:
        print(f"| {m['model']} | {m['tokens']} | {m['tokens_moved']} | {m['median_gap']:.3f} | {m['max_gap']:.3f} | "
              f"{m['catch_up_seconds']:.3f} | {m['prefill_ttft']:.3f} |")


def _where(client, model: str) -> str:
    running = [m["server"] for m in client.get("/admin/models").json()["models"]
               if m["model"] == model and m["state"] == "running"]
    if len(running) != 1:
        raise RuntimeError(f"{model} runs on {running}")
    return running[0]


def _print_ttft(results: dict, sizes: dict) -> None:
    print("\nTime to first token through model-streamer serve (median; cold: 1 run)")
    print("| model | size | warm s | swapped-out s | cold s | cold ÷ swapped |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        warm, swapped, cold = (statistics.median(r[k]) for k in ("warm", "swapped", "cold"))
        print(f"| {name} | {sizes[name] / 1e9:.2f} GB | {warm:.3f} | {swapped:.3f} | {cold:.2f} | "
              f"{cold / swapped:.0f}x |")


def _print_placements(placements: list[dict], results: dict) -> None:
    """Every candidate of every decision with what that server took: the chosen one as the
    decision measured it; a cold candidate not chosen by the cold start this bench made there."""
    cold: dict[tuple[str, str], float] = {}
    for d in placements:
        if d["how"] == "cold" and d["measured_seconds"] is not None:
            cold.setdefault((d["model"], d["chosen"]), d["measured_seconds"])
    for model, r in results.items():
        for o in r.get("other", []):
            cold.setdefault((model, o["server"]), o["seconds"])
    print("\nPlacement: each decision's estimate per candidate, and what that server measured")
    print("| model | decision | candidate | how | tier | estimated s | measured s | measured ÷ estimated | chosen |")
    print("|---|---|---|---|---|---|---|---|---|")
    fastest = 0
    for i, d in enumerate(placements):
        rows = []
        for c in d["candidates"]:
            chosen = c["server"] == d["chosen"]
            measured = d["measured_seconds"] if chosen else (cold.get((d["model"], c["server"]))
                                                              if c["how"] == "cold" else None)
            rows.append((c, chosen, measured))
            cell = f"{measured:.2f}" if measured is not None else "-"
            r = f"{measured / c['seconds']:.2f}" if measured is not None and c["seconds"] > 0 else "-"
            print(f"| {d['model']} | {i + 1} | {c['server']} | {c['how']} | {c['tier']} | {c['seconds']:.2f} | "
                  f"{cell} | {r} | {'yes' if chosen else ''} |")
        known = [(m, chosen) for _, chosen, m in rows if m is not None]
        if known and min(known)[1]:
            fastest += 1
    print(f"\nthe chosen server was the fastest measured in {fastest} of {len(placements)} decisions")
