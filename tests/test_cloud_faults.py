"""The cloud consumers' failure paths on real parts (Redis, SeaweedFS, Ray, processes).

Hanging decodes killed for real, leases and locks that stay with their holder, objects
bigger than declared, a consumer whose environment is broken, our own bugs, drains cut
short and a supervisor whose back-off never blocks its loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import ray
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from cloud_ingest.consumer import Consumer, drain_budget_s
from cloud_ingest.processor import ChunkProcessor
from cloud_ingest.supervisor import Supervisor
from cloud_ingest.totals import read_totals
from devstack.proxy import HttpTap
from edge_agent.segmenter import ClosedChunk
from shared.keys import consumer_totals_key
from shared.manifest import parse_manifest, sign
from shared.queue import Acks, Entry, GroupConsumer, connect, ensure_group, publish
from tests.support import (
    KEY_ID,
    S3,
    SECRET,
    SLOW_WORK,
    Edge,
    SilentProxy,
    Stack,
    actor_stats,
    cloud_ingest,
    eventually,
    holds,
    ingest_settings,
    own_redis,
    queue_state,
    report_figures,
    slow_chunk_in,
    start_consumer,
)


@pytest.fixture(scope="session")
def slow_chunk(session_dir: Path) -> ClosedChunk:
    return slow_chunk_in(session_dir)


@pytest.fixture(scope="session")
def hanging_chunk(session_dir: Path) -> ClosedChunk:
    """60 s of video: ~9 s of media work on an idle core, far past a 1 s limit."""
    return slow_chunk_in(session_dir, 60)


def consumer_actor(name: str) -> Any:
    return ray.get_actor(f"ingest-{name}", namespace="cloud_ingest")


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def letters(edge: Edge) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in await edge.redis.xrange("chunks:dlq")]


# -- 6: hanging decodes -------------------------------------------------------------------


@pytest.mark.timeout(300)
async def test_cloud_faults_hanging_decodes_are_killed_while_valid_traffic_flows(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk], hanging_chunk: ClosedChunk
) -> None:
    """20 chunks whose media work runs about nine times past INGEST_PROCESS_TIMEOUT_S=1
    (60 s of 720p, every frame decoded and JPEG'd), sent among 30 small valid ones, to 2
    actors with 2 media workers each. Each overrun is stopped for real (its worker
    process killed and replaced), so the valid chunks keep flowing: all processed, none
    dead-lettered; the hanging ones are dead-lettered `process_timeout` with the limit
    named. (Decodes left running in threads fill the executors, and the valid chunks'
    work waits behind them past the limit.)"""
    hanging, valid = list(range(100, 120)), list(range(30))
    for i, seq in enumerate(valid):
        await edge.send(chunks[seq % len(chunks)], seq)
        if i < len(hanging):
            await edge.send(hanging_chunk, hanging[i], media_duration_s=60.0)
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_PROCESS_TIMEOUT_S="1",
        INGEST_MAX_DELIVERIES="1",
        **SLOW_WORK,
        INGEST_FILTER_RECENT_CHUNKS="0",
    )
    busy, waiting, pids = 0, 0, set()
    try:

        async def settled() -> bool:
            nonlocal busy, waiting
            for name in ("consumer-0", "consumer-1"):
                try:
                    actor = consumer_actor(name)
                    stats = await asyncio.wait_for(actor.stats.remote(), 5)
                    pids.update(await asyncio.wait_for(actor.media_pids.remote(), 5))
                except (ValueError, ray.exceptions.RayError, TimeoutError):
                    continue  # not started yet
                busy, waiting = max(busy, stats["media_busy"]), max(waiting, stats["media_waiting"])
            st = await queue_state(stack.redis_url)
            return st["pending"] == 0 and st["length"] == 0

        started = time.monotonic()
        await eventually(settled, 240, "every chunk processed or dead-lettered")
        elapsed = time.monotonic() - started
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    dead = await letters(edge)
    records = await s3.records(stack.out_bucket)
    [stopped] = cloud.events("deployment.stopped")
    figures = {
        "hanging": len(hanging),
        "valid": len(valid),
        "valid_processed": len(records),
        "dead_lettered": len(dead),
        "reasons": sorted({f[b"reason"].decode() for f in dead}),
        "process_timeouts": stopped.get("process_timeouts", 0),
        "media_worker_pids_seen": len(pids),
        "most_media_workers_busy_in_one_actor": busy,
        "settled_in_s": round(elapsed, 1),
    }
    report_figures("hanging_decodes", figures)
    assert sorted(r["manifest"]["seq"] for r in records) == valid  # none dead-lettered
    assert sorted(parse_manifest(f[b"manifest"]).seq for f in dead) == hanging
    assert {f[b"reason"] for f in dead} == {b"process_timeout"}
    assert all(b"INGEST_PROCESS_TIMEOUT_S=1s" in f[b"detail"] for f in dead)
    assert stopped["process_timeouts"] == len(hanging)
    assert len(pids) > 4  # workers were killed and replaced (2 actors x 2 at the start)
    # Bounded: each hanging chunk costs its 1 s limit, not its ~9 s of decoding (~17 s here;
    # decodes left running took 70 s).
    assert elapsed < 60


# -- 7: leases and locks ------------------------------------------------------------------


async def test_cloud_faults_lease_and_lock_stay_with_their_holder(
    stack: Stack, s3: S3, edge: Edge, slow_chunk: ClosedChunk
) -> None:
    """One slow chunk (seconds of work) announced twice, to 2 consumers, with
    INGEST_VISIBILITY_TIMEOUT_S=1 and the lock's TTL floor shortened to 1 s (TTL 2 s), both
    far shorter than the work, inside INGEST_PROCESS_TIMEOUT_S.

    1. The first copy takes the chunk's lock; the second waits for it.
    2. The test plays another consumer's reaper: it XCLAIMs the first copy's entry to
       "thief" and keeps it 2 s, renewing like a live consumer. The original consumer
       must never take it back (its renewal checks the owner); it drops its work.
    3. The second copy gets the lock and works longer than the lock's TTL: the lock is
       renewed with the lease, so when the first copy comes back from "thief" (through a
       reaper) it waits, and ends as a duplicate.
    In the end: 1 processed, 1 duplicate, nothing dead-lettered, nothing pending."""
    m = await edge.send(slow_chunk, 0, media_duration_s=20.0)
    await edge.send(slow_chunk, 0, media_duration_s=20.0)  # the same manifest announced twice
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_VISIBILITY_TIMEOUT_S="1",
        INGEST_LOCK_TTL_MIN_S="1",
        INGEST_PROCESS_TIMEOUT_S="120",
        **SLOW_WORK,
    )
    lock = f"ingest:lock:{m.chunk_id}"
    held: dict[bytes, list[float]] = {}  # lock holder -> [first seen, last seen]

    async def holder() -> bytes | None:
        value: bytes | None = await edge.redis.get(lock)
        if value is not None:
            held.setdefault(value, [time.monotonic()] * 2)[1] = time.monotonic()
        return value

    try:
        await eventually(lambda: _not_none(holder()), 90, "the first copy to take the lock")
        entry_id, original = next(iter(held)).split(b"/", 1)
        await edge.redis.xclaim("chunks", "ingest", "thief", 0, [entry_id], justid=True)
        owners = []
        until = time.monotonic() + 2.0
        while time.monotonic() < until:  # six of the original consumer's renew periods
            await asyncio.sleep(0.3)
            await holder()
            rows = await edge.redis.xpending_range("chunks", "ingest", entry_id, entry_id, 1)
            owners.append(rows[0]["consumer"] if rows else None)
            await edge.redis.xclaim("chunks", "ingest", "thief", 0, [entry_id], justid=True)

        async def settled() -> bool:
            await holder()
            st = await queue_state(stack.redis_url)
            return (
                st["pending"] == 0
                and st["length"] == 0
                and st["dlq"] == 0
                and bool(await s3.records(stack.out_bucket))
            )

        await eventually(settled, 120, "the chunk processed and both entries acknowledged")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    longest = max(last - first_seen for first_seen, last in held.values())
    [stopped] = cloud.events("deployment.stopped")
    state = await queue_state(stack.redis_url)
    report_figures(
        "lease_and_lock",
        {
            "owners_after_the_steal": sorted({str(o) for o in owners}),
            "lock_holders": len(held),
            "longest_hold_s": round(longest, 2),
            "lock_ttl_s": 2.0,
            "processed": stopped.get("processed", 0),
            "duplicate": stopped.get("duplicate", 0),
            "leases_lost": stopped.get("leases_lost", 0),
            "lock_waits": stopped.get("lock_waits", 0),
        },
    )
    assert set(owners) == {b"thief"}, f"taken back by {original!r}: {owners}"
    assert (stopped["processed"], stopped["duplicate"]) == (1, 1)
    assert (state["dlq"], state["pending"], state["length"]) == (0, 0, 0)
    assert longest > 2.2  # a holder kept the lock past its 2 s TTL: renewed while working
    assert stopped["leases_lost"] >= 1
    [record] = await s3.records(stack.out_bucket)
    assert record["chunk_id"] == m.chunk_id


async def _not_none(value: Any) -> bool:
    return (await value) is not None


# -- 8: objects bigger than declared -----------------------------------------------------


async def test_cloud_faults_oversized_object_refused_before_its_body_is_read(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    """A 48 MiB object announced as 1 MB (a compromised box), next to a valid chunk, with a
    tap between the consumer and S3: dead-lettered `size_mismatch` from its Content-Length,
    and what the consumer received over the wire stays far below the object's size."""
    big = os.urandom(48 * 1024 * 1024)
    m = await edge.send(chunks[0], 0, data=big, size_bytes=1_000_000)
    await edge.send(chunks[1], 1)
    with HttpTap(stack.s3_endpoint) as tap:
        cloud = cloud_ingest(
            stack, stack.workdir / "cloud.log", INGEST_S3_ENDPOINT_URL=tap.url, INGEST_CONSUMERS="1"
        )
        try:

            async def settled() -> bool:
                st = await queue_state(stack.redis_url)
                return st["dlq"] == 1 and st["pending"] == 0 and st["length"] == 0

            await eventually(settled, 90, "the oversized chunk dead-lettered")
            assert cloud.terminate() == 0
        finally:
            cloud.kill()
        received = tap.received
        gets = [r for r in tap.snapshot() if r.method == "GET" and r.path.endswith(m.key)]
    [letter] = await letters(edge)
    report_figures(
        "oversized_object",
        {"object_bytes": len(big), "declared": 1_000_000, "bytes_received": received},
    )
    assert letter[b"reason"] == b"size_mismatch"
    assert str(len(big)).encode() in letter[b"detail"]
    assert len(gets) == 1
    assert received < len(big) // 4  # what socket buffers held: the body was never read
    assert [r["manifest"]["seq"] for r in await s3.records(stack.out_bucket)] == [1]


# -- 10: broken environments and our own bugs --------------------------------------------

NO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "",
    "AWS_SECRET_ACCESS_KEY": "",
    "AWS_SESSION_TOKEN": "",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
    "AWS_CONFIG_FILE": "/nonexistent/config",
    "AWS_EC2_METADATA_DISABLED": "true",
}


async def test_cloud_faults_consumer_without_credentials_pauses_and_hands_over(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    """A consumer actor whose environment has no S3 credentials (as on a Ray node set up
    without them) takes the first entries. Every chunk fails on S3; its probe of its own
    access (HeadBucket) fails too, so it pauses, reports it, and gives the entries back
    without counting the attempt. A healthy deployment started next to it processes
    everything, each chunk on its first counted delivery; nothing is dead-lettered.
    Killed with SIGKILL, the paused actor leaves none of its media workers running."""
    total = 20
    settings = ingest_settings(stack, visibility_timeout_s=2)
    bad = (
        ray.remote(Consumer)
        .options(num_cpus=0.25, max_concurrency=64, runtime_env={"env_vars": NO_CREDENTIALS})
        .remote(settings, "consumer-nocreds")
    )
    run = bad.run.remote()
    for seq in range(total):
        await edge.send(chunks[seq % len(chunks)], seq)
    cloud = None
    try:

        async def bad_took_some() -> bool:
            stats = await bad.stats.remote()
            return bool(stats["paused"] or stats.get("failed_attempts", 0))

        await eventually(bad_took_some, 60, "the consumer without credentials to fail")
        cloud = cloud_ingest(stack, stack.workdir / "cloud.log", INGEST_CONSUMERS="1")

        async def settled() -> bool:
            st = await queue_state(stack.redis_url)
            return st["pending"] == 0 and st["length"] == 0

        await eventually(settled, 120, "every chunk processed or dead-lettered")
        stats = await bad.stats.remote()
        media = await bad.media_pids.remote()
        os.kill(await bad.pid.remote(), signal.SIGKILL)

        async def workers_gone() -> bool:
            return not any(alive(p) for p in media)

        await eventually(workers_gone, 30, "the killed actor's media workers to die with it")
        assert cloud.terminate() == 0
    finally:
        if cloud is not None:
            cloud.kill()
        ray.kill(bad)
    state = await queue_state(stack.redis_url)
    records = await s3.records(stack.out_bucket)
    report_figures(
        "consumer_without_credentials",
        {
            "chunks": total,
            "processed": len(records),
            "dlq": state["dlq"],
            "taken_and_given_back": stats.get("released", 0),
            "its_failed_attempts": stats.get("failed_attempts", 0),
            "paused": stats["paused"],
            "media_workers_left": sum(alive(p) for p in media),
        },
    )
    with pytest.raises(ray.exceptions.RayActorError):
        await run
    assert state["dlq"] == 0, state["dlq_reasons"]
    assert sorted(r["manifest"]["seq"] for r in records) == list(range(total))
    assert {r["consumer"] for r in records} == {"consumer-0"}
    assert stats["paused"] == 1 and stats.get("failed_attempts", 0) == 0
    assert stats["released"] >= 1  # it did take entries, and gave them back
    assert {r["deliveries"] for r in records} == {1}  # the given-back attempt was not counted
    assert media and not any(alive(p) for p in media)


async def test_cloud_faults_our_own_bug_is_dead_lettered_as_internal_error(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    """A bug planted in the processor (a TypeError for seq 3), run as a real actor on real
    Redis and S3: that chunk fails INGEST_MAX_DELIVERIES (3) attempts, counted as internal
    errors, and is dead-lettered `internal_error` with the exception type, so a fixed
    deployment can `dlq requeue --reason internal_error`; the others flow."""

    class PlantedBug(ChunkProcessor):
        async def process(self, entry: Entry, slot: Any) -> Any:
            if parse_manifest(entry.fields[b"manifest"]).seq == 3:
                raise TypeError("planted bug for seq 3")
            return await ChunkProcessor.process(self, entry, slot)

    class BuggyConsumer(Consumer):
        processor_class = PlantedBug

    settings = ingest_settings(stack, visibility_timeout_s=1, max_deliveries=3)
    actor = (
        ray.remote(BuggyConsumer)
        .options(num_cpus=0.25, max_concurrency=64)
        .remote(settings, "consumer-buggy")
    )
    for seq in range(6):
        await edge.send(chunks[seq % len(chunks)], seq)
    run = actor.run.remote()
    try:

        async def settled() -> bool:
            st = await queue_state(stack.redis_url)
            return st["dlq"] == 1 and st["pending"] == 0 and st["length"] == 0

        await eventually(settled, 90, "the bugged chunk dead-lettered, the rest processed")
        await actor.stop.remote()
        result = await run
    finally:
        ray.kill(actor)
    [letter] = await letters(edge)
    report_figures(
        "internal_error",
        {
            "reason": letter[b"reason"].decode(),
            "detail": letter[b"detail"].decode()[:80],
            "internal_errors": result.get("internal_errors", 0),
        },
    )
    assert letter[b"reason"] == b"internal_error"
    assert letter[b"detail"].startswith(b"TypeError: planted bug for seq 3")
    assert letter[b"deliveries"] == b"3"
    assert parse_manifest(letter[b"manifest"]).seq == 3
    assert result["internal_errors"] == 3 and result["failed_attempts"] == 3
    assert result.get("rejected_max_deliveries", 0) == 0
    records = await s3.records(stack.out_bucket)
    assert sorted(r["manifest"]["seq"] for r in records) == [0, 1, 2, 4, 5]


# -- 12: drains and the supervisor --------------------------------------------------------


async def test_cloud_faults_drain_cut_short_exits_non_zero_and_the_next_deployment_finishes(
    stack: Stack, s3: S3, edge: Edge, slow_chunk: ClosedChunk
) -> None:
    """SIGTERM while a slow chunk is at work, with INGEST_DRAIN_TIMEOUT_S=1: the drain
    cancels the work (its media worker killed), leaves the entry pending, says so and exits
    non-zero. A new deployment finishes the chunk, and the cut-off attempt was not counted
    against it."""
    m = await edge.send(slow_chunk, 0, media_duration_s=20.0)
    env = {
        "INGEST_CONSUMERS": "1",
        **SLOW_WORK,
    }
    first = cloud_ingest(stack, stack.workdir / "first.log", INGEST_DRAIN_TIMEOUT_S="1", **env)
    try:

        async def at_work() -> bool:
            try:
                stats = await consumer_actor("consumer-0").stats.remote()
            except (ValueError, ray.exceptions.RayError):
                return False
            return bool(stats["media_busy"])

        await eventually(at_work, 90, "the slow chunk's media work to start")
        code = await asyncio.to_thread(first.terminate)
    finally:
        first.kill()
    [incomplete] = first.events("deployment.drain_incomplete")
    left = await queue_state(stack.redis_url)
    second = cloud_ingest(stack, stack.workdir / "second.log", **env)
    try:

        async def done() -> bool:
            st = await queue_state(stack.redis_url)
            return st["pending"] == 0 and bool(await s3.records(stack.out_bucket))

        await eventually(done, 120, "the next deployment to finish the chunk")
        assert second.terminate() == 0
    finally:
        second.kill()
    state = await queue_state(stack.redis_url)
    [record] = await s3.records(stack.out_bucket)
    report_figures(
        "drain_cut_short",
        {"exit_code": code, "abandoned": incomplete["abandoned_entries"], "left": left},
    )
    assert code != 0
    assert incomplete["abandoned_entries"] == 1
    assert (left["pending"], left["dlq"]) == (1, 0)  # left pending, nothing lost
    assert record["chunk_id"] == m.chunk_id and record["deliveries"] == 1
    assert (state["dlq"], state["pending"], state["length"]) == (0, 0, 0)


async def test_cloud_faults_supervisor_backoff_never_blocks_its_loop(stack: Stack) -> None:
    """A consumer whose run() fails at once, over and over: the supervisor restarts it with
    a growing back-off (8-16 s after the fourth restart), yet a stop is noticed within a
    second or so, not after the back-off."""

    class FailingRun(Consumer):
        async def run(self) -> dict[str, int]:
            raise RuntimeError("planted: run() fails at once")

    settings = ingest_settings(stack, group="ingest-backoff", consumers=1, actor_cpus=0.25)
    supervisor = Supervisor(settings, FailingRun)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(supervisor.serve()), daemon=True)
    thread.start()
    try:

        async def backing_off() -> bool:  # the fifth run failed: the next back-off is 8-16 s
            return supervisor.restarts >= 4 and not supervisor.runs

        await eventually(backing_off, 60, "four restarts of the failing run, then a failure")
        asked = time.monotonic()
        supervisor.stopping.set()
        await asyncio.to_thread(thread.join, 30)
        stopped_in = time.monotonic() - asked
    finally:
        supervisor.stopping.set()
        for actor in supervisor.actors.values():
            ray.kill(actor)
    report_figures(
        "supervisor_backoff",
        {"restarts": supervisor.restarts, "stopped_in_s": round(stopped_in, 2)},
    )
    assert result == [0]
    assert stopped_in < 3.0


async def test_cloud_faults_a_media_worker_killed_mid_chunk_fails_only_that_attempt(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk], slow_chunk: ClosedChunk
) -> None:
    """SIGKILL every media worker of the actor (as the OOM killer would) while one works on
    a slow chunk: that attempt fails (the worker died), the chunk is processed on its next
    delivery; a chunk sent afterwards gets fresh workers and is processed on its first."""
    slow = await edge.send(slow_chunk, 0, media_duration_s=20.0)
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_CONSUMERS="1",
        INGEST_VISIBILITY_TIMEOUT_S="2",
        **SLOW_WORK,
    )
    try:

        async def at_work() -> bool:
            try:
                return bool((await consumer_actor("consumer-0").stats.remote())["media_busy"])
            except (ValueError, ray.exceptions.RayError):
                return False

        await eventually(at_work, 90, "the slow chunk's media work to start")
        killed = await consumer_actor("consumer-0").media_pids.remote()
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        small = await edge.send(chunks[0], 1)

        async def settled() -> bool:
            st = await queue_state(stack.redis_url)
            return st["pending"] == 0 and len(await s3.records(stack.out_bucket)) == 2

        await eventually(settled, 120, "both chunks processed")
        after = await consumer_actor("consumer-0").media_pids.remote()
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    records = {r["chunk_id"]: r for r in await s3.records(stack.out_bucket)}
    [stopped] = cloud.events("deployment.stopped")
    retried = [e for e in cloud.events("chunk.retry_later") if "killed by SIGKILL" in e["error"]]
    report_figures(
        "media_worker_killed",
        {
            "killed": len(killed),
            "failed_attempts": stopped.get("failed_attempts", 0),
            "slow_deliveries": records[slow.chunk_id]["deliveries"],
            "small_deliveries": records[small.chunk_id]["deliveries"],
        },
    )
    assert (await queue_state(stack.redis_url))["dlq"] == 0
    assert stopped["failed_attempts"] == 1 and len(retried) == 1
    assert records[slow.chunk_id]["deliveries"] == 2
    assert records[small.chunk_id]["deliveries"] == 1
    assert not set(after) & set(killed)


# -- review of items 6-12: faults a PING cannot see, stops, counters, dead actors ----------


async def _paused(actor: Any) -> bool:
    return (await actor_stats(actor)).get("paused") == 1


async def _processed(s3: S3, stack: Stack, n: int) -> bool:
    return len(await s3.records(stack.out_bucket)) == n


async def _drained(url: str) -> bool:
    st = await queue_state(url)
    return (st["length"], st["pending"]) == (0, 0)


@dataclass
class OwnQueue:
    """A redis-server of the test's own (for a test that reconfigures or flushes it): the
    stack pointing at it, a client, an Edge announcing there; ``state`` is the queue's
    state once the block has ended."""

    stack: Stack
    url: str
    client: aioredis.Redis
    edge: Edge
    state: dict[str, Any] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def own_queue(stack: Stack, s3: S3, tmp_path: Path) -> AsyncIterator[OwnQueue]:
    with own_redis(tmp_path) as server:
        own = replace(stack, redis_url=server.url)
        client = aioredis.from_url(server.url)
        await ensure_group(client, "chunks", "ingest")
        queue = OwnQueue(own, server.url, client, Edge(own, s3, client))
        try:
            yield queue
        finally:
            queue.state = await queue_state(server.url)
            await client.aclose()


async def test_cloud_faults_redis_refusing_writes_pauses_and_dead_letters_nothing(
    stack: Stack, s3: S3, chunks: list[ClosedChunk], tmp_path: Path
) -> None:
    """A Redis that answers PING but refuses every write (`maxmemory` below what it holds,
    noeviction: OOM), set in the same transaction that announces 6 chunks to a running
    consumer. Each chunk needs a write (its camera's owner, its lock) and so does the
    probe's canary (`SET ingest:probe:… PX`): the consumer pauses, uncounted, holds
    nothing back from the others and stays in that one pause while Redis refuses; nothing
    is dead-lettered, no attempt is counted. With its memory back (`maxmemory 0`) it
    resumes and processes every chunk, each on its first counted delivery. (A probe that
    only PINGs counted every attempt, and the DLQ took every chunk as `max_deliveries`
    once memory was freed.)"""
    async with own_queue(stack, s3, tmp_path) as queue:
        client, edge = queue.client, queue.edge
        settings = ingest_settings(
            queue.stack, visibility_timeout_s=2, max_deliveries=2, pause_max_s=2
        )
        actor = start_consumer(settings, "consumer-oom")
        run = actor.run.remote()
        try:
            await edge.send(chunks[0], 0)
            await eventually(lambda: _processed(s3, stack, 1), 60, "the first chunk processed")
            async with client.pipeline(transaction=True) as pipe:
                for seq in range(1, 7):
                    m = await edge.send(chunks[seq % len(chunks)], seq, announce=False)
                    pipe.xadd("chunks", sign(m, KEY_ID, SECRET.encode()).to_fields())  # type: ignore[arg-type]
                pipe.config_set("maxmemory", "1")
                await pipe.execute()
            refused_at = time.monotonic()
            await eventually(lambda: _paused(actor), 30, "the consumer to pause")
            paused_in = time.monotonic() - refused_at

            async def still_sound() -> bool:
                stats = await actor_stats(actor)
                dlq = await client.xlen("chunks:dlq")
                return stats.get("paused") == 1 and not stats.get("failed_attempts") and not dlq

            await holds(still_sound, 5, "paused, no attempt counted, nothing dead-lettered")
            during = await actor_stats(actor)
            await client.config_set("maxmemory", "0")
            freed_at = time.monotonic()
            await eventually(lambda: _processed(s3, stack, 7), 60, "every chunk processed")
            resumed_in = time.monotonic() - freed_at
            after = await actor_stats(actor)
            await actor.stop.remote()
            await run
        finally:
            ray.kill(actor)
            await client.config_set("maxmemory", "0")
    state = queue.state
    records = await s3.records(stack.out_bucket)
    report_figures(
        "redis_refusing_writes",
        {
            "chunks": 7,
            "paused_in_s": round(paused_in, 2),
            "released_while_paused": during.get("released", 0),
            "pauses": after.get("pauses", 0),
            "failed_attempts": after.get("failed_attempts", 0),
            "resumed_and_done_in_s": round(resumed_in, 2),
            "dlq": state["dlq"],
        },
    )
    assert (state["dlq"], state["pending"], state["length"]) == (0, 0, 0)
    assert sorted(r["manifest"]["seq"] for r in records) == list(range(7))
    assert {r["deliveries"] for r in records} == {1}  # the refused attempts were not counted
    assert after.get("failed_attempts", 0) == 0
    # One pause, held while Redis refused writes: the canary write kept the probe failing
    # (a PING-only probe resumed every back-off and the next chunk paused it again).
    assert during["pauses"] == 1 and after["pauses"] == 1


async def test_cloud_faults_lost_consumer_group_is_created_again(
    stack: Stack, s3: S3, chunks: list[ClosedChunk], tmp_path: Path
) -> None:
    """The stream and its group vanish under a running consumer (FLUSHALL, as a Redis
    restarted without persistence leaves it; later XGROUP DESTROY): every group command
    answers NOGROUP. The consumer creates the group again, from the stream's start, counts
    and logs it, and the chunks announced meanwhile are processed. (It used to log
    `queue.unavailable` for ever, its readiness green.)"""
    async with own_queue(stack, s3, tmp_path) as queue:
        client, edge = queue.client, queue.edge
        settings = ingest_settings(queue.stack, visibility_timeout_s=2)
        actor = start_consumer(settings, "consumer-nogroup")
        run = actor.run.remote()
        try:
            await edge.send(chunks[0], 0)
            await eventually(lambda: _processed(s3, stack, 1), 60, "the first chunk processed")
            await client.flushall()  # stream, group, totals: all gone
            for seq in (1, 2):
                await edge.send(chunks[seq], seq)  # XADD makes a stream with no group
            await eventually(lambda: _processed(s3, stack, 3), 30, "the chunks after FLUSHALL")
            await edge.send(chunks[0], 3)
            await client.xgroup_destroy("chunks", "ingest")
            await eventually(lambda: _processed(s3, stack, 4), 30, "the chunk around DESTROY")
            await eventually(lambda: _drained(queue.url), 30, "every entry acknowledged")
            stats = await actor_stats(actor)
            await actor.stop.remote()
            await run
        finally:
            ray.kill(actor)
    state = queue.state
    report_figures(
        "lost_consumer_group",
        {"groups_recreated": stats.get("groups_recreated", 0), "dlq": state["dlq"]},
    )
    assert stats["groups_recreated"] == 2
    assert state["dlq"] == 0
    assert sorted(r["manifest"]["seq"] for r in await s3.records(stack.out_bucket)) == [0, 1, 2, 3]


async def test_cloud_faults_missing_raw_bucket_pauses_and_dead_letters_nothing(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    """INGEST_RAW_BUCKET names a bucket that does not exist (a typo, a bucket deleted or not
    yet created), and 6 manifests name it. GetObject answers NoSuchBucket: not the chunks'
    problem, so the probe decides (HeadBucket fails) and the consumer pauses; nothing is
    dead-lettered, no attempt counted. Once the bucket and its objects exist, every chunk
    is processed. (NoSuchBucket was read as "no such object": 6 of 6 dead-lettered
    `object_missing` at once.)"""
    missing = f"{stack.raw_bucket}-missing"
    elsewhere = replace(stack, raw_bucket=missing)
    sender = Edge(elsewhere, s3, edge.redis)
    sent = [await sender.send(chunks[s % len(chunks)], s, upload=False) for s in range(6)]
    settings = ingest_settings(elsewhere, visibility_timeout_s=2, max_deliveries=2, pause_max_s=2)
    actor = start_consumer(settings, "consumer-nobucket")
    run = actor.run.remote()
    try:
        await eventually(lambda: _paused(actor), 60, "the consumer to pause")

        async def still_sound() -> bool:
            stats = await actor_stats(actor)
            return (
                stats.get("paused") == 1
                and not stats.get("failed_attempts")
                and not await edge.redis.xlen("chunks:dlq")
            )

        await holds(still_sound, 4, "paused, no attempt counted, nothing dead-lettered")
        await s3.client.create_bucket(Bucket=missing)
        for m in sent:
            await s3.put(missing, m.key, chunks[m.seq % len(chunks)].path.read_bytes())

        done = len(sent)
        await eventually(lambda: _processed(s3, stack, done), 60, "every chunk, bucket made")
        stats = await actor_stats(actor)
        await actor.stop.remote()
        await run
    finally:
        ray.kill(actor)
    state = await queue_state(stack.redis_url)
    report_figures(
        "missing_raw_bucket",
        {"chunks": len(sent), "dlq": state["dlq"], "pauses": stats.get("pauses", 0)},
    )
    assert (state["dlq"], state["pending"], state["length"]) == (0, 0, 0)
    assert stats.get("failed_attempts", 0) == 0 and stats["pauses"] >= 1


async def test_cloud_faults_stop_is_noticed_with_slow_chunks_in_every_slot(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    """INGEST_BATCH_SIZE=4 over INGEST_ACTOR_CONCURRENCY=2: two chunks processed, then four
    slow ones fill the batch, two of them at work in both slots. stop() (what SIGTERM does)
    is noticed at once although no chunk finishes: the two not at work go back, the two at
    work get INGEST_DRAIN_TIMEOUT_S=1 and are then cancelled and left pending; run()
    returns within a few seconds with the finished chunks acknowledged. (The loop waited
    for one of the batch to finish, up to INGEST_PROCESS_TIMEOUT_S, past any deadline.)"""

    class HeldInSlot(ChunkProcessor):
        """Chunks with seq >= 100 hold their slot for an hour (slow work in every slot)."""

        async def process(self, entry: Entry, slot: Any) -> Any:
            if parse_manifest(entry.fields[b"manifest"]).seq >= 100:
                async with slot:
                    await asyncio.sleep(3600)
            return await ChunkProcessor.process(self, entry, slot)

    class HoldingConsumer(Consumer):
        processor_class = HeldInSlot

    settings = ingest_settings(
        stack, batch_size=4, actor_concurrency=2, drain_timeout_s=1, close_grace_s=1
    )
    actor = start_consumer(settings, "consumer-held", HoldingConsumer)
    run = actor.run.remote()
    try:
        for seq in (0, 1):
            await edge.send(chunks[seq], seq)

        async def finished() -> bool:
            return len(await s3.records(stack.out_bucket)) == 2

        await eventually(finished, 60, "the first two chunks processed")
        for seq in range(100, 104):
            await edge.send(chunks[seq % len(chunks)], seq)

        async def full() -> bool:
            stats = await actor_stats(actor)
            return stats.get("in_flight") == 4 and stats.get("working") == 2

        await eventually(full, 30, "the batch full, both slots at work")
        asked = time.monotonic()
        await actor.stop.remote()
        result = await asyncio.wait_for(run, 20)
        stopped_in = time.monotonic() - asked
    finally:
        ray.kill(actor)
    state = await queue_state(stack.redis_url)
    pending = await edge.redis.xpending_range("chunks", "ingest", "-", "+", 10)
    report_figures(
        "stop_with_full_batch",
        {"stopped_in_s": round(stopped_in, 2), "abandoned": result["abandoned"]},
    )
    assert stopped_in < 5.0  # drain timeout 1 s plus the graces actually used
    assert result["abandoned"] == 2 and result["released"] == 4
    assert (state["length"], state["pending"], state["dlq"]) == (4, 4, 0)  # finished: acked
    assert {int(p["times_delivered"]) for p in pending} == {0}  # given back uncounted


async def test_cloud_faults_ack_of_an_entry_no_longer_ours_is_not_counted(
    redis_url: str,
) -> None:
    """On a real Redis, the consumer's ack script: of two entries read by consumer-0, the
    reaper has given one to consumer-1. consumer-0's flush acknowledges only its own and
    counts only its outcome (its general counts once); sent again with the same token (a
    reply lost, redis-py re-sending), nothing is counted twice; consumer-1, finding the
    other chunk done, counts it a duplicate: processed + duplicate == acknowledged. A
    dead letter is counted by the script that moves it."""
    client = aioredis.from_url(redis_url)
    try:
        await ensure_group(client, "chunks", "ingest")
        for n in range(3):
            await publish(client, "chunks", {"n": str(n).encode()})
        mine = GroupConsumer(client, "chunks", "ingest", "consumer-0")
        first, second, third = await mine.read(3, None)
        await client.xclaim("chunks", "ingest", "consumer-1", 0, [first.id], justid=True)
        outcome = ("processed", "verdict_accepted", "media_ms_accepted=2000")
        batch = Acks(
            {first.id: outcome, second.id: outcome}, {"reclaimed": 1}, {"download": 0.5}, "r:0"
        )
        assert await mine.ack(batch) == 1 and batch.acked == [second.id]
        counted = await read_totals(client, "ingest")
        resent = Acks(dict(batch.entries), dict(batch.counts), dict(batch.seconds), batch.token)
        assert await mine.ack(resent) == 0 and resent.applied_before
        theirs = GroupConsumer(client, "chunks", "ingest", "consumer-1")
        assert await theirs.ack(Acks({first.id: ("duplicate",)}, token="t:0")) == 1
        assert await mine.dead_letter(third, "bad_signature", "planted")
        totals = await read_totals(client, "ingest")
        left = await client.xlen("chunks")
    finally:
        await client.aclose()
    expected = {
        "processed": 1.0,
        "verdict_accepted": 1.0,
        "media_ms_accepted": 2000.0,  # "name=N" adds N
        "reclaimed": 1.0,
    }
    assert counted == (expected, {"download": 0.5})
    assert totals[0] == {
        **expected,
        "duplicate": 1.0,
        "dead_lettered": 1.0,
        "rejected_bad_signature": 1.0,
    }
    assert totals[1] == {"download": 0.5}
    assert left == 0


def test_cloud_faults_a_counted_amount_is_one_count_in_the_run_not_a_name_per_chunk(
    stack: Stack,
) -> None:
    """Each processed chunk's acknowledgement brings ``media_ms_<verdict>=<ms>``: the
    run's tally adds the amounts under one name (a name per chunk would grow stats(),
    which the supervisor reads every second, without bound)."""
    from cloud_ingest.consumer import Consumer

    consumer = Consumer(ingest_settings(stack), "consumer-tally")
    names = {
        b"1-0": ("processed", "media_ms_accepted=2000"),
        b"2-0": ("processed", "media_ms_accepted=1500"),
        b"3-0": ("processed", "media_ms_dark=700"),
    }
    batch = Acks(names, token="t:1")
    batch.acked = list(names)
    consumer._settle(batch)
    assert consumer.tally.run == {"processed": 3, "media_ms_accepted": 3500, "media_ms_dark": 700}


async def test_cloud_faults_redis_gone_silent_is_left_for_a_new_connection(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    """The consumer reaches Redis through a proxy whose open connections go silent (no
    reset, no bytes: a peer that vanished) while it runs, INGEST_REDIS_TIMEOUT_S=2. Its
    calls time out, it connects again and the chunks announced afterwards are processed.
    (Without timeouts a consumer waited on the dead connection for ever: redis-py before 7,
    which `redis>=5.0` allows, has none by default; 7 and later default to 5 s.)"""
    port = int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])
    with SilentProxy("127.0.0.1", port) as proxy:
        settings = ingest_settings(stack, redis_url=proxy.url, redis_timeout_s=2)
        actor = start_consumer(settings, "consumer-silenced")
        run = actor.run.remote()
        try:
            await edge.send(chunks[0], 0)

            await eventually(lambda: _processed(s3, stack, 1), 60, "the first chunk processed")
            silenced = proxy.go_silent()
            since = time.monotonic()
            for seq in (1, 2):
                await edge.send(chunks[seq], seq)
            await eventually(lambda: _processed(s3, stack, 3), 30, "the chunks after the silence")
            recovered_in = time.monotonic() - since
            await actor.stop.remote()
            await asyncio.wait_for(run, 30)
        finally:
            ray.kill(actor)
    report_figures(
        "redis_gone_silent",
        {"connections_silenced": silenced, "recovered_in_s": round(recovered_in, 2)},
    )
    assert silenced >= 1
    assert (await queue_state(stack.redis_url))["pending"] == 0


async def test_cloud_faults_a_silent_redis_call_ends_within_the_redis_timeout(
    stack: Stack,
) -> None:
    """The bound itself: a call on a connection gone silent fails after the client's own
    timeout (1 s here), well before redis-py's default 5 s (which the consumer would wait
    without ``INGEST_REDIS_TIMEOUT_S``, and for ever on redis-py < 7). It is not re-sent
    on its own (redis-py's default retries would: a read whose reply was lost, re-sent,
    leaves what the first one delivered unseen); the next call gets a new connection."""
    port = int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])
    with SilentProxy("127.0.0.1", port) as proxy:
        client = connect(proxy.url, 1.0)
        try:
            assert await client.ping()
            assert proxy.go_silent() == 1
            since = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await client.ping()
            failed_in = time.monotonic() - since
            assert await client.ping()  # on a new connection
        finally:
            await client.aclose()
    report_figures("silent_redis_call", {"timeout_s": 1.0, "failed_in_s": round(failed_in, 2)})
    assert 1.0 <= failed_in < 4.0


async def test_cloud_faults_supervisor_backs_off_an_actor_dead_for_good(stack: Stack) -> None:
    """The deployment's actor is killed for good (no restart): every run() on it fails at
    once. The supervisor tries again after a growing back-off, not in a loop as fast as
    Ray answers."""
    settings = ingest_settings(stack, group="ingest-dead", consumers=1, actor_cpus=0.25)
    supervisor = Supervisor(settings)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(supervisor.serve()), daemon=True)
    thread.start()
    try:

        async def running() -> bool:
            actor = supervisor.actors.get(0)
            return actor is not None and bool(await actor_stats(actor))

        await eventually(running, 60, "the actor to run")
        ray.kill(supervisor.actors[0], no_restart=True)

        async def restarted() -> bool:
            return supervisor.restarts >= 1

        await eventually(restarted, 30, "the supervisor to see the death")

        async def calm() -> bool:
            return supervisor.restarts <= 4

        await holds(calm, 5, "at most a few restarts in 5 s")
        restarts = supervisor.restarts
    finally:
        supervisor.stopping.set()
        await asyncio.to_thread(thread.join, 60)
    report_figures("actor_dead_for_good", {"restarts_in_5_s": restarts})
    assert restarts <= 4


async def test_cloud_faults_supervisor_waits_for_the_actors_whole_drain(
    stack: Stack, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    """An actor whose drain uses most stages' full share, all its slow parts ignoring their
    cancellation (as a cancelled redis-py command may): the drain loop's wait on a full
    batch, a chunk waiting for the slot, one at work and the windows loop
    (INGEST_REDIS_TIMEOUT_S=2, INGEST_DRAIN_TIMEOUT_S=1, INGEST_CLOSE_GRACE_S=1: about 8 s).
    The supervisor's deadline is the sum of the very stages the actor holds itself to, so
    it gets the run's result (both stuck entries counted abandoned) instead of giving up
    on a run about to return (its old deadline: the drain timeout plus three graces, 4 s
    here)."""

    async def ignore_cancellation() -> None:
        while True:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    class StuckProcessor(ChunkProcessor):
        async def process(self, entry: Entry, slot: Any) -> Any:
            if parse_manifest(entry.fields[b"manifest"]).seq == 100:  # never gets the slot
                await ignore_cancellation()
            async with slot:
                await ignore_cancellation()
            raise AssertionError("unreachable")

    class StuckDrain(Consumer):
        processor_class = StuckProcessor

        async def _until_a_chunk_ends(self) -> None:
            await ignore_cancellation()

        async def _windows(self, redis: Any, handoff: Any) -> None:
            await ignore_cancellation()

    settings = ingest_settings(
        stack,
        consumers=1,
        actor_cpus=0.25,
        batch_size=2,
        actor_concurrency=1,
        redis_timeout_s=2,
        drain_timeout_s=1,
        close_grace_s=1,
    )
    supervisor = Supervisor(settings, StuckDrain)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(supervisor.serve()), daemon=True)
    thread.start()
    try:
        for seq in (101, 100):
            await edge.send(chunks[seq % len(chunks)], seq)

        async def both_held() -> bool:
            actor = supervisor.actors.get(0)
            stats = await actor_stats(actor) if actor is not None else {}
            return stats.get("in_flight") == 2 and stats.get("working") == 1

        await eventually(both_held, 60, "one chunk at work, one waiting for the slot")
        asked = time.monotonic()
        supervisor.stopping.set()
        await asyncio.to_thread(thread.join, 90)
        drained_in = time.monotonic() - asked
    finally:
        supervisor.stopping.set()
        for actor in supervisor.actors.values():
            ray.kill(actor)
    report_figures(
        "supervisor_drain_deadline",
        {
            "drained_in_s": round(drained_in, 2),
            "budget_s": drain_budget_s(settings),
            "unfinished": len(supervisor.runs),
        },
    )
    assert result == [1]  # the abandoned entries make the drain incomplete, as they should
    assert supervisor.runs == {}  # but the run itself returned, and was waited for
    assert supervisor.totals["abandoned"] == 2
    assert drained_in < drain_budget_s(settings) + Supervisor.RAY_LATENCY_S


async def test_cloud_faults_a_flush_redis_refuses_pauses_instead_of_blocking_every_flush(
    stack: Stack, s3: S3, chunks: list[ClosedChunk], tmp_path: Path
) -> None:
    """The consumer's totals hash is a key of another type (written by hand, by another
    tool): the acknowledgement script fails with WRONGTYPE after its first XACK. The
    consumer drops that flush (counted, `acks_refused`) and pauses, and its probe, which
    looks at the totals hash too, keeps it paused: nothing is dead-lettered. Once the key
    is deleted it resumes and every chunk ends acknowledged. (The refused flush was sent
    again for ever, ahead of every later one: nothing more was acknowledged, no pause.)"""
    async with own_queue(stack, s3, tmp_path) as queue:
        client = queue.client
        totals = consumer_totals_key("ingest", "consumer-wrongtype")
        await client.set(totals, "not a hash")
        settings = ingest_settings(queue.stack, visibility_timeout_s=2, pause_max_s=2)
        actor = start_consumer(settings, "consumer-wrongtype")
        run = actor.run.remote()
        try:
            for seq in range(3):
                await queue.edge.send(chunks[seq], seq)
            await eventually(lambda: _paused(actor), 60, "the consumer to pause")

            async def still_paused() -> bool:
                return await _paused(actor) and not await client.xlen("chunks:dlq")

            await holds(still_paused, 4, "paused while the totals key is of another type")
            during = await actor_stats(actor)
            await client.delete(totals)

            async def drained() -> bool:
                return await _drained(queue.url) and not await _paused(actor)

            await eventually(drained, 60, "every entry acknowledged once the key is gone")
            after = await actor_stats(actor)
            await actor.stop.remote()
            await run
        finally:
            ray.kill(actor)
    state = queue.state
    report_figures(
        "flush_refused",
        {
            "acks_refused": during.get("acks_refused", 0),
            "pauses": after.get("pauses", 0),
            "dlq": state["dlq"],
        },
    )
    assert during["acks_refused"] >= 1
    assert state["dlq"] == 0
    assert sorted(r["manifest"]["seq"] for r in await s3.records(stack.out_bucket)) == [0, 1, 2]
