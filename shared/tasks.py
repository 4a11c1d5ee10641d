"""Long-lived asyncio tasks, supervised.

A task that ends with an exception is never left dead and unnoticed: the crash is
logged with its traceback, counted (``on_crash``, e.g. a Prometheus counter), and
the task is started again after a jittered back-off that grows while it keeps
crashing and resets once it has run for a while. Cancellation (shutdown) is the
only way out, besides a normal return for tasks started with ``restart=False``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from shared.backoff import Backoff

# A task that ran this long before crashing starts its back-off again from the bottom.
HEALTHY_RUN_S = 30.0
STOP_TIMEOUT_S = 10.0  # how long stop() waits for cancelled tasks to finish

TaskFactory = Callable[[], Awaitable[None]]


def _cancelled_here() -> bool:
    """Is this task itself being cancelled (shutdown), rather than handed a CancelledError
    by something it awaited?"""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Supervisor:
    """Starts named tasks and keeps them running until ``stop()``."""

    def __init__(
        self,
        log: Any,
        on_crash: Callable[[str], None] | None = None,
        *,
        base_s: float = 0.5,
        cap_s: float = 30.0,
    ) -> None:
        self.log = log
        self.on_crash = on_crash
        self.base_s = base_s
        self.cap_s = cap_s
        self.crashes: Counter[str] = Counter()
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(
        self, name: str, factory: TaskFactory, *, restart_on_return: bool = False
    ) -> asyncio.Task[None]:
        """Run ``factory()`` as task ``name``; restart it when it raises (and when it
        returns, with ``restart_on_return``). The task ends only by cancellation or, without
        ``restart_on_return``, when ``factory()`` returns."""
        if name in self.tasks:
            raise ValueError(f"task {name!r} is already supervised")
        task = asyncio.create_task(self._keep(name, factory, restart_on_return), name=name)
        self.tasks[name] = task
        return task

    async def _keep(self, name: str, factory: TaskFactory, restart_on_return: bool) -> None:
        backoff = Backoff(self.base_s, self.cap_s)
        while True:
            started = time.monotonic()
            try:
                await factory()
            except asyncio.CancelledError:
                if _cancelled_here():
                    raise
                await self._crashed(name, backoff, started)  # leaked from below: a crash
                continue
            except Exception:
                await self._crashed(name, backoff, started)
                continue
            if not restart_on_return:
                return
            await asyncio.sleep(backoff.next())

    async def _crashed(self, name: str, backoff: Backoff, started: float) -> None:
        if time.monotonic() - started >= HEALTHY_RUN_S:
            backoff.reset()
        delay = backoff.next()
        self.crashes[name] += 1
        if self.on_crash is not None:
            self.on_crash(name)
        self.log.exception("task.crashed", task=name, restart_in_s=round(delay, 2))
        await asyncio.sleep(delay)

    def done(self, name: str) -> bool:
        """True once task ``name`` returned for good (never true for a crashing task)."""
        task = self.tasks.get(name)
        return task is not None and task.done()

    async def stop(self, *names: str, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Cancel the named tasks (all when none are named) and wait for them, for a while:
        a task cancelled inside a library call that never unwinds must not hold up a
        shutdown (it is logged and left behind)."""
        chosen = {n: self.tasks.pop(n) for n in (names or list(self.tasks)) if n in self.tasks}
        for task in chosen.values():
            task.cancel()
        if not chosen:
            return
        _, pending = await asyncio.wait(chosen.values(), timeout=timeout_s)
        for name, task in chosen.items():
            if task in pending:
                self.log.warning("task.stop_timeout", task=name, waited_s=timeout_s)
