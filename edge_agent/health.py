"""Is the agent doing its job? Progress, not just a loop that runs.

systemd's watchdog (``WATCHDOG=1``) and ``/readyz`` both ask whether work moves.
Two lanes can wedge:

- *commit*: closed chunks waiting for their ledger row. It needs nothing but the
  ledger and the disk, so it is stalled when chunks have waited
  ``EDGE_DELIVERY_STALL_S`` without one being committed.
- *delivery*: committed chunks waiting for upload and announcement. During an
  outage of S3 or Redis nothing can move and a restart would not help, so its
  clock runs only while both work: probes answer and no upload or announcement
  has failed on them since. It is stalled when chunks wait, S3 and Redis have
  worked for ``EDGE_DELIVERY_STALL_S``, and in that time no upload or
  announcement completed and no upload was streaming its body.

What is left is what a restart (or an operator) must see: a ledger held by
another process, a worker that keeps failing, a bug in a loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Literal

from prometheus_client import Histogram

Lane = Literal["commit", "delivery"]
LAG_PERIOD_S = 0.1
STREAMING_S = 30.0  # body bytes this recent count as movement (a long, capped upload)


class Progress:
    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s = stall_s
        self.clock = clock
        self.moved_at: dict[Lane, float] = {}
        self.deps: dict[str, bool] = {"s3": False, "redis": False}
        self.deps_ok_since: float | None = None
        self.streaming = 0  # upload attempts in progress
        self.streamed_at = 0.0  # when one of them last sent body bytes
        self.restart()

    def restart(self) -> None:
        """Start both lanes' clocks now (after start-up, however long recovery took)."""
        now = self.clock()
        self.moved_at = {"commit": now, "delivery": now}

    def moved(self, lane: Lane) -> None:
        """A step in ``lane`` completed."""
        self.moved_at[lane] = self.clock()

    def streamed(self) -> None:
        """An upload attempt sent body bytes (called from aiohttp's reader threads)."""
        self.streamed_at = self.clock()

    def deps_seen(self, s3: bool, redis: bool) -> None:
        """What the probes found (every few seconds)."""
        self.deps = {"s3": s3, "redis": redis}
        if not (s3 and redis):
            self.deps_ok_since = None
        elif self.deps_ok_since is None:
            self.deps_ok_since = self.clock()

    def dep_failed(self) -> None:
        """An upload or announcement failed on S3 or Redis (one that answers a probe may
        still refuse work: a full Redis, a bucket without a writable volume)."""
        self.deps_ok_since = None

    def stalled(self, lane: Lane, waiting: int) -> bool:
        now = self.clock()
        if waiting == 0:
            self.moved_at[lane] = now  # an idle lane is not a stalled one
            return False
        since = self.moved_at[lane]
        if lane == "delivery":
            if self.deps_ok_since is None:
                return False
            if self.streaming and now - self.streamed_at < STREAMING_S:
                return False
            since = max(since, self.deps_ok_since)
        return now - since > self.stall_s


async def measure_loop_lag(histogram: Histogram, period_s: float = LAG_PERIOD_S) -> None:
    """Forever: how late the loop wakes from a ``period_s`` sleep; anything that blocks
    the loop (a ledger call, a decode, a big hash) shows up here."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(period_s)
        histogram.observe(max(0.0, loop.time() - start - period_s))
