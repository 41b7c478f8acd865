"""``model-streamer serve --ray``: the servers are a Ray cluster's nodes.

The router joins the cluster as a driver (``ray.init(address)``) and keeps its servers in step
with Ray's view of it (:class:`RayCluster`, every ``poll_seconds``): each live node that carries
the custom resource ``model_streamer_budget_bytes`` is a server with that budget (a cluster where no
node carries it: every live node, with the catalogue's budget). On each the router finds or starts
the node's actor (:mod:`.ray_node`: named, detached, pinned to the node), which runs the engines
there; a node that joins becomes a server, a node that dies loses its engines (their requests in
flight end with an error event, the next request is placed elsewhere) and leaves placement. A
router restarted finds the actors by name and their engines, running or swapped out, without
restarting them.

The engines are driven through the node actor's Ray calls (:class:`RayNodeClient`, the same
operations an agent answers over HTTP), and their OpenAI requests go to the node's relay with
the node's secret.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .catalog import RaySpec, ServerSpec
from .engine import EngineError, EngineLost, EngineState
from .ray_node import BUDGET_RESOURCE, NAMESPACE, actor_class, actor_name, server_name
from .remote import AgentClient, AgentEngine, AgentHost

if TYPE_CHECKING:
    from .routing import Router

log = logging.getLogger(__name__)

#: an agent's HTTP operation -> the node actor's
_OPERATIONS = {("GET", "/agent/info"): "info", ("POST", "/agent/estimate"): "estimate",
               **{("POST", f"/agent/engines/{op}"): op for op in ("start", "stop", "swap_out", "swap_in", "check")}}


def _ray():
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - the [ray] extra
        raise EngineError("serve --ray needs Ray: pip install 'loader-plugins[ray]'") from exc
    return ray


class RayNodeClient(AgentClient):
    """The agent operations of one node, as Ray calls to its actor; OpenAI paths go to its relay."""

    def __init__(self, actor: Any, node_id: str, hello: dict[str, Any]):
        super().__init__(hello["url"], hello["secret"])
        self.actor = actor
        self.node_id = node_id

    async def call(self, method: str, path: str, *, timeout: float = 30.0, json: Any = None, **_kwargs) -> Any:
        ray = _ray()
        op = _OPERATIONS.get((method, path))
        if op is None:
            raise EngineError(f"Ray node {self.node_id}: no operation for {method} {path}")
        try:
            reply = await asyncio.wait_for(asyncio.wrap_future(self.actor.call.remote(op, json).future()), timeout)
        except asyncio.TimeoutError as exc:
            raise EngineError(f"the actor of Ray node {self.node_id} did not answer {op} within {timeout:.0f} s") \
                from exc
        except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError,
                ray.exceptions.NodeDiedError) as exc:
            raise EngineLost(f"Ray node {self.node_id} is gone, and its engines with it ({type(exc).__name__})") \
                from exc
        except ray.exceptions.RayError as exc:
            raise EngineError(f"Ray node {self.node_id}: {op} failed ({exc})") from exc
        if "error" in reply:
            raise EngineError(f"Ray node {self.node_id} refused {op}: HTTP {reply['error']['status']}: "
                              f"{reply['error']['message']}")
        return reply["result"]


class RayNodeHost(AgentHost):
    """A Ray node, through its actor."""

    def __init__(self, client: RayNodeClient):
        self.client = client


class RayCluster:
    """The router's view of the cluster: which nodes are servers, their actors, joins and deaths."""

    def __init__(self, spec: RaySpec, default_budget: int):
        self.spec = spec
        self.default_budget = default_budget
        self.nodes: dict[str, str] = {}       # node id -> server name, for the nodes that are servers now
        self._watch: asyncio.Task | None = None

    def connect(self) -> None:
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=self.spec.address, namespace=NAMESPACE, log_to_driver=False,
                     logging_level=logging.WARNING, configure_logging=False)
        log.info("joined the Ray cluster at %s (namespace %s)", self.spec.address, NAMESPACE)

    def serving_nodes(self) -> dict[str, int]:
        """Live nodes that are servers -> their budget in bytes."""
        nodes = [n for n in _ray().nodes() if n.get("Alive")]
        marked = {n["NodeID"]: int(n["Resources"][BUDGET_RESOURCE]) for n in nodes
                  if n.get("Resources", {}).get(BUDGET_RESOURCE)}
        if marked:
            return marked
        return {n["NodeID"]: self.default_budget for n in nodes}

    async def actor(self, node_id: str, budget: int) -> RayNodeClient:
        """The node's actor (found by name, else started there) and what it says of itself."""
        ray = _ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        name = actor_name(node_id)
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
            log.info("found the actor of Ray node %s", node_id[:12])
        except ValueError:
            actor = actor_class().options(
                name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                runtime_env={"env_vars": dict(self.spec.env)} if self.spec.env else None,
            ).remote(node_id, budget, self.spec.cache_dir, self.spec.dram_cache_dir,
                     f"{self.spec.log_dir}/{server_name(node_id)}", self.spec.gpu_fraction)
        try:
            hello = await asyncio.wait_for(asyncio.wrap_future(actor.hello.remote().future()), self.spec.start_timeout)
        except (asyncio.TimeoutError, ray.exceptions.RayError) as exc:
            raise EngineError(f"the actor of Ray node {node_id} did not start ({exc!r})") from exc
        return RayNodeClient(actor, node_id, hello)

    async def sync(self, router: "Router") -> None:
        """Servers for the nodes that joined; the nodes that died leave, their engines lost."""
        nodes = await asyncio.to_thread(self.serving_nodes)
        for node_id, name in list(self.nodes.items()):
            if node_id not in nodes:
                del self.nodes[node_id]
                router.drop_server(name, f"Ray node {node_id} is gone")
        for node_id, budget in nodes.items():
            if node_id in self.nodes:
                continue
            try:
                client = await self.actor(node_id, budget)
            except EngineError as exc:
                log.warning("Ray node %s is not a server yet: %s", node_id[:12], exc)
                continue
            name = server_name(node_id)
            spec = ServerSpec(name=name, budget=budget, url=client.url, cache_dir=self.spec.cache_dir,
                              dram_cache_dir=self.spec.dram_cache_dir)
            self.nodes[node_id] = name
            await router.add_server(spec, RayNodeHost(client))
            await self._adopt(router, name)

    async def _adopt(self, router: "Router", name: str) -> None:
        """The engines the node's actor runs that the router does not know yet (a restarted router)."""
        server = router.servers[name]
        info = server.reported or {}
        for entry in info.get("engines") or []:
            engine = server.engines.get(entry.get("model"))
            if engine is None or engine.state != EngineState.STOPPED or not entry.get("alive"):
                continue
            record = {"pid": entry["pid"], "resident_bytes": entry.get("resident_bytes"),
                      "measured": entry.get("resident_bytes_measured")}
            if await engine.adopt(record):
                log.info("found %s on %s again (%s, pid %s)", engine.spec.name, name, engine.state, entry["pid"])
        router.save()

    # ---- the watch ----

    def start(self, router: "Router") -> None:
        self._watch = asyncio.create_task(self._loop(router))

    async def _loop(self, router: "Router") -> None:
        while True:
            await asyncio.sleep(self.spec.poll_seconds)
            try:
                await self.sync(router)
            except Exception:   # a GCS hiccup: try again at the next tick
                log.exception("syncing with the Ray cluster")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            try:
                await self._watch
            except asyncio.CancelledError:
                pass


def stop_node_actors() -> list[str]:
    """Stop every node actor of this namespace and their engines (``model-streamer serve --ray
    ... --stop-cluster-engines``, and the tests)."""
    ray = _ray()
    stopped = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") == NAMESPACE:
            actor = ray.get_actor(entry["name"], namespace=NAMESPACE)
            try:
                ray.get(actor.shutdown.remote(), timeout=120)
            except ray.exceptions.RayError:
                pass
            ray.kill(actor)
            stopped.append(entry["name"])
    return stopped
