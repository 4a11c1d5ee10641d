"""The Redis Streams queue on a real redis-server."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from cloud_ingest.totals import Tally
from shared.keys import consumer_totals_key
from shared.queue import Acks, GroupConsumer, ReapCursor, connect, ensure_group, publish
from tests.support import SilentProxy


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


async def test_queue_entries_delivered_by_a_lost_reply_are_read_next(redis_url: str) -> None:
    """XREADGROUP runs on the server but its reply never comes (a connection that died
    mid-answer): the 3 entries it delivered are in this consumer's pending list, unseen.
    The call times out; the next read finds them among the consumer's own pending entries
    at once, with their one delivery, and leaves alone the entry the consumer is working on
    (not returned, no delivery counted) and one it gave back before (older than the lost
    call). (It read only new entries: the 3 waited for the reaper, a visibility timeout
    later, with a delivery counted that never was.)"""
    direct = aioredis.from_url(redis_url)
    await ensure_group(direct, "lost-reply", "g")
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with SilentProxy("127.0.0.1", port) as proxy:
        client = connect(proxy.url, 1.0)
        try:
            consumer = GroupConsumer(client, "lost-reply", "g", "c1")
            await publish(direct, "lost-reply", {"n": b"at work"})
            await publish(direct, "lost-reply", {"n": b"given back"})
            at_work, given_back = await consumer.read(10, None)
            assert await consumer.release([given_back]) == 1
            for i in range(3):
                await publish(direct, "lost-reply", {"n": str(i).encode()})
            assert proxy.lose_replies() >= 1
            with pytest.raises(RedisTimeoutError):
                await consumer.read(10, None)
            assert (await direct.xpending("lost-reply", "g"))["pending"] == 5
            again = await consumer.read(10, None, working={at_work.id})
        finally:
            await client.aclose()
    assert [e.fields[b"n"] for e in again] == [b"0", b"1", b"2"]
    assert [e.deliveries for e in again] == [1, 1, 1]
    rows = await direct.xpending_range("lost-reply", "g", "-", "+", 10)
    assert {r["message_id"]: r["times_delivered"] for r in rows}[at_work.id] == 1
    await direct.aclose()


async def test_queue_a_stage_time_that_is_not_a_number_never_reaches_the_flush(
    redis_url: str,
) -> None:
    """A stage time that is not a finite number (NaN from a division by a zero duration) is
    left out of the totals: HINCRBYFLOAT refuses it, and by then the script has already
    acknowledged the batch's entries (a script is not rolled back), so the batch, sent
    again and again, would add its counts each time and hold up every later flush."""
    client = aioredis.from_url(redis_url)
    await ensure_group(client, "nan-stage", "g")
    await publish(client, "nan-stage", {"n": b"0"})
    consumer = GroupConsumer(client, "nan-stage", "g", "c1")
    [entry] = await consumer.read(10, None)
    tally = Tally()
    tally.inc("reclaimed")
    tally.spent("download", float("nan"))
    tally.spent("download", 0.5)
    counts, seconds = tally.take()
    batch = Acks({entry.id: ("processed",)}, dict(counts), seconds, "run:0")
    assert await consumer.ack(batch) == 1
    totals = await client.hgetall(consumer_totals_key("g", "c1"))
    assert totals == {
        b"count:processed": b"1",
        b"count:reclaimed": b"1",
        b"seconds:download": b"0.5",
    }
    await client.aclose()


async def test_queue_an_ack_of_entries_only_sent_again_is_known_as_applied(
    redis_url: str,
) -> None:
    """A flush that carries only acknowledgements (duplicates: their counts are the
    entries' own, no batch counts) is applied but its reply is lost, and it is sent again
    as it was. The second send is known as applied before (its token), so the consumer
    does not take its entries, acknowledged by the first, for leases it lost."""
    client = aioredis.from_url(redis_url)
    await ensure_group(client, "entries-only", "g")
    await publish(client, "entries-only", {"n": b"0"})
    consumer = GroupConsumer(client, "entries-only", "g", "c1")
    [entry] = await consumer.read(10, None)
    first = Acks({entry.id: ("duplicate",)}, token="run:7")
    assert await consumer.ack(first) == 1 and not first.applied_before
    again = Acks({entry.id: ("duplicate",)}, token="run:7")
    assert await consumer.ack(again) == 0
    assert again.applied_before
    assert await client.hgetall(consumer_totals_key("g", "c1")) == {b"count:duplicate": b"1"}
    await client.aclose()
