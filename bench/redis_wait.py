"""What EDGE_REDIS_MIN_REPLICAS=1 costs an announcement: XADD then WAIT 1 (the edge's
``publish_replicated``) against a plain XADD (``publish``, MIN_REPLICAS=0), on a primary
with one replica of its own (loopback, so this is the floor: a replica across a network
adds its round trip). The same signed manifest fields, the same client settings as the
agent's (``shared.queue.connect``); one announcer in a row (the latency a delivery worker
sees), then EDGE_UPLOAD_CONCURRENCY=4 of them at once (the throughput of the agent's
delivery workers). The S3 sidecar PUT that precedes every XADD is the same for both and
left out: the ratio is of the Redis step alone. Medians of ``ctx.repeats`` runs, the
order of the two sides alternating."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from bench.common import Context, Figure, median, synthetic_manifest
from devstack.sentinel import FAST_SYNC
from devstack.servers import RedisServer, wait_until

WORKERS = 4  # EDGE_UPLOAD_CONCURRENCY's default


def _fields() -> dict[str, bytes]:
    from shared.manifest import sign_fields

    m = synthetic_manifest(
        0,
        "0" * 64,
        datetime.now(UTC),
        device="bench-dev",
        site="bench-site",
        camera="cam1",
        bucket="bench-raw",
        prefix="raw",
        size_bytes=4_000_000,
    )
    return sign_fields(m, "bench", b"bench-signing-secret")


async def _announce_rate(url: str, replicas: int, n: int, workers: int) -> float:
    """Announcements per second, ``workers`` announcers sharing ``n`` of them."""
    from edge_agent.publisher import publish_replicated
    from shared.queue import connect, publish

    client = connect(url, 10)
    fields = _fields()
    stream = f"bench:wait:{replicas}:{workers}"
    left = [n]

    async def announcer() -> None:
        while left[0] > 0:
            left[0] -= 1
            if replicas:
                await publish_replicated(client, stream, fields, replicas, 1.0)
            else:
                await publish(client, stream, fields)

    try:
        await publish(client, stream, fields)  # connections up before the clock starts
        t0 = time.perf_counter()
        await asyncio.gather(*(announcer() for _ in range(workers)))
        rate = n / (time.perf_counter() - t0)
        await client.delete(stream)
    finally:
        await client.aclose()
    return rate


def _replicated(ctx: Context) -> tuple[RedisServer, RedisServer]:
    import redis

    primary = RedisServer(ctx.work, extra_args=FAST_SYNC)
    primary.start()
    follow = [*FAST_SYNC, "--replicaof", "127.0.0.1", str(primary.port)]
    replica = RedisServer(ctx.work, extra_args=follow)
    replica.start()

    def online() -> bool:
        with redis.Redis(port=primary.port) as c:
            info = c.info("replication")
        return info.get("slave0", {}).get("state") == "online"

    wait_until(online, 30, "the replica in sync")
    return primary, replica


def run(ctx: Context) -> list[Figure]:
    n = 300 if ctx.quick else 3000
    primary, replica = _replicated(ctx)
    runs: dict[str, list[float]] = {k: [] for k in ("wait_1", "xadd_1", "wait_4", "xadd_4")}
    try:
        url = primary.url
        for rep in range(ctx.repeats):
            sides = [(1, "wait"), (0, "xadd")]
            if rep % 2:
                sides.reverse()
            for workers in (1, WORKERS):
                for replicas, name in sides:
                    rate = asyncio.run(_announce_rate(url, replicas, n, workers))
                    runs[f"{name}_{workers}"].append(rate)
    finally:
        replica.stop()
        primary.stop()
    one_wait, one_xadd = (1e6 / median(runs[k]) for k in ("wait_1", "xadd_1"))
    return [
        Figure(
            bench="redis_wait",
            metric="announce latency, MIN_REPLICAS=1 (XADD+WAIT) vs 0 (XADD)",
            ours=one_wait,
            baseline=one_xadd,
            unit="us/announce",
            target="reported (the price of surviving a failover)",
            met=None,
            note=f"one announcer, {n} announcements, primary + 1 replica on loopback",
            runs={k: runs[k] for k in ("wait_1", "xadd_1")},
        ),
        Figure(
            bench="redis_wait",
            metric=f"announce throughput, {WORKERS} workers, MIN_REPLICAS=1 vs 0",
            ours=median(runs[f"wait_{WORKERS}"]),
            baseline=median(runs[f"xadd_{WORKERS}"]),
            unit="items/s",
            target="reported (share of the MIN_REPLICAS=0 rate)",
            met=None,
            note=f"{WORKERS} announcers (EDGE_UPLOAD_CONCURRENCY), one client, as the agent",
            runs={k: runs[k] for k in (f"wait_{WORKERS}", f"xadd_{WORKERS}")},
        ),
    ]
