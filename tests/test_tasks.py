"""shared.tasks.Supervisor: long-lived tasks that crash are logged, counted, restarted."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from tests.support import eventually


class Log:
    """Collects what the supervisor logs (a structlog-shaped logger)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def exception(self, event: str, **kw: Any) -> None:
        import sys

        kw["exc"] = repr(sys.exc_info()[1])
        self.lines.append((event, kw))


async def test_supervisor_restarts_a_crashing_task_and_counts_each_crash() -> None:
    from shared.tasks import Supervisor

    log, crashed, runs = Log(), [], []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) <= 2:
            raise KeyError("a bug")
        await asyncio.Event().wait()  # then it runs for good

    tasks = Supervisor(log, crashed.append, base_s=0.01, cap_s=0.05)
    task = tasks.start("flaky", flaky)

    async def third_run() -> bool:
        return len(runs) == 3

    await eventually(third_run, 5, "the third run")
    assert not task.done()
    assert crashed == ["flaky", "flaky"] and tasks.crashes["flaky"] == 2
    assert [e for e, _ in log.lines] == ["task.crashed", "task.crashed"]
    assert "KeyError" in log.lines[0][1]["exc"] and log.lines[0][1]["task"] == "flaky"
    await tasks.stop()
    assert task.cancelled() or task.done()


async def test_supervisor_treats_a_leaked_cancellation_as_a_crash_but_obeys_its_own() -> None:
    """A CancelledError raised by something the task awaited (not a cancel of the task)
    must not end a supervised task silently; stop() still ends it."""
    from shared.tasks import Supervisor

    log, runs = Log(), []

    async def leaky() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise asyncio.CancelledError  # as a library's cancelled inner future would
        await asyncio.Event().wait()

    tasks = Supervisor(log, base_s=0.01, cap_s=0.05)
    task = tasks.start("leaky", leaky)

    async def second_run() -> bool:
        return len(runs) == 2

    await eventually(second_run, 5, "a restart after the leaked cancellation")
    assert tasks.crashes["leaky"] == 1
    await tasks.stop()
    assert task.done()


async def test_supervisor_lets_a_task_that_returns_end() -> None:
    from shared.tasks import Supervisor

    done: list[int] = []

    async def once() -> None:
        done.append(1)

    tasks = Supervisor(Log())
    task = tasks.start("once", once)
    await asyncio.wait_for(task, 5)
    assert done == [1] and tasks.done("once") and not tasks.crashes


async def test_supervisor_stop_does_not_wait_for_ever_on_a_task_that_will_not_unwind() -> None:
    from shared.tasks import Supervisor

    class Warn(Log):
        def warning(self, event: str, **kw: Any) -> None:
            self.lines.append((event, kw))

    log = Warn()
    released = asyncio.Event()

    async def stubborn() -> None:
        while not released.is_set():  # swallows its cancellation, as a wedged call can
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    tasks = Supervisor(log)
    task = tasks.start("stubborn", stubborn)
    await asyncio.sleep(0)
    await asyncio.wait_for(tasks.stop(timeout_s=0.2), 5)
    assert ("task.stop_timeout", {"task": "stubborn", "waited_s": 0.2}) in log.lines
    released.set()  # let the test's loop close
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
