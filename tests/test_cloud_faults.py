"""The cloud consumers' failure paths on real parts (Redis, SeaweedFS, Ray, processes).

Hanging decodes killed for real, leases and locks that stay with their holder, objects
bigger than declared, a consumer whose environment is broken, our own bugs, drains cut
short and a supervisor whose back-off never blocks its loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from cloud_ingest.consumer import Consumer
from cloud_ingest.processor import ChunkProcessor
from cloud_ingest.supervisor import Supervisor
from devstack.proxy import HttpTap
from edge_agent.segmenter import ClosedChunk
from shared.manifest import parse_manifest
from shared.queue import Entry
from tests.support import (
    S3,
    SLOW_WORK,
    Edge,
    Stack,
    cloud_ingest,
    eventually,
    ingest_settings,
    queue_state,
    report_figures,
    slow_chunk_in,
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
