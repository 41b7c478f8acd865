"""Placement and making room, the router's whole loop, against engines that are fakes.

:class:`FakeEngine` implements the engine interface (:class:`~loader_plugins.serve.engine.Engine`)
in memory: it stands in for a vLLM process so that this pure-logic test can drive
:class:`~loader_plugins.serve.routing.Router` through many starts and swaps in milliseconds. What
the router asked of each engine is written to one list, in order. (The same loop on real
engines: integration_tests/test_serve.py and test_serve_placement.py.)
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("prometheus_client")

from loader_plugins.serve import scheduler  # noqa: E402
from loader_plugins.serve.catalog import parse_catalog  # noqa: E402
from loader_plugins.serve.engine import Engine, EngineHost, EngineState  # noqa: E402
from loader_plugins.serve.errors import ServeError  # noqa: E402
from loader_plugins.serve.routing import Router  # noqa: E402

GB = 10**9


class FakeProcess:
    pid = 4242

    def __init__(self):
        self.returncode = None

    def poll(self):
        return self.returncode


class FakeEngine(Engine):
    """A fake engine: its process is a flag, its swaps move ``resident_bytes`` instantly."""

    def __init__(self, model, server, extra_config, *, calls: list, load: dict):
        super().__init__(model, server, extra_config, log_path="(a fake engine)")
        self.calls, self.load = calls, load
        self.resident_bytes = GB

    def _note(self, op: str) -> None:
        self.calls.append((op, self.spec.name, self.server.name))

    @property
    def base_url(self) -> str:
        return "http://fake.invalid"

    @property
    def headers(self) -> dict[str, str]:
        return {}

    async def answers(self, grace: float = 5.0) -> bool:
        return self.alive()

    async def load_estimate(self) -> dict:
        return dict(self.load)

    async def adopt(self, record) -> bool:
        return False

    async def _launch(self) -> float | None:
        self._note("start")
        self.proc, self.port = FakeProcess(), 1
        return 0.001

    async def _terminate(self, proc) -> None:
        self._note("stop")
        proc.returncode = 0

    async def _offload(self) -> dict[str, int]:
        self._note("swap_out")
        return {"bytes": self.resident_bytes, "opaque_bytes": 0}

    async def _restore(self) -> None:
        self._note("swap_in")


class FakeHost(EngineHost):
    def __init__(self, calls: list, tier: str, seconds: float):
        self.calls, self.load = calls, {"tier": tier, "seconds": seconds, "bytes": GB, "basis": f"fake {tier}"}

    def engine(self, model, server, extra_config) -> FakeEngine:
        return FakeEngine(model, server, extra_config, calls=self.calls, load=self.load)


def _router(tmp_path, servers: dict[str, tuple[int, str, float]], models=("x", "y", "z")):
    """A router over fake hosts: ``servers`` maps a name to (budget, tier, load seconds)."""
    catalog = parse_catalog({"servers": {name: {"budget": budget} for name, (budget, _, _) in servers.items()},
                             "models": {m: {"checkpoint": str(tmp_path / m)} for m in models}})
    calls: list = []
    hosts = {name: FakeHost(calls, tier, seconds) for name, (_, tier, seconds) in servers.items()}
    return Router(catalog, tmp_path / "logs", hosts=hosts), calls


async def _use(router, name: str, server: str | None = None):
    engine = await router.acquire(name, server)
    router.release(engine)
    return engine


def _states(router) -> dict[tuple[str, str], str]:
    return {(e.spec.name, e.server.name): e.state.value for e in router.engines}


def test_room_is_made_by_swapping_out_the_least_recently_used_idle_model(tmp_path):
    router, calls = _router(tmp_path, {"s": (2 * GB, "disk", 1.0)})

    async def scenario():
        for name in ("x", "y", "z"):         # the third does not fit: x, used longest ago, goes
            await _use(router, name)
        assert _states(router) == {("x", "s"): "swapped", ("y", "s"): "running", ("z", "s"): "running"}
        await _use(router, "x")              # back in, and y (now the oldest) makes room for it
        assert router.decisions[-1]["how"] == "swap_in" and router.decisions[-1]["measured_seconds"] is not None
        await router.close()

    asyncio.run(scenario())
    assert [c[:2] for c in calls] == [("start", "x"), ("start", "y"), ("swap_out", "x"), ("start", "z"),
                                      ("swap_out", "y"), ("swap_in", "x"), ("stop", "x"), ("stop", "y"),
                                      ("stop", "z")]
    assert [d["how"] for d in router.decisions] == ["cold", "cold", "cold", "swap_in"]
    assert router.decisions[2]["candidates"][0]["evict"] == ["x"]
    assert all(e.measured for e in router.engines if e.spec.name in ("x", "y"))


def test_a_busy_model_is_waited_for_and_never_swapped_out(tmp_path, monkeypatch):
    router, calls = _router(tmp_path, {"s": (2 * GB, "disk", 1.0)})

    async def scenario():
        await _use(router, "x")
        held = [await router.acquire("y"), await router.acquire("z")]   # x goes; y and z now busy
        monkeypatch.setattr(scheduler, "ROOM_WAIT_S", 0.3)
        with pytest.raises(ServeError) as refused:                         # both busy: refused in time
            await router.acquire("x")
        assert refused.value.status == 503 and refused.value.code == "no_capacity"
        assert "all busy (y)" in str(refused.value)          # y, used longest ago, is the one that would go
        monkeypatch.setattr(scheduler, "ROOM_WAIT_S", 30.0)
        waiting = asyncio.ensure_future(router.acquire("x"))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        router.release(held[1])                                            # z is idle now: z goes
        router.release(await asyncio.wait_for(waiting, 5))
        router.release(held[0])

    asyncio.run(scenario())
    assert [c[:2] for c in calls] == [("start", "x"), ("start", "y"), ("swap_out", "x"), ("start", "z"),
                                      ("swap_out", "z"), ("swap_in", "x")]
    assert _states(router) == {("x", "s"): "running", ("y", "s"): "running", ("z", "s"): "swapped"}
    assert all(e.inflight == 0 for e in router.engines)


def test_placement_weighs_load_tiers_room_and_snapshots_across_servers(tmp_path):
    # a is listed first (a tie would go to it) but loads from disk; b loads from DRAM
    router, calls = _router(tmp_path, {"a": (GB, "disk", 5.0), "b": (GB, "dram", 0.5)}, models=("m", "n"))

    async def scenario():
        await _use(router, "m")     # cold on both: b's DRAM wins
        await _use(router, "n")     # b must swap m out first, and still beats a cold start from disk
        await _use(router, "m")     # m's host snapshot on b beats a cold start on a
        await _use(router, "m", "a")                 # asked for on a: started there, nothing to evict
        with pytest.raises(ServeError, match="has an engine on 2 servers"):
            await router.swap_out("m")
        await router.swap_out("m", "a")

    asyncio.run(scenario())
    chosen = [(d["model"], d["chosen"], d["how"]) for d in router.decisions]
    assert chosen == [("m", "b", "cold"), ("n", "b", "cold"), ("m", "b", "swap_in")]
    first = {c["server"]: c for c in router.decisions[0]["candidates"]}
    assert (first["a"]["tier"], first["b"]["tier"]) == ("disk", "dram")
    assert first["b"]["seconds"] < first["a"]["seconds"]
    second = {c["server"]: c for c in router.decisions[1]["candidates"]}
    assert second["b"]["evict"] == ["m"] and second["b"]["parts"]["free"] > 0 and second["a"]["evict"] == []
    assert calls == [("start", "m", "b"), ("swap_out", "m", "b"), ("start", "n", "b"), ("swap_out", "n", "b"),
                     ("swap_in", "m", "b"), ("start", "m", "a"), ("swap_out", "m", "a")]
    # what each swap measured is the placement history that estimates the next
    assert router.scheduler.history.history.samples("swap_out", host="b")


def test_a_dead_engine_is_started_again_and_records_follow_the_engines(tmp_path):
    router, calls = _router(tmp_path, {"s": (4 * GB, "disk", 1.0)}, models=("x",))

    async def scenario():
        engine = await _use(router, "x")
        assert [r["model"] for r in router.records.load()] == ["x"]
        engine.proc.returncode = -9                  # the process died
        assert router.running("x") is None and not await engine.answers()
        assert engine is await _use(router, "x")     # the same engine object, a new process
        assert engine.state == EngineState.RUNNING
        await router.stop("x")
        assert router.records.load() == []

    asyncio.run(scenario())
    assert [c[0] for c in calls] == ["start", "start", "stop"]
