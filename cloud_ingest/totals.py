"""Chunk outcome counts and stage seconds that survive actor restarts and kills.

Each consumer counts in memory (``Tally``: this run's totals, for ``run()``'s return
and the deployment's last log line) and adds its counts to its own Redis hash
(``HINCRBY`` / ``HINCRBYFLOAT``) in the script that acknowledges its entries
(``shared.queue.ACK_SCRIPT``): each entry's own counts (processed, duplicate, its
verdict) only if the entry was still this consumer's, the others once per flush token,
so a chunk is counted exactly when it is acknowledged, kill, lost lease or lost reply
notwithstanding. A dead letter is counted by the script that moves it. The sums only
ever grow: what the metrics observer exports from them is a real counter, whatever
happens to the actors.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import redis.asyncio as aioredis

from shared.keys import consumer_totals_key, consumers_key

Increments = tuple[Counter[str], dict[str, float]]

# Counts named by these prefixes are exported as their own metrics (cloud_ingest.metrics).
MEDIA_MS = "media_ms_"  # + verdict: milliseconds of footage processed with that verdict
WINDOWS_CLOSED = "windows_closed:"  # + site:closed_because: scene windows closed


def windows_closed(site: str, closed_because: str) -> str:
    return f"{WINDOWS_CLOSED}{site}:{closed_because}"


class Tally:
    def __init__(self) -> None:
        self.run: Counter[str] = Counter()  # this run's counts
        self.seconds: dict[str, float] = {}  # this run's seconds per stage
        self._counts: Counter[str] = Counter()  # not yet in Redis
        self._seconds: dict[str, float] = {}

    def inc(self, name: str, n: int = 1) -> None:
        """Count for this run and, with the next flush, in Redis."""
        self.run[name] += n
        self._counts[name] += n

    def note(self, name: str, n: int = 1) -> None:
        """Count for this run only: a script has counted it in Redis already."""
        self.run[name] += n

    def spent(self, stage: str, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:  # HINCRBYFLOAT would refuse the flush
            return
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds

    def take(self) -> Increments:
        """The increments not yet in Redis (now the caller's to write)."""
        taken = (self._counts, self._seconds)
        self._counts, self._seconds = Counter(), {}
        return taken


async def read_totals(
    redis: aioredis.Redis, group: str
) -> tuple[dict[str, float], dict[str, float]]:
    """(counts, seconds) summed over every consumer that ever kept totals for ``group``."""
    names: Any = await redis.smembers(consumers_key(group))
    counts: dict[str, float] = {}
    seconds: dict[str, float] = {}
    async with redis.pipeline(transaction=False) as pipe:
        for name in sorted(names):
            pipe.hgetall(consumer_totals_key(group, name.decode()))
        hashes = await pipe.execute()
    for fields in hashes:
        for field, value in fields.items():
            kind, _, name = field.decode().partition(":")
            target = counts if kind == "count" else seconds
            target[name] = target.get(name, 0.0) + float(value)
    return counts, seconds
