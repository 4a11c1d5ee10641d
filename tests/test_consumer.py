"""The cloud consumers against real Redis, SeaweedFS and Ray: DLQ reasons and faults."""

from __future__ import annotations

import os
import signal

import ray

from edge_agent.segmenter import ClosedChunk
from shared.queue import publish
from tests.support import (
    S3,
    Edge,
    Stack,
    cloud_ingest,
    eventually,
    queue_state,
)


async def test_consumer_dead_letters_what_can_never_succeed(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    """Each hopeless manifest lands in chunks:dlq with its reason; valid ones still flow."""
    c = chunks[0]
    await edge.send(c, 0)
    await edge.send(c, 1, tamper=True)
    await edge.send(c, 2, key_id="stolen", secret="guess")
    await edge.send(c, 3, data=os.urandom(20_000))
    await edge.send(c, 4, sha256="0" * 64)
    await edge.send(c, 5, upload=False)
    await edge.send(c, 6, frame_count=31)
    await publish(edge.redis, "chunks", {"garbage": b"\x00\xff"})
    await edge.send(chunks[1], 7)
    cloud = cloud_ingest(stack, stack.workdir / "cloud.log")
    try:

        async def settled() -> bool:
            st = await queue_state(stack.redis_url)
            return st["dlq"] == 7 and st["pending"] == 0 and st["length"] == 0

        await eventually(settled, 90, "7 dead letters and an empty queue")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    st = await queue_state(stack.redis_url)
    assert sorted(st["dlq_reasons"]) == sorted(
        [
            "bad_signature",
            "unknown_key",
            "undecodable",
            "sha256_mismatch",
            "object_missing",
            "frame_count_mismatch",
            "malformed",
        ]
    )
    records = await s3.records(stack.out_bucket)
    assert sorted(r["manifest"]["seq"] for r in records) == [0, 7]
    [stopped] = cloud.events("deployment.stopped")
    assert stopped["dead_lettered"] == 7
    assert stopped["processed"] == 2


async def test_consumer_entry_redelivered_too_often_goes_to_dlq(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    """An entry that crashed its consumers INGEST_MAX_DELIVERIES times is not tried again."""
    await edge.send(chunks[0], 0)
    entry_id = (await edge.redis.xreadgroup("ingest", "crashed", {"chunks": ">"}))[0][1][0][0]
    for _ in range(2):  # deliveries 2 and 3, each to a consumer that then died
        await edge.redis.xclaim("chunks", "ingest", "crashed", 0, [entry_id])
    await edge.send(chunks[1], 1)
    cloud = cloud_ingest(stack, stack.workdir / "cloud.log", INGEST_VISIBILITY_TIMEOUT_S="3")
    try:

        async def settled() -> bool:
            st = await queue_state(stack.redis_url)
            return st["dlq"] == 1 and st["pending"] == 0 and st["length"] == 0

        await eventually(settled, 90, "the over-delivered entry in the DLQ")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    letters = await edge.redis.xrange("chunks:dlq")
    assert letters[0][1][b"reason"] == b"max_deliveries"
    assert letters[0][1][b"deliveries"] == b"4"
    assert [r["manifest"]["seq"] for r in await s3.records(stack.out_bucket)] == [1]


async def test_consumer_killed_mid_run_loses_nothing(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    """kill -9 a consumer actor mid-run: it is replaced and its entries are not lost."""
    total = 300
    for seq in range(total):
        await edge.send(chunks[seq % len(chunks)], seq)
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_VISIBILITY_TIMEOUT_S="3",
        INGEST_BATCH_SIZE="4",
        INGEST_ACTOR_CONCURRENCY="1",
    )
    try:

        async def started() -> bool:
            return len(await s3.keys(stack.out_bucket, "processed/records/")) >= 10

        await eventually(started, 90, "processing to start")
        victim = ray.get_actor("ingest-consumer-0", namespace="cloud_ingest")
        pid = ray.get(victim.pid.remote())
        os.kill(pid, signal.SIGKILL)
        done_at_kill = len(await s3.keys(stack.out_bucket, "processed/records/"))

        async def all_done() -> bool:
            return len(await s3.keys(stack.out_bucket, "processed/records/")) == total

        await eventually(all_done, 120, f"all {total} chunks processed")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    assert done_at_kill < total, "the kill landed after the work was done"
    st = await queue_state(stack.redis_url)
    assert (st["pending"], st["dlq"], st["length"]) == (0, 0, 0)
    records = await s3.records(stack.out_bucket)
    assert sorted(r["manifest"]["seq"] for r in records) == list(range(total))
    assert cloud.events("consumer.died"), "the supervisor did not notice the kill"
    [stopped] = cloud.events("deployment.stopped")
    assert stopped["restarts"] >= 1
