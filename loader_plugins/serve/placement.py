"""Where a model that is not running should start: the server with the smallest estimated startup.

For each server (ServerlessLLM's load-time-aware allocation)::

    startup = bring-up + free + queue

* **bring-up**: 0 if the model runs there; the restore time of its host snapshot if it is swapped
  out there (:meth:`ServerHistory.swap_seconds`: that model's own recent swap-ins there, else a
  fixed cost plus bytes at a bandwidth fitted to the server's swap-ins, tier ``host``); else a
  cold start: the load time from the fastest tier holding the checkpoint for that server's cache
  directories (:func:`loader_plugins.cache.estimate.estimate`: DRAM, disk, S3 or local files,
  bandwidths learned from that host's loads) plus the engine's own start-up (process, model
  construction, KV cache), learned from that server's earlier cold starts;
* **free**: swap-outs of the least recently used idle models that make room under the server's
  budget, estimated as swap-ins are. A model busy with requests is swapped out once it is idle:
  the router moves its streams to its engine on another server (estimated as the tokens they
  carry over the prefill rate that model's earlier moves measured) or waits for them to end
  (the slowest stream's tokens left over its own decode rate); the router's ``busy`` callable
  gives that estimate. Requests it cannot see the progress of (not streamed) have none: such a
  model costs :data:`BUSY_PENALTY_S`;
* **queue**: what remains of start-ups and swaps already under way on that server.

Swap and engine samples are kept per server in the router's history file
(:class:`~loader_plugins.cache.estimate.LoadHistory`, host = server name, tiers ``host``,
``swap_out`` and ``engine``); loads by the engines themselves in their cache's history.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable, Sequence

from ..cache.estimate import LoadHistory
from .engine import Engine, EngineState

#: swap bandwidths (GB/s) and engine start-up (s) assumed before a server has measured any
DEFAULT_SWAP_IN_GBPS = 2.0
DEFAULT_SWAP_OUT_GBPS = 2.0
DEFAULT_ENGINE_S = 30.0
#: the fixed part of a swap assumed before a server has measured any (the RPC to the engine's
#: workers, pausing and resuming it): 0.09-0.17 s of the 0.12-0.27 s swap-ins of 141-347 MB on
#: the 2-core VM (6 December), where bytes at the default bandwidth alone said 0.07 s for 0.16 s
DEFAULT_SWAP_OVERHEAD_S = 0.1
#: what a model that must be swapped out but is busy with requests nobody can estimate the end of
#: adds (the router waits up to ``ROOM_WAIT_S``, also 300 s, for them)
BUSY_PENALTY_S = 300.0
#: samples of engine start-up in the median
RECENT = 5
#: a model's own swap sample counts for a size within this factor of the swap estimated
SAME_SIZE = 1.25
#: sizes a fit over swaps of different models needs to span
FIT_SPAN = 1.5


def _fit(samples: Sequence[dict]) -> tuple[float, float, int] | None:
    """Least squares ``seconds = overhead + bytes * slope`` (both clamped at 0) over samples whose
    sizes span at least :data:`FIT_SPAN`; None when they do not."""
    if len(samples) < 2:
        return None
    sizes = [float(r["bytes"]) for r in samples]
    if max(sizes) < FIT_SPAN * min(sizes):
        return None
    times = [float(r["seconds"]) for r in samples]
    mean_b, mean_t = statistics.fmean(sizes), statistics.fmean(times)
    var = sum((b - mean_b) ** 2 for b in sizes)
    slope = sum((b - mean_b) * (t - mean_t) for b, t in zip(sizes, times)) / var
    if slope <= 0:                      # larger swaps were not slower: fixed costs dominate
        return statistics.median(times), 0.0, len(samples)
    overhead = mean_t - slope * mean_b
    if overhead < 0:                    # through the origin: bandwidth only
        return 0.0, sum(times) / sum(sizes), len(samples)
    return overhead, slope, len(samples)


@dataclasses.dataclass
class Estimate:
    """One server's estimated startup of one model, with the parts and what each is based on."""

    server: str
    how: str                       # "running", "swap_in" or "cold"
    tier: str                      # gpu, host, dram, disk, s3, local, mixed
    parts: dict[str, float]        # bring_up (load + engine, or restore), free, queue
    basis: list[str]
    evict: list[str] = dataclasses.field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> dict[str, Any]:
        return {"server": self.server, "how": self.how, "tier": self.tier, "seconds": round(self.seconds, 4),
                "parts": {k: round(v, 4) for k, v in self.parts.items()}, "basis": self.basis,
                "evict": self.evict}

    def line(self) -> str:
        parts = " + ".join(f"{k} {v:.2f}" for k, v in self.parts.items())
        return f"{self.server} {self.seconds:.2f} s ({self.how} from {self.tier}: {parts})"


class ServerHistory:
    """Swap and engine start-up samples of every server, in one history file."""

    def __init__(self, history: LoadHistory):
        self.history = history

    def record(self, server: str, kind: str, nbytes: int, seconds: float, model: str | None = None) -> None:
        """One swap (``kind`` ``host`` = swap-in, ``swap_out``) or engine start-up on ``server``;
        with ``model``, also kept as that model's own sample."""
        if nbytes > 0 and seconds > 0:
            self.history.record(kind, nbytes, seconds, host=server)
            if model is not None:
                self.history.record(f"{kind}:{model}", nbytes, seconds, host=server)

    def swap_seconds(self, server: str, kind: str, model: str, nbytes: int, default_gbps: float
                     ) -> tuple[float, str]:
        """A swap's seconds, from the best evidence there is: the same model's recent swaps of
        the same size on that server (their median); else a fit ``overhead + bytes / bandwidth``
        over the server's recent swaps of different sizes (a swap has fixed costs besides its
        bytes: pausing, RPCs, waking); else, from swaps of one size, bytes at their bandwidth or
        the default, whichever is higher, plus what that leaves of their time; else the defaults."""
        own = [r for r in self.history.samples(f"{kind}:{model}", host=server)
               if nbytes / SAME_SIZE <= r["bytes"] <= nbytes * SAME_SIZE][-RECENT:]
        if own:
            return (statistics.median(r["seconds"] for r in own),
                    f"median of the last {len(own)} {kind} of {model} on {server}")
        fit = _fit(self.history.samples(kind, host=server)[-2 * RECENT:])
        if fit is not None:
            overhead, seconds_per_byte, n = fit
            gbps = f"{1e-9 / seconds_per_byte:.2f} GB/s" if seconds_per_byte > 0 else "no size dependence"
            return (overhead + nbytes * seconds_per_byte,
                    f"fit of the last {n} {kind} on {server}: {overhead:.3f} s + bytes at {gbps}")
        samples = self.history.samples(kind, host=server)[-RECENT:]
        if not samples:
            return (DEFAULT_SWAP_OVERHEAD_S + nbytes / (default_gbps * 1e9),
                    f"default {DEFAULT_SWAP_OVERHEAD_S} s + bytes at {default_gbps} GB/s: no {kind} measured on {server}")
        # swaps of one size cannot tell fixed costs from bandwidth: bytes at the bandwidth they
        # showed or the default, whichever is higher, and what that leaves of their time as fixed
        shown = sum(r["bytes"] for r in samples) / sum(r["seconds"] for r in samples) / 1e9
        gbps = max(shown, default_gbps)
        overhead = statistics.median(max(0.0, r["seconds"] - r["bytes"] / (gbps * 1e9)) for r in samples)
        return (overhead + nbytes / (gbps * 1e9),
                f"{len(samples)} {kind} of one size on {server}: {overhead:.3f} s + bytes at {gbps:.2f} GB/s")

    def engine_seconds(self, server: str) -> tuple[float, str]:
        samples = self.history.samples("engine", host=server)[-RECENT:]
        if not samples:
            return DEFAULT_ENGINE_S, f"default {DEFAULT_ENGINE_S:.0f} s: no engine start measured on {server}"
        return (statistics.median(r["seconds"] for r in samples),
                f"median engine start-up of the last {len(samples)} cold start(s) on {server}")


def estimate_server(server: str, target: Engine, engines: Sequence[Engine], budget: int, history: ServerHistory,
                    *, load: dict | None, queue_s: float, now: float | None = None,
                    busy: Callable[[Engine], tuple[float, str] | None] | None = None) -> Estimate:
    """``target``'s startup on ``server`` whose engines are ``engines`` (``target`` among them).
    ``load`` is :func:`~loader_plugins.cache.estimate.estimate` for the server's tiers (needed
    for a cold start only). ``busy(engine)``: seconds until a busy engine is idle, and why (None:
    not known)."""
    now = time.monotonic() if now is None else now
    basis: list[str] = []
    if target.state == EngineState.RUNNING and target.alive():
        return Estimate(server, "running", "gpu", {"bring_up": 0.0, "free": 0.0, "queue": 0.0}, ["running there"])
    if target.state == EngineState.SWAPPED and target.alive():
        how, tier = "swap_in", "host"
        bring_up, why = history.swap_seconds(server, "host", target.spec.name, target.resident_bytes,
                                             DEFAULT_SWAP_IN_GBPS)
        basis.append(f"restore {target.resident_bytes} bytes: {why}")
    else:
        if load is None:
            raise ValueError("a cold start needs the load estimate")
        how, tier = "cold", load["tier"]
        engine_s, why = history.engine_seconds(server)
        bring_up = load["seconds"] + engine_s
        basis.append(f"load {load['bytes']} bytes from {tier} in {load['seconds']:.3f} s ({load['basis']})")
        basis.append(f"engine {engine_s:.2f} s ({why})")
    free, evict = _free_seconds(server, target, engines, budget, history, basis, busy)
    if queue_s > 0:
        basis.append(f"{queue_s:.2f} s of start-ups and swaps under way there")
    return Estimate(server, how, tier, {"bring_up": bring_up, "free": free, "queue": max(0.0, queue_s)}, basis, evict)


def victims(target: Engine, engines: Sequence[Engine], budget: int) -> tuple[list[Engine], list[Engine]]:
    """(idle engines to swap out, least recently used first; busy ones that would also have to
    go) for ``target`` to fit ``budget``. A model alone always fits."""
    others = [e for e in engines if e is not target and e.alive() and e.state != EngineState.SWAPPED]
    used = sum(e.resident_bytes for e in others)
    chosen: list[Engine] = []
    busy: list[Engine] = []
    if used + target.resident_bytes <= budget:
        return chosen, busy
    for e in sorted(others, key=lambda e: (not (e.state == EngineState.RUNNING and e.inflight == 0), e.last_used)):
        (chosen if e.state == EngineState.RUNNING and e.inflight == 0 else busy).append(e)
        used -= e.resident_bytes
        if used + target.resident_bytes <= budget:
            break
    return chosen, busy


def _free_seconds(server: str, target: Engine, engines: Sequence[Engine], budget: int, history: ServerHistory,
                  basis: list[str], busy_estimate=None) -> tuple[float, list[str]]:
    idle, busy = victims(target, engines, budget)
    seconds = 0.0
    for e in idle + busy:
        s, why = history.swap_seconds(server, "swap_out", e.spec.name, e.resident_bytes, DEFAULT_SWAP_OUT_GBPS)
        seconds += s
        basis.append(f"swap out {e.spec.name} ({e.resident_bytes} bytes) {s:.3f} s ({why})")
    for e in busy:
        known = busy_estimate(e) if busy_estimate is not None else None
        if known is None:
            seconds += BUSY_PENALTY_S
            basis.append(f"{e.spec.name} is busy ({e.inflight} request(s), {e.state}), with no estimate of their "
                         f"end: +{BUSY_PENALTY_S:.0f} s")
        else:
            seconds += known[0]
            basis.append(f"{e.spec.name} is busy ({e.inflight} request(s)): idle in {known[0]:.2f} s ({known[1]})")
    return seconds, [e.spec.name for e in idle + busy]


def choose(estimates: Sequence[Estimate]) -> Estimate:
    """The fastest; ties go to the server listed first."""
    best = min(estimates, key=lambda e: e.seconds)
    if not math.isfinite(best.seconds):
        raise ValueError("no server can start the model")
    return best


def ratio(measured: float, estimated: float) -> float | None:
    return round(measured / estimated, 3) if estimated > 0 else None

