"""Placement: each server's estimated startup of a model, its parts, and the choice between them.

Engines here are real :class:`~loader_plugins.serve.local.LocalEngine` objects whose process is a
real idle process (``sleep``), so ``alive()`` is what a router sees; nothing starts vLLM.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from loader_plugins.cache.estimate import LoadHistory
from loader_plugins.serve import placement
from loader_plugins.serve.catalog import ModelSpec, ServerSpec
from loader_plugins.serve.engine import EngineState
from loader_plugins.serve.local import LocalEngine as Engine
from loader_plugins.serve.placement import Estimate, ServerHistory, choose, estimate_server, victims

RUNNING, STOPPED, SWAPPED = EngineState.RUNNING, EngineState.STOPPED, EngineState.SWAPPED
GB = 10**9


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []

    def spawn() -> subprocess.Popen:
        started.append(subprocess.Popen(["sleep", "60"]))
        return started[-1]

    yield spawn
    for p in started:
        p.kill()
        p.wait()


def _engine(tmp_path, name, server, *, state=STOPPED, resident=GB, proc=None, inflight=0, last_used=0.0):
    e = Engine(ModelSpec(name=name, checkpoint=str(tmp_path / name)), tmp_path / "logs",
               ServerSpec(name=server, budget=1))
    e.state, e.resident_bytes, e.proc, e.inflight, e.last_used = state, resident, proc, inflight, last_used
    return e


def _load(tier, seconds, nbytes=GB):
    return {"tier": tier, "seconds": seconds, "bytes": nbytes, "basis": f"test {tier}"}


def test_cold_start_goes_where_the_checkpoint_loads_fastest(tmp_path):
    history = ServerHistory(LoadHistory(tmp_path / "h.json"))
    disk = estimate_server("near", _engine(tmp_path, "m", "near"), [], 10 * GB, history, load=_load("disk", 1.2),
                           queue_s=0)
    s3 = estimate_server("far", _engine(tmp_path, "m", "far"), [], 10 * GB, history, load=_load("s3", 3.5), queue_s=0)
    assert (disk.how, disk.tier, s3.tier) == ("cold", "disk", "s3")
    engine_s = placement.DEFAULT_ENGINE_S
    assert disk.parts == {"bring_up": 1.2 + engine_s, "free": 0.0, "queue": 0.0}
    assert s3.seconds == pytest.approx(3.5 + engine_s)
    assert choose([s3, disk]) is disk
    assert any("default" in b and "engine" in b for b in disk.basis)


def test_a_host_snapshot_beats_a_cold_start(tmp_path, procs):
    history = ServerHistory(LoadHistory(tmp_path / "h.json"))
    swapped = _engine(tmp_path, "m", "b", state=SWAPPED, resident=4 * GB, proc=procs())
    restore = estimate_server("b", swapped, [swapped], 10 * GB, history, load=None, queue_s=0)
    assert (restore.how, restore.tier) == ("swap_in", "host")
    assert restore.seconds == pytest.approx(placement.DEFAULT_SWAP_OVERHEAD_S + 4 / placement.DEFAULT_SWAP_IN_GBPS)
    cold = estimate_server("a", _engine(tmp_path, "m", "a"), [], 10 * GB, history, load=_load("dram", 0.5),
                           queue_s=0)
    assert choose([cold, restore]) is restore
    running = _engine(tmp_path, "m", "c", state=RUNNING, proc=procs())
    assert estimate_server("c", running, [running], GB, history, load=None, queue_s=0).seconds == 0.0
    with pytest.raises(ValueError, match="needs the load estimate"):
        estimate_server("a", _engine(tmp_path, "m", "a"), [], GB, history, load=None, queue_s=0)


def test_bandwidths_and_engine_start_up_are_learned_per_server(tmp_path, procs):
    history = ServerHistory(LoadHistory(tmp_path / "h.json"))
    history.record("b", "host", 4 * GB, 0.5)      # 8 GB/s measured on b
    history.record("a", "host", 4 * GB, 4.0)      # 1 GB/s on a
    for seconds in (20.0, 22.0, 90.0):
        history.record("b", "engine", GB, seconds)
    swapped = _engine(tmp_path, "m", "b", state=SWAPPED, resident=4 * GB, proc=procs())
    est = estimate_server("b", swapped, [swapped], 10 * GB, history, load=None, queue_s=0)
    assert est.seconds == pytest.approx(0.5) and "1 host of one size on b" in est.basis[0]
    swapped_a = _engine(tmp_path, "m", "a", state=SWAPPED, resident=4 * GB, proc=procs())
    assert estimate_server("a", swapped_a, [swapped_a], 10 * GB, history, load=None, queue_s=0).seconds == \
        pytest.approx(4.0)
    cold = estimate_server("b", _engine(tmp_path, "n", "b"), [], 10 * GB, history, load=_load("disk", 1.0), queue_s=0)
    assert cold.parts["bring_up"] == pytest.approx(1.0 + 22.0)   # the median of b's cold starts
    # a history another router process wrote is read back
    again = ServerHistory(LoadHistory(tmp_path / "h.json"))
    assert again.engine_seconds("b")[0] == pytest.approx(22.0)


def test_swap_estimates_prefer_the_models_own_swaps_then_a_fit_with_fixed_costs(tmp_path, procs):
    history = ServerHistory(LoadHistory(tmp_path / "h.json"))
    # swaps with a fixed cost: 0.3 s + bytes at 4 GB/s, seen for two other models of different sizes
    history.record("b", "host", 1 * GB, 0.3 + 0.25, model="small")
    history.record("b", "host", 8 * GB, 0.3 + 2.0, model="large")
    seconds, basis = history.swap_seconds("b", "host", "new", 4 * GB, placement.DEFAULT_SWAP_IN_GBPS)
    assert seconds == pytest.approx(0.3 + 1.0) and "fit of the last 2 host on b" in basis
    # the model's own swap-ins of its size win over the fit (their median)
    for s in (0.9, 1.1, 5.0):
        history.record("b", "host", 4 * GB, s, model="new")
    swapped = _engine(tmp_path, "new", "b", state=SWAPPED, resident=4 * GB, proc=procs())
    est = estimate_server("b", swapped, [swapped], 10 * GB, history, load=None, queue_s=0)
    assert est.seconds == pytest.approx(1.1) and "median of the last 3 host of new on b" in est.basis[0]
    # the same model at another size (its resident bytes measured anew) is not its own sample
    assert "fit" in history.swap_seconds("b", "host", "new", 2 * GB, 2.0)[1]
    # larger swaps that were not slower: fixed costs only, the median
    flat = ServerHistory(LoadHistory(tmp_path / "flat.json"))
    for nbytes, s in ((GB, 0.4), (3 * GB, 0.3), (5 * GB, 0.35)):
        flat.record("a", "swap_out", nbytes, s)
    seconds, basis = flat.swap_seconds("a", "swap_out", "m", 4 * GB, 2.0)
    assert seconds == pytest.approx(0.35) and "no size dependence" in basis
    # one size only: no fit; bytes at the bandwidth shown when it beats the default (a GPU's
    # link), else at the default with the rest of their time as fixed cost (a CPU swap's RPCs)
    one = ServerHistory(LoadHistory(tmp_path / "one.json"))
    one.record("a", "host", 2 * GB, 0.1)                           # 20 GB/s
    assert one.swap_seconds("a", "host", "m", 4 * GB, 2.0)[0] == pytest.approx(0.2)
    slow = ServerHistory(LoadHistory(tmp_path / "slow.json"))
    for s in (0.16, 0.12, 0.17):                                   # 141 MB: 0.07 s at 2 GB/s, the rest fixed
        slow.record("a", "host", 141 * 10**6, s)
    seconds, basis = slow.swap_seconds("a", "host", "m", 347 * 10**6, 2.0)
    assert seconds == pytest.approx(0.16 - 0.0705 + 0.1735) and "of one size" in basis
    # nothing measured: the default fixed cost and bandwidth
    seconds, basis = ServerHistory(LoadHistory(tmp_path / "none.json")).swap_seconds("a", "host", "m", GB, 2.0)
    assert seconds == pytest.approx(placement.DEFAULT_SWAP_OVERHEAD_S + 0.5) and basis.startswith("default")


def test_making_room_swaps_out_idle_models_least_recently_used_first(tmp_path, procs):
    history = ServerHistory(LoadHistory(tmp_path / "h.json"))
    history.record("s", "swap_out", 2 * GB, 1.0)   # 2 GB/s
    now = time.monotonic()
    old = _engine(tmp_path, "old", "s", state=RUNNING, resident=3 * GB, proc=procs(), last_used=now - 100)
    recent = _engine(tmp_path, "recent", "s", state=RUNNING, resident=3 * GB, proc=procs(), last_used=now - 1)
    parked = _engine(tmp_path, "parked", "s", state=SWAPPED, resident=3 * GB, proc=procs())
    target = _engine(tmp_path, "new", "s", resident=3 * GB)
    engines = [old, recent, parked, target]
    idle, busy = victims(target, engines, 7 * GB)      # 6 GB in use + 3 GB > 7 GB: one must go
    assert [e.spec.name for e in idle] == ["old"] and busy == []
    est = estimate_server("s", target, engines, 7 * GB, history, load=_load("local", 1.0), queue_s=2.5)
    assert est.evict == ["old"] and est.parts["free"] == pytest.approx(1.5) and est.parts["queue"] == 2.5
    old.inflight = 1          # now the least recently used one is busy: the other idle one goes instead
    idle, busy = victims(target, engines, 7 * GB)
    assert [e.spec.name for e in idle] == ["recent"] and busy == []
    recent.inflight = 1       # both busy: the estimate says the router would have to wait
    idle, busy = victims(target, engines, 7 * GB)
    assert idle == [] and [e.spec.name for e in busy] == ["old"]
    est = estimate_server("s", target, engines, 7 * GB, history, load=_load("local", 1.0), queue_s=0)
    # swapped out once idle (1.5 s), and nothing says when that is: the router waits up to 300 s
    assert est.parts["free"] == pytest.approx(1.5 + placement.BUSY_PENALTY_S) and "no estimate" in est.basis[-1]
    est = estimate_server("s", target, engines, 7 * GB, history, load=_load("local", 1.0), queue_s=0,
                          busy=lambda e: (12.0, f"{e.spec.name} ends soon"))
    assert est.parts["free"] == pytest.approx(1.5 + 12.0) and "old ends soon" in est.basis[-1]
    alone = _engine(tmp_path, "huge", "s", resident=100 * GB)
    assert victims(alone, [alone], 7 * GB) == ([], [])   # a model alone always fits


def test_a_busy_model_is_idle_after_its_streams_move_or_end(tmp_path, procs):
    """The router's estimate of when a busy model is idle: its streams moved to its engine on
    another server at the prefill rate earlier moves of that model measured; else the slowest
    stream's tokens left at its own decode rate; else (a request it cannot follow) unknown."""
    from loader_plugins.serve.catalog import parse_catalog
    from loader_plugins.serve.migration import Flight
    from loader_plugins.serve.routing import Router

    catalog = parse_catalog({"servers": {"a": {"budget": GB}, "b": {"budget": GB}},
                             "models": {"m": {"checkpoint": str(tmp_path / "m")}}})
    router = Router(catalog, tmp_path / "logs")
    busy, other = router.servers["a"].engines["m"], router.servers["b"].engines["m"]
    busy.state, busy.proc = RUNNING, procs()
    flights = [Flight({"prompt": "x", "max_tokens": 40}, busy), Flight({"prompt": "y", "max_tokens": 10}, busy)]
    for f, prompt in zip(flights, ([1] * 30, [2] * 10)):
        f.prompt_ids = prompt
        f.generated([7])
    time.sleep(0.02)
    flights[0].generated([7, 7, 7])        # 4 of 40 tokens
    flights[1].generated([7])              # 2 of 10
    router.flights[id(busy)] = set(flights)
    busy.inflight = 2

    seconds, why = router.busy_estimate(busy)       # nowhere to move them: wait for the slower one
    slow = flights[0]
    rate = (slow._last[1] - slow._first[1]) / (slow._last[0] - slow._first[0])
    assert seconds == pytest.approx(max(36 / rate, flights[1].remaining_seconds())) and "wait" in why

    other.state, other.proc = RUNNING, procs()      # the model runs on b too, but no move measured yet
    assert "wait" in router.busy_estimate(busy)[1]
    router.migrations.append({"model": "m", "prompt_tokens": 100, "tokens_moved": 100, "catch_up_seconds": 0.5})
    seconds, why = router.busy_estimate(busy)       # 400 tokens/s: 34 + 12 tokens to prefill on b
    assert seconds == pytest.approx(46 / 400) and "to b" in why

    busy.inflight = 3                                 # a request the router does not follow (not streamed)
    assert router.busy_estimate(busy) is None


def test_choose_prefers_the_first_listed_on_a_tie_and_describes_itself():
    a = Estimate("a", "cold", "disk", {"bring_up": 2.0, "free": 0.0, "queue": 0.0}, ["x"])
    b = Estimate("b", "cold", "disk", {"bring_up": 1.0, "free": 1.0, "queue": 0.0}, ["y"])
    assert choose([a, b]) is a and choose([b, a]) is b
    assert a.describe()["seconds"] == 2.0 and a.line().startswith("a 2.00 s (cold from disk")
