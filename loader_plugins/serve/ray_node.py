"""A node of ``model-streamer serve --ray``: the Ray actor that runs that node's engines.

The router (:mod:`.ray_cluster`) starts one per serving node of the cluster, named
``model-streamer-node-<NODE_ID>`` in the namespace ``model-streamer``, detached (it and its engines
outlive the router, which finds them again by name), pinned to its node
(``NodeAffinitySchedulingStrategy``, not soft) and asking for no CPU. It holds the node's engines as
an agent does (:class:`~.agent.HostAgent`: ``vllm serve --load-format streamer`` on the node's
127.0.0.1, a secret each), and the router drives them through Ray calls (:meth:`NodeActor.call`:
start, stop, swap_out, swap_in, check, estimate, info) — so the engines' admin endpoints are
reached from the node's loopback only.

Their OpenAI paths are relayed from one HTTP port on the node's address (``/agent/v1/...``), which
answers only with the node's secret: a random token the router gets through Ray
(:meth:`NodeActor.hello`), never from a config file. The engines end with the actor (SIGTERM when
its process dies), and the actor ends with its raylet: a worker outlives a killed raylet (measured
with Ray 2.60: reparented, still serving), so the actor watches its parent and, once the raylet is
gone, stops its engines and exits. On a node with GPUs an engine holds its GPUs
through a Ray placement group on that node, so Ray's other users see them held, and runs on the
GPUs Ray assigned (``CUDA_VISIBLE_DEVICES``): tensor parallel x pipeline parallel whole GPUs when
that is more than one, else ``gpu_fraction`` of one (several models share a GPU, swapped in and out
as the budget allows; a swapped-out engine keeps its process, so it keeps its share).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from .agent import AgentError, HostAgent, create_agent_app
from .catalog import ModelSpec, ServerSpec
from .engine import EngineError
from .local import LocalEngine
from .process import free_port, stop_process_group

log = logging.getLogger(__name__)

NAMESPACE = "model-streamer"
PREFIX = "model-streamer-node-"
#: a node's custom resource that makes it a server; its quantity is the budget in bytes (as Ray's ``memory``)
BUDGET_RESOURCE = "model_streamer_budget_bytes"
#: how long an engine waits for its GPUs to be free in Ray
GPU_WAIT_S = 120.0
#: how often a node actor checks that its raylet lives
WATCH_S = 0.5


def actor_name(node_id: str) -> str:
    return PREFIX + node_id


def server_name(node_id: str) -> str:
    """The server's name in the router's logs, admin endpoints and records."""
    return f"ray-{node_id[:12]}"


def gpus_wanted(spec: ModelSpec) -> int:
    """GPUs an engine of ``spec`` uses: its tensor-parallel size times its pipeline-parallel size."""
    sizes = {"tp": 1, "pp": 1}
    names = {"--tensor-parallel-size": "tp", "-tp": "tp", "--pipeline-parallel-size": "pp", "-pp": "pp"}
    args = list(spec.args)
    for i, arg in enumerate(args):
        flag, _, value = arg.partition("=")
        if flag in names:
            value = value or (args[i + 1] if i + 1 < len(args) else "1")
            try:
                sizes[names[flag]] = max(1, int(value))
            except ValueError:
                pass
    return sizes["tp"] * sizes["pp"]


class _GpuHolder:
    """An actor inside an engine's placement group: it says which GPUs Ray gave the bundle."""

    def ids(self) -> list[str]:
        import ray

        return [str(i) for i in ray.get_gpu_ids()]


class NodeAgent(HostAgent):
    """A :class:`HostAgent` whose engines end with this process and, on a node with GPUs, hold
    them through a placement group on this node."""

    def __init__(self, spec: ServerSpec, log_dir: Path, node_id: str, gpus: float, gpu_fraction: float = 0.1):
        super().__init__(spec, log_dir)
        self.node_id = node_id
        self.gpus = gpus
        self.gpu_fraction = gpu_fraction
        self.leases: dict[str, tuple[Any, Any]] = {}   # model -> (placement group, holder actor)

    def _new_engine(self, spec: ModelSpec, extra: dict[str, Any]) -> LocalEngine:
        engine = super()._new_engine(spec, extra)
        engine.tied = True
        return engine

    async def _prepare(self, engine: LocalEngine) -> None:
        if not self.gpus:
            return
        import ray
        from ray.util import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        wanted = gpus_wanted(engine.spec)
        wanted = wanted if wanted > 1 else self.gpu_fraction
        group = placement_group([{"GPU": wanted}], strategy="STRICT_PACK",
                                name=f"model-streamer:{engine.spec.name}:{self.node_id[:12]}",
                                bundle_label_selector=[{"ray.io/node-id": self.node_id}])
        try:
            await asyncio.wait_for(asyncio.wrap_future(group.ready().future()), GPU_WAIT_S)
            holder = ray.remote(_GpuHolder).options(
                num_cpus=0, num_gpus=wanted,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)).remote()
            ids = await holder.ids.remote()
        except (asyncio.TimeoutError, ray.exceptions.RayError) as exc:
            remove_placement_group(group)
            raise EngineError(f"{wanted} GPU(s) for {engine.spec.name} are not free on Ray node {self.node_id} "
                              f"within {GPU_WAIT_S:.0f} s ({exc!r}); Ray holds them for other work: see `ray status`") \
                from exc
        self.leases[engine.spec.name] = (group, holder)
        engine.server = dataclasses.replace(engine.server, env={**engine.server.env,
                                                                "CUDA_VISIBLE_DEVICES": ",".join(ids)})
        log.info("%s holds GPU(s) %s of node %s (placement group %s)", engine.spec.name, ",".join(ids),
                 self.node_id[:12], group.id.hex())

    async def _released(self, engine: LocalEngine) -> None:
        lease = self.leases.pop(engine.spec.name, None)
        if lease is None:
            return
        import ray
        from ray.util import remove_placement_group

        group, holder = lease
        ray.kill(holder)
        remove_placement_group(group)

    def gpu_leases(self) -> dict[str, str]:
        """Model -> the id of the placement group holding its GPUs."""
        return {name: group.id.hex() for name, (group, _holder) in self.leases.items()}


class NodeActor:
    """The actor class (made a Ray actor by :func:`actor_class`). ``budget`` in bytes."""

    def __init__(self, node_id: str, budget: int, cache_dir: str | None, dram_cache_dir: str | None, log_dir: str,
                 gpu_fraction: float = 0.1):
        import ray

        self.node_id = node_id
        self.address = ray.util.get_node_ip_address()
        self.secret = secrets.token_urlsafe(32)
        gpus = next((n["Resources"].get("GPU", 0) for n in ray.nodes() if n["NodeID"] == node_id), 0)
        spec = ServerSpec(name=server_name(node_id), budget=budget, cache_dir=cache_dir, dram_cache_dir=dram_cache_dir)
        self.agent = NodeAgent(spec, Path(log_dir), node_id, gpus, gpu_fraction)
        self.url: str | None = None
        self._ready = asyncio.Lock()
        self._server = None
        threading.Thread(target=self._watch_raylet, args=(os.getppid(),), daemon=True,
                         name="raylet-watch").start()

    def _watch_raylet(self, raylet: int) -> None:
        """The raylet that started this worker is its parent: once the parent changes, the node
        is gone — stop the engines (SIGTERM, then SIGKILL) and exit."""
        while os.getppid() == raylet:
            time.sleep(WATCH_S)
        log.warning("node %s: the raylet (pid %d) is gone; stopping %d engine(s) and exiting", self.node_id[:12],
                    raylet, len(self.agent.engines))
        for engine in list(self.agent.engines.values()):
            if engine.proc is not None and engine.proc.poll() is None:
                stop_process_group(engine.proc, 5.0)
        os._exit(1)

    async def hello(self) -> dict[str, Any]:
        """The relay's URL and secret, once the engines a previous actor recorded are taken over
        and the relay answers."""
        async with self._ready:
            if self.url is None:
                await self.agent.adopt()
                await self._start_relay()
        return {"node_id": self.node_id, "url": self.url, "secret": self.secret, "pid": os.getpid(),
                "server": self.agent.spec.name}

    async def _start_relay(self) -> None:
        import uvicorn

        app = create_agent_app(self.agent.spec, self.agent.log_dir, api_key=self.secret, agent=self.agent)
        port = free_port(self.address)
        self._server = uvicorn.Server(uvicorn.Config(app, host=self.address, port=port, log_level="warning",
                                                     lifespan="on"))
        task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if task.done():
                task.result()   # raises what stopped it
                raise EngineError(f"the relay of Ray node {self.node_id} did not start on {self.address}:{port}")
            await asyncio.sleep(0.05)
        self.url = f"http://{self.address}:{port}"
        log.info("node %s: relay on %s, budget %d bytes, %s GPU(s)", self.node_id[:12], self.url,
                 self.agent.spec.budget, self.agent.gpus)

    async def call(self, op: str, body: Any = None) -> dict[str, Any]:
        """One operation of the agent's: ``{"result": ...}`` or ``{"error": {"status", "message"}}``."""
        agent = self.agent
        operations = {"start": agent.start, "stop": agent.stop, "swap_out": agent.swap_out,
                      "swap_in": agent.swap_in, "check": agent.check}
        try:
            if op == "info":
                result = {**await asyncio.to_thread(agent.info), "gpus": agent.gpus, "gpu_leases": agent.gpu_leases()}
            elif op == "estimate":
                result = await asyncio.to_thread(agent.estimate, body)
            elif op in operations:
                result = await operations[op](body)
            else:
                raise AgentError(404, f"unknown operation {op!r}: info, estimate, {', '.join(operations)}")
        except AgentError as exc:
            return {"error": {"status": exc.status, "message": str(exc)}}
        return {"result": result}

    async def shutdown(self) -> None:
        """Stop the engines and the relay (the actor is then killed by its caller)."""
        await self.agent.close()
        if self._server is not None:
            self._server.should_exit = True


def actor_class():
    """:class:`NodeActor` as a Ray actor class (Ray is imported only in Ray mode)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(NodeActor)
