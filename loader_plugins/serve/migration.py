"""Token-based live migration of streaming completions (ServerlessLLM).

The router relays a streaming ``/v1/completions`` request event by event, asking the engine
for token ids (``return_token_ids``) so that it knows the prompt's tokens and every token
generated so far. To move the request to another engine of the same model, the router sends
the destination a new request whose prompt is those tokens (prompt + generated: its prefill
recomputes the KV cache) for the tokens still to come, and keeps relaying the source meanwhile.
When the destination's first token arrives it has caught up: the source request is cancelled
(its connection closed, which vLLM aborts), and the destination's tokens are relayed after the
ones the source already produced (those the destination repeats are skipped). The client sees
one stream: the same id, no gap, no duplicate.

Migratable: one completion (``n`` 1) with a single prompt, no ``echo``, no ``stop`` strings, no
logprobs, no ``best_of`` (their bookkeeping does not survive a new prompt). Other requests finish
where they are.

:class:`Migrations` keeps the router's movable streams per engine and the moves made: a move on
request, a busy model's streams moved off a server that must make room, and from the moves'
measured prefill rates the estimate of when a busy model is idle (for placement).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import httpx

if TYPE_CHECKING:
    from .engine import Engine
    from .metrics import Metrics

log = logging.getLogger(__name__)

#: what vLLM fills in for a completion without max_tokens
DEFAULT_MAX_TOKENS = 16
#: the latest moves of a model whose prefill rate estimates the next
RECENT_MOVES = 5


def not_migratable(body: dict[str, Any]) -> str | None:
    """Why a completion request cannot be migrated (None when it can)."""
    if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1):
        return "n or best_of > 1"
    if body.get("echo"):
        return "echo"
    if body.get("stop"):
        return "stop strings"
    if body.get("logprobs") is not None or body.get("prompt_logprobs") is not None:
        return "logprobs"
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        return "several prompts"
    return None


class Flight:
    """One streaming completion in flight on ``engine``; :meth:`move` asks for it to continue on
    another engine."""

    def __init__(self, body: dict[str, Any], engine: "Engine"):
        self.body = body
        self.engine = engine
        self.wants_ids = bool(body.get("return_token_ids"))
        self.prompt_ids: list[int] | None = None
        self.out_ids: list[int] = []
        self.id: str | None = None
        self.created: int | None = None
        self.target: Engine | None = None
        self.moved = asyncio.Event()        # set when the stream switched (or the move was given up)
        self.report: dict[str, Any] | None = None
        self._first: tuple[float, int] | None = None    # (time, tokens) at its first generated token
        self._last: tuple[float, int] | None = None     # and at its latest

    def generated(self, ids: list[int]) -> None:
        """Tokens came from the engine serving it: keep them, and when, for its decode rate."""
        self.out_ids += ids
        if ids:
            mark = (time.monotonic(), len(self.out_ids))
            self._first = self._first or mark
            self._last = mark

    @property
    def tokens(self) -> int:
        """What a move sends the destination to prefill: the prompt and every token so far."""
        return len(self.prompt_ids or ()) + len(self.out_ids)

    def remaining_seconds(self) -> float | None:
        """Time to its end at its own decode rate so far (tokens left of ``max_tokens``); None
        before it has a rate (two tokens apart in time)."""
        if self._first is None or self._last is None or self._last[0] <= self._first[0]:
            return None
        rate = (self._last[1] - self._first[1]) / (self._last[0] - self._first[0])
        left = (self.body.get("max_tokens") or DEFAULT_MAX_TOKENS) - len(self.out_ids)
        return max(0, left) / rate if rate > 0 else None

    def move(self, target: "Engine") -> None:
        self.target = target

    def upstream_body(self) -> dict[str, Any]:
        return {**self.body, "return_token_ids": True}

    def continuation(self) -> dict[str, Any]:
        """The destination's request: every token so far as the prompt, the rest to generate."""
        done = len(self.out_ids)
        body = {k: v for k, v in self.body.items() if k not in ("prompt", "max_tokens", "min_tokens")}
        body["prompt"] = list(self.prompt_ids or []) + self.out_ids
        body["max_tokens"] = (self.body.get("max_tokens") or DEFAULT_MAX_TOKENS) - done
        if self.body.get("min_tokens"):
            body["min_tokens"] = max(0, int(self.body["min_tokens"]) - done)
        body["return_token_ids"] = True
        return body

    def outgoing(self, chunk: dict[str, Any], *, source: bool) -> bytes:
        """The chunk as the client gets it: the stream's id, token ids only if asked for, usage
        counted against the original prompt."""
        if self.id is None:
            self.id, self.created = chunk.get("id"), chunk.get("created")
        chunk["id"] = self.id
        if self.created is not None:
            chunk["created"] = self.created
        for choice in chunk.get("choices") or ():
            if not source or not self.wants_ids:
                choice.pop("prompt_token_ids", None)
            if not self.wants_ids:
                choice.pop("token_ids", None)
        usage = chunk.get("usage")
        if usage and not source and self.prompt_ids is not None:
            usage["prompt_tokens"] = len(self.prompt_ids)
            usage["completion_tokens"] = len(self.out_ids)
            usage["total_tokens"] = len(self.prompt_ids) + len(self.out_ids)
        return f"data: {json.dumps(chunk)}\n\n".encode()


async def _events(response: httpx.Response) -> AsyncIterator[dict[str, Any] | None]:
    """Parsed ``data:`` events of a server-sent-event stream; None for ``[DONE]``."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        yield None if data == "[DONE]" else json.loads(data)


def _ids(chunk: dict[str, Any]) -> list[int]:
    choices = chunk.get("choices") or ()
    return list(choices[0].get("token_ids") or ()) if choices else []


async def relay(flight: Flight, client: httpx.AsyncClient, upstream: httpx.Response, *, on_switch,
                on_abandon) -> AsyncIterator[bytes]:
    """Relay ``upstream`` (the source engine's stream) to the client, switching to
    ``flight.target`` once one is set and has caught up. ``on_switch(flight, report)`` runs when
    the destination takes over; ``on_abandon(flight, reason)`` when a requested move is given up
    (the source finished first, or the destination failed): the source goes on."""
    loop = asyncio.get_running_loop()
    src_queue: asyncio.Queue = asyncio.Queue()
    src_task = loop.create_task(_pump(upstream, src_queue))
    dest_task: asyncio.Task | None = None
    dest_queue: asyncio.Queue = asyncio.Queue()
    next_src: asyncio.Task | None = None
    next_dest: asyncio.Task | None = None
    first: Any = None
    snapshot, asked_at = 0, 0.0
    switched = False
    try:
        while True:
            # wait for whichever comes first: the source's next event, or the destination's first
            if next_src is None:
                next_src = loop.create_task(src_queue.get())
            if dest_task is not None and next_dest is None:
                next_dest = loop.create_task(dest_queue.get())
            done, _ = await asyncio.wait([t for t in (next_src, next_dest) if t is not None],
                                         return_when=asyncio.FIRST_COMPLETED)
            if next_dest is not None and next_dest in done:
                first, next_dest = next_dest.result(), None
                if isinstance(first, BaseException):
                    on_abandon(flight, f"the destination failed: {first}")
                    dest_task = None
                    continue
                switched = True
                break         # the destination has caught up: switch
            chunk, next_src = next_src.result(), None
            if isinstance(chunk, BaseException):
                raise chunk
            if chunk is None:
                break
            choices = chunk.get("choices") or ()
            if choices and flight.prompt_ids is None and choices[0].get("prompt_token_ids") is not None:
                flight.prompt_ids = list(choices[0]["prompt_token_ids"])
            flight.generated(_ids(chunk))
            yield flight.outgoing(chunk, source=True)
            if "error" in chunk or (choices and choices[0].get("finish_reason")):
                continue      # the end (usage chunk, [DONE]) follows
            if flight.target is not None and dest_task is None and flight.prompt_ids is not None:
                snapshot, asked_at = len(flight.out_ids), time.monotonic()
                dest_task = loop.create_task(
                    _open_destination(client, flight.target, flight.continuation(), dest_queue))
        if not switched:
            if dest_task is not None:
                dest_task.cancel()
                on_abandon(flight, "the request finished on its source first")
            yield b"data: [DONE]\n\n"
            return
    except BaseException:
        if dest_task is not None:
            dest_task.cancel()
            on_abandon(flight, "the source failed")
        raise
    finally:
        for task in (next_src, next_dest, src_task):
            if task is not None and not task.done():
                task.cancel()
    # ---- the switch: cancel the source, go on from the destination ----
    with contextlib.suppress(asyncio.CancelledError):
        await src_task
    await upstream.aclose()
    skip = len(flight.out_ids) - snapshot     # tokens the source produced after the snapshot
    on_switch(flight, {"from": flight.engine.server.name, "to": flight.target.server.name,
                       "tokens_moved": snapshot, "prompt_tokens": len(flight.prompt_ids or ()),
                       "catch_up_seconds": round(time.monotonic() - asked_at, 4), "repeated": skip})
    mismatch = False
    item = first
    while item is not None:
        if isinstance(item, BaseException):
            raise item
        ids = _ids(item)
        choices = item.get("choices") or ()
        if skip > 0 and ids:
            n = min(skip, len(ids))
            done = len(flight.out_ids)
            if ids[:n] != flight.out_ids[done - skip:done - skip + n]:
                mismatch = True
            skip -= n
            if n == len(ids) and not choices[0].get("finish_reason"):
                item = await dest_queue.get()
                continue      # the source already relayed these tokens
            # vLLM streams a token per chunk; a chunk only partly repeated keeps its text whole
            choices[0]["token_ids"] = ids[n:]
            if n == len(ids):
                choices[0]["text"] = ""
            ids = ids[n:]
        flight.generated(ids)
        yield flight.outgoing(item, source=False)
        item = await dest_queue.get()
    if mismatch:
        log.warning("migrated request %s: the destination repeated other tokens than the source produced "
                    "(sampling rather than greedy decoding?); the client has the source's", flight.id)
    yield b"data: [DONE]\n\n"


async def _pump(response: httpx.Response, queue: asyncio.Queue) -> None:
    """The source's events into ``queue`` (then None; the exception object if reading fails)."""
    try:
        async for chunk in _events(response):
            await queue.put(chunk)
            if chunk is None:
                return
        # closed cleanly but unfinished (an engine stopped with its node): a failed read, not an end
        await queue.put(httpx.RemoteProtocolError("the engine's stream ended before its [DONE]"))
    except asyncio.CancelledError:
        raise
    except BaseException as exc:   # noqa: BLE001 - handed to the relay
        await queue.put(exc)


async def _open_destination(client: httpx.AsyncClient, engine: "Engine", body: dict[str, Any],
                            queue: asyncio.Queue) -> None:
    """Stream the continuation from ``engine`` into ``queue`` (chunks, then None; an exception
    object if it fails)."""
    try:
        request = client.build_request("POST", engine.base_url + "/v1/completions", json=body,
                                       headers=engine.headers)
        response = await client.send(request, stream=True)
        try:
            if response.status_code != 200:
                raise RuntimeError(f"the destination answered HTTP {response.status_code}: "
                                   f"{(await response.aread())[:300]!r}")
            async for chunk in _events(response):
                await queue.put(chunk)
                if chunk is None:
                    return
            await queue.put(None)
        finally:
            await response.aclose()
    except asyncio.CancelledError:
        raise
    except BaseException as exc:   # noqa: BLE001 - handed to the relay
        await queue.put(exc)



class Migrations:
    """The streams in flight that can move, per engine, and the moves made (:attr:`history`).
    ``running(model, exclude)`` finds the model's least busy running engine but ``exclude``;
    ``release(engine)`` ends a request's hold on an engine."""

    def __init__(self, running: "Callable[[str, Engine | None], Engine | None]",
                 release: "Callable[[Engine], None]", metrics: "Metrics"):
        self.running = running
        self.release = release
        self.metrics = metrics
        self.flights: dict[int, set[Flight]] = {}      # id(engine) -> its movable streams in flight
        self.history: collections.deque[dict] = collections.deque(maxlen=200)

    def track(self, body: dict[str, Any], engine: "Engine", path: str) -> Flight | None:
        """The request's flight on ``engine`` when it is a stream that can move (else None)."""
        if not (body.get("stream") and path == "/v1/completions" and not_migratable(body) is None):
            return None
        flight = Flight(body, engine)
        self.flights.setdefault(id(engine), set()).add(flight)
        return flight

    def untrack(self, flight: Flight) -> None:
        self.flights.get(id(flight.engine), set()).discard(flight)

    def streams(self, engine: "Engine") -> list[Flight]:
        """The streams in flight on ``engine`` that no move is asked of yet."""
        return [f for f in self.flights.get(id(engine), set()) if f.target is None]

    def busy_estimate(self, engine: "Engine") -> tuple[float, str] | None:
        """Seconds until busy ``engine`` is idle, as making room would get it there: its streams
        moved to the model's engine on another server (when every request is a stream that can
        move, and a move of this model has been measured), else waited for (each stream's tokens
        left at its own decode rate). None when some request's end cannot be estimated."""
        flights = self.streams(engine)
        if not flights or len(flights) != engine.inflight:
            return None
        target = self.running(engine.spec.name, engine)
        rate = self._catch_up_rate(engine.spec.name)
        if target is not None and rate is not None:
            tokens = sum(f.tokens for f in flights)
            return (tokens / rate[0], f"move {len(flights)} stream(s), {tokens} tokens, to {target.server.name} at "
                                      f"{rate[0]:.0f} tokens/s of prefill ({rate[1]} earlier move(s) of it)")
        left = [f.remaining_seconds() for f in flights]
        if any(s is None for s in left):
            return None
        return max(left), f"wait for {len(flights)} stream(s) to end at their own decode rates"

    def _catch_up_rate(self, model: str) -> tuple[float, int] | None:
        """Tokens per second the destinations of this model's latest moves prefilled (tokens sent
        over the time to the destination's first token), and how many moves that is."""
        moves = [m for m in self.history if m["model"] == model and m.get("catch_up_seconds")][-RECENT_MOVES:]
        seconds = sum(m["catch_up_seconds"] for m in moves)
        if not moves or seconds <= 0:
            return None
        return sum(m["prompt_tokens"] + m["tokens_moved"] for m in moves) / seconds, len(moves)

    def finish(self, flight: Flight | None, engine: "Engine") -> None:
        """A request ended: release the engine that served it last."""
        if flight is None:
            self.release(engine)
            return
        self.untrack(flight)
        if flight.target is not None and not flight.moved.is_set():   # a move still pending: never happens
            self.abandoned(flight, "the request ended")
        self.release(flight.engine)

    def switched(self, flight: Flight, report: dict) -> None:
        """The destination took over (``on_switch`` of :func:`relay`)."""
        source, target = flight.engine, flight.target
        self.untrack(flight)
        self.flights.setdefault(id(target), set()).add(flight)
        flight.engine, flight.target = target, None
        self.release(source)                  # the target counted the flight when the move was asked
        flight.report = report
        self.history.append({"model": source.spec.name, "at": time.time(), **report})
        self.metrics.operations.labels(source.spec.name, report["from"], "migrate").observe(
            report["catch_up_seconds"])
        log.info("migrated a request of %s from %s to %s: %d prompt + %d generated tokens sent, caught up in "
                 "%.3f s (%d token(s) the source produced meanwhile not repeated)", source.spec.name, report["from"],
                 report["to"], report["prompt_tokens"], report["tokens_moved"], report["catch_up_seconds"],
                 report["repeated"])
        flight.moved.set()

    def abandoned(self, flight: Flight, reason: str) -> None:
        """A move was given up (``on_abandon`` of :func:`relay`): the source goes on."""
        target = flight.target
        if target is not None:
            flight.target = None
            self.release(target)
        flight.report = {"abandoned": reason}
        log.info("a move of a %s request from %s was given up: %s", flight.engine.spec.name,
                 flight.engine.server.name, reason)
        flight.moved.set()

    async def move(self, flights: list[Flight], target: "Engine", timeout: float) -> list[dict]:
        """Ask each flight to continue on ``target``; wait for the switches (or give up after
        ``timeout``). Returns each move's report."""
        for flight in flights:
            if flight not in self.flights.get(id(flight.engine), set()):   # it ended while the target came up
                flight.report = {"abandoned": "the request ended before it could move"}
                flight.moved.set()
                continue
            target.inflight += 1
            flight.moved.clear()
            flight.move(target)
        try:
            await asyncio.wait_for(asyncio.gather(*(f.moved.wait() for f in flights)), timeout)
        except asyncio.TimeoutError:
            for f in flights:
                if not f.moved.is_set():
                    self.abandoned(f, f"no switch within {timeout:.0f} s")
        return [f.report or {} for f in flights]

    async def migrate_away(self, busy: "list[Engine]", engine: "Engine", timeout: float) -> bool:
        """Make one busy model idle by moving its streams to its engine on another server (only
        when every request it serves can move, and it runs elsewhere), for ``engine`` to fit.
        True if one moved."""
        for victim in busy:
            flights = self.streams(victim)
            target = self.running(victim.spec.name, victim)
            if target is None or not flights or len(flights) != victim.inflight:
                continue
            log.info("moving %d request(s) of %s off %s to make room for %s", len(flights), victim.spec.name,
                     victim.server.name, engine.spec.name)
            reports = await self.move(flights, target, timeout)
            if any("abandoned" not in r for r in reports):
                return True
        return False
