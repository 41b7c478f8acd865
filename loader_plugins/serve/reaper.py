"""The idle reaper: a model without a request for ``idle_timeout`` seconds is swapped out (its
engine process stays alive, its weights in host memory)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Callable, Iterable

from .engine import Engine, EngineError, EngineState

if TYPE_CHECKING:
    from .scheduler import Scheduler

log = logging.getLogger(__name__)


class IdleReaper:
    """A task that looks at every engine ``engines()`` lists a few times per ``idle_timeout``."""

    def __init__(self, engines: Callable[[], Iterable[Engine]], scheduler: "Scheduler", idle_timeout: float):
        self.engines = engines
        self.scheduler = scheduler
        self.idle_timeout = idle_timeout
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        period = min(1.0, self.idle_timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for engine in self.engines():
                if engine.state != EngineState.RUNNING or engine.inflight \
                        or now - engine.last_used < self.idle_timeout:
                    continue
                try:
                    await self.scheduler.swap_out(engine, f"after {now - engine.last_used:.0f} s idle")
                except EngineError:
                    log.exception("idle swap-out of %s on %s failed; its engine is now %s", engine.spec.name,
                                  engine.server.name, engine.state)
