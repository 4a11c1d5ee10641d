"""The Redis Streams queue on a real redis-server."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from shared.queue import GroupConsumer, ReapCursor, ensure_group, publish


async def setup(url: str, n: int) -> aioredis.Redis:
    client = aioredis.from_url(url)
    await ensure_group(client, "s", "g")
    for i in range(n):
        await publish(client, "s", {"n": str(i).encode()})
    return client


async def test_queue_ensure_group_is_idempotent(redis_url: str) -> None:
    client = await setup(redis_url, 0)
    await ensure_group(client, "s", "g")
    assert len(await client.xinfo_groups("s")) == 1
    await client.aclose()


async def test_queue_ack_deletes_entries_so_memory_stays_bounded(redis_url: str) -> None:
    client = await setup(redis_url, 5)
    c = GroupConsumer(client, "s", "g", "c1")
    entries = await c.read(10, 100)
    assert [e.fields[b"n"] for e in entries] == [str(i).encode() for i in range(5)]
    await c.ack([e.id for e in entries])
    assert await client.xlen("s") == 0
    assert (await client.xpending("s", "g"))["pending"] == 0
    await client.aclose()


async def test_queue_restarted_consumer_reads_own_pending_first(redis_url: str) -> None:
    client = await setup(redis_url, 3)
    first = GroupConsumer(client, "s", "g", "c1")
    taken = await first.read(2, 100)
    again = GroupConsumer(client, "s", "g", "c1")  # same name, fresh process
    resumed = await again.read(10, 100)
    assert [e.id for e in resumed] == [e.id for e in taken]
    assert all(e.deliveries == 2 for e in resumed)
    new = await again.read(10, 100)
    assert [e.fields[b"n"] for e in new] == [b"2"]
    await client.aclose()


async def test_queue_reaper_claims_idle_entries_and_counts_deliveries(redis_url: str) -> None:
    client = await setup(redis_url, 2)
    dead = GroupConsumer(client, "s", "g", "dead")
    await dead.read(10, 100)
    live = GroupConsumer(client, "s", "g", "live")
    cursor = ReapCursor()
    assert await live.claim_stale(cursor, 500, 10) == []  # not idle long enough yet
    await asyncio.sleep(0.6)
    claimed = await live.claim_stale(cursor, 500, 10)
    assert len(claimed) == 2
    assert all(e.deliveries == 2 for e in claimed)
    pending = await client.xpending_range("s", "g", "-", "+", 10)
    assert {p["consumer"] for p in pending} == {b"live"}
    await client.aclose()


async def test_queue_lease_renewal_keeps_entries_from_the_reaper(redis_url: str) -> None:
    client = await setup(redis_url, 1)
    worker = GroupConsumer(client, "s", "g", "worker")
    [entry] = await worker.read(1, 100)
    await asyncio.sleep(0.4)
    await worker.renew([entry.id])
    await asyncio.sleep(0.3)
    other = GroupConsumer(client, "s", "g", "other")
    assert await other.claim_stale(ReapCursor(), 500, 10) == []
    pending = await client.xpending_range("s", "g", "-", "+", 10)
    assert pending[0]["times_delivered"] == 1  # renewal is not a delivery
    await client.aclose()


async def test_queue_dead_letter_moves_entry_with_reason(redis_url: str) -> None:
    client = await setup(redis_url, 1)
    c = GroupConsumer(client, "s", "g", "c1")
    [entry] = await c.read(1, 100)
    await c.dead_letter(entry, "bad_signature", "HMAC mismatch")
    assert await client.xlen("s") == 0
    assert (await client.xpending("s", "g"))["pending"] == 0
    [(_, letter)] = await client.xrange("s:dlq")
    assert letter[b"reason"] == b"bad_signature"
    assert letter[b"n"] == b"0"
    assert letter[b"source_id"] == entry.id
    await client.aclose()
