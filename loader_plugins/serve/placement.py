"""Where a model that is not running should start: the server with the smallest estimated startup.

For each server (ServerlessLLM's load-time-aware allocation)::

    startup = bring-up + free + queue

* **bring-up**: 0 if the model runs there; the restore time of its host snapshot if it is swapped
  out there (its resident bytes at the server's learned swap-in bandwidth, tier ``host``); else a
  cold start: the load time from the fastest tier holding the checkpoint for that server's cache
  directories (:func:`loader_plugins.cache.estimate.estimate`: DRAM, disk, S3 or local files,
  bandwidths learned from that host's loads) plus the engine's own start-up (process, model
  construction, KV cache), learned from that server's earlier cold starts;
* **free**: swap-outs of the least recently used idle models that make room under the server's
  budget, at its learned swap-out bandwidth; models busy with requests cannot be swapped out:
  each costs :data:`BUSY_PENALTY_S` (the router would wait for them);
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
from typing import TYPE_CHECKING, Any, Sequence

from ..cache.estimate import LoadHistory, bandwidth

if TYPE_CHECKING:
    from .engine import Engine

#: swap bandwidths (GB/s) and engine start-up (s) assumed before a server has measured any
DEFAULT_SWAP_IN_GBPS = 2.0
DEFAULT_SWAP_OUT_GBPS = 2.0
DEFAULT_ENGINE_S = 30.0
#: what a model that must be swapped out but is busy with requests adds to an estimate
BUSY_PENALTY_S = 300.0
#: samples of engine start-up in the median
RECENT = 5


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

    def record(self, server: str, kind: str, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.history.record(kind, nbytes, seconds, host=server)

    def seconds_for(self, server: str, kind: str, nbytes: int, default_gbps: float) -> tuple[float, str]:
        gbps, basis, n = bandwidth(kind, nbytes, self.history, host=server)
        if n == 0:
            gbps, basis = default_gbps, f"default {default_gbps} GB/s: no {kind} measured on {server}"
        return nbytes / (gbps * 1e9), basis

    def engine_seconds(self, server: str) -> tuple[float, str]:
        samples = self.history.samples("engine", host=server)[-RECENT:]
        if not samples:
            return DEFAULT_ENGINE_S, f"default {DEFAULT_ENGINE_S:.0f} s: no engine start measured on {server}"
        return (statistics.median(r["seconds"] for r in samples),
                f"median engine start-up of the last {len(samples)} cold start(s) on {server}")


def estimate_server(server: str, target: "Engine", engines: Sequence["Engine"], budget: int, history: ServerHistory,
                    *, load: dict | None, queue_s: float, now: float | None = None) -> Estimate:
    """``target``'s startup on ``server`` whose engines are ``engines`` (``target`` among them).
    ``load`` is :func:`~loader_plugins.cache.estimate.estimate` for the server's tiers (needed
    for a cold start only)."""
    from .engine import RUNNING, SWAPPED

    now = time.monotonic() if now is None else now
    basis: list[str] = []
    if target.state == RUNNING and target.alive():
        return Estimate(server, "running", "gpu", {"bring_up": 0.0, "free": 0.0, "queue": 0.0}, ["running there"])
    if target.state == SWAPPED and target.alive():
        how, tier = "swap_in", "host"
        bring_up, why = history.seconds_for(server, "host", target.resident_bytes, DEFAULT_SWAP_IN_GBPS)
        basis.append(f"restore {target.resident_bytes} bytes: {why}")
    else:
        if load is None:
            raise ValueError("a cold start needs the load estimate")
        how, tier = "cold", load["tier"]
        engine_s, why = history.engine_seconds(server)
        bring_up = load["seconds"] + engine_s
        basis.append(f"load {load['bytes']} bytes from {tier} in {load['seconds']:.3f} s ({load['basis']})")
        basis.append(f"engine {engine_s:.2f} s ({why})")
    free, evict = _free_seconds(server, target, engines, budget, history, basis)
    if queue_s > 0:
        basis.append(f"{queue_s:.2f} s of start-ups and swaps under way there")
    return Estimate(server, how, tier, {"bring_up": bring_up, "free": free, "queue": max(0.0, queue_s)}, basis, evict)


def victims(target: "Engine", engines: Sequence["Engine"], budget: int) -> tuple[list["Engine"], list["Engine"]]:
    """(idle engines to swap out, least recently used first; busy ones that would also have to
    go) for ``target`` to fit ``budget``. A model alone always fits."""
    from .engine import RUNNING, SWAPPED

    others = [e for e in engines if e is not target and e.alive() and e.state != SWAPPED]
    used = sum(e.resident_bytes for e in others)
    chosen: list[Engine] = []
    busy: list[Engine] = []
    if used + target.resident_bytes <= budget:
        return chosen, busy
    for e in sorted(others, key=lambda e: (not (e.state == RUNNING and e.inflight == 0), e.last_used)):
        (chosen if e.state == RUNNING and e.inflight == 0 else busy).append(e)
        used -= e.resident_bytes
        if used + target.resident_bytes <= budget:
            break
    return chosen, busy


def _free_seconds(server: str, target: "Engine", engines: Sequence["Engine"], budget: int, history: ServerHistory,
                  basis: list[str]) -> tuple[float, list[str]]:
    idle, busy = victims(target, engines, budget)
    seconds = 0.0
    for e in idle:
        s, why = history.seconds_for(server, "swap_out", e.resident_bytes, DEFAULT_SWAP_OUT_GBPS)
        seconds += s
        basis.append(f"swap out {e.spec.name} ({e.resident_bytes} bytes) {s:.3f} s ({why})")
    for e in busy:
        seconds += BUSY_PENALTY_S
        basis.append(f"{e.spec.name} is busy ({e.inflight} request(s), {e.state}): +{BUSY_PENALTY_S:.0f} s")
    return seconds, [e.spec.name for e in idle + busy]


def choose(estimates: Sequence[Estimate]) -> Estimate:
    """The fastest; ties go to the server listed first."""
    best = min(estimates, key=lambda e: e.seconds)
    if not math.isfinite(best.seconds):
        raise ValueError("no server can start the model")
    return best


def ratio(measured: float, estimated: float) -> float | None:
    return round(measured / estimated, 3) if estimated > 0 else None

