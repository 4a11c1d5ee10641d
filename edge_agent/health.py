"""Is the agent doing its job? Progress, not just a loop that runs.

systemd's watchdog (``WATCHDOG=1``) and ``/readyz`` both ask whether work moves.
Two lanes can wedge: *commit* (closed chunks waiting for their ledger row) and
*delivery* (committed chunks waiting for upload and announcement). A lane is
stalled when work waits in it, S3 and Redis have both answered for
``EDGE_DELIVERY_STALL_S``, and in that time nothing in it moved (a row
committed; body bytes sent, a chunk uploaded or announced). During an outage of
S3 or Redis nothing can move and a restart would not help, so the clock starts
only once both answer; a ledger held by another process, a worker that keeps
failing, or a bug in a loop is what must reach an operator (or systemd).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Literal

from prometheus_client import Histogram

Lane = Literal["commit", "delivery"]
LAG_PERIOD_S = 0.1


class Progress:
    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s = stall_s
        self.clock = clock
        now = clock()
        self.moved_at: dict[Lane, float] = {"commit": now, "delivery": now}
        self.deps: dict[str, bool] = {"s3": False, "redis": False}
        self.deps_ok_since: float | None = None

    def moved(self, lane: Lane) -> None:
        """Something in ``lane`` moved (thread-safe: one float store)."""
        self.moved_at[lane] = self.clock()

    def deps_seen(self, s3: bool, redis: bool) -> None:
        self.deps = {"s3": s3, "redis": redis}
        if not (s3 and redis):
            self.deps_ok_since = None
        elif self.deps_ok_since is None:
            self.deps_ok_since = self.clock()

    def stalled(self, lane: Lane, waiting: int) -> bool:
        now = self.clock()
        if waiting == 0:
            self.moved_at[lane] = now  # an idle lane is not a stalled one
            return False
        if self.deps_ok_since is None:
            return False
        return now - max(self.moved_at[lane], self.deps_ok_since) > self.stall_s


async def measure_loop_lag(histogram: Histogram, period_s: float = LAG_PERIOD_S) -> None:
    """Forever: how late the loop wakes from a ``period_s`` sleep; anything that blocks
    the loop (a ledger call, a decode, a big hash) shows up here."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(period_s)
        histogram.observe(max(0.0, loop.time() - start - period_s))
