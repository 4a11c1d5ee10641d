"""The queue under fire: 2,000 manifests of real chunks, actor kills and a Redis restart.

Pass (Jepsen's queue checker): lost = 0, unexpected = 0; duplicates counted and harmless.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import pytest
import ray
import redis.asyncio as aioredis

from devstack.servers import RedisServer, SeaweedS3
from edge_agent.segmenter import ClosedChunk
from shared.queue import ensure_group
from tests.support import S3, Edge, Stack, cloud_ingest, eventually, queue_state, report_figures

TOTAL = 2000
KILLS = 10


async def _kill_a_consumer(rng: random.Random) -> str:
    """SIGKILL a live consumer actor's process. One still restarting from the last kill
    answers ActorUnavailableError: ask again until it (or its twin) is back."""
    deadline = time.monotonic() + 120
    while True:
        name = f"consumer-{rng.randrange(2)}"
        try:
            actor = ray.get_actor(f"ingest-{name}", namespace="cloud_ingest")
            pid = await asyncio.wait_for(actor.pid.remote(), 60)
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError, ValueError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1)
            continue
        os.kill(int(pid), signal.SIGKILL)
        return name


@pytest.mark.timeout(900)
async def test_queue_faults_2000_manifests_ten_kills_and_a_redis_restart(
    s3: S3, s3_server: SeaweedS3, ray_address: str, chunks: list[ClosedChunk], tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path, aof=True)  # appendfsync always
    redis.start()
    raw, out = f"raw-q-{os.getpid()}", f"out-q-{os.getpid()}"
    for bucket in (raw, out):
        await s3.client.create_bucket(Bucket=bucket)
    stack = Stack(redis.url, s3_server.endpoint, ray_address, raw, out, tmp_path)
    client = aioredis.from_url(redis.url)
    await ensure_group(client, "chunks", "ingest")
    edge = Edge(stack, s3, client)
    sent = []
    for start in range(0, TOTAL, 50):
        sent += await asyncio.gather(
            *(
                edge.send(chunks[seq % len(chunks)], seq, camera_id=f"cam{seq % 40}")
                for seq in range(start, min(TOTAL, start + 50))
            )
        )
    expected = {m.chunk_id for m in sent}
    assert len(expected) == TOTAL

    # The kills are not the chunks' fault: a high INGEST_MAX_DELIVERIES keeps poison
    # detection (tested on its own) out of this test.
    cloud = cloud_ingest(
        stack,
        tmp_path / "cloud.log",
        INGEST_MAX_DELIVERIES="50",
        INGEST_VISIBILITY_TIMEOUT_S="3",
        INGEST_FILTER_RECENT_CHUNKS="0",
        INGEST_SAMPLE_FPS="1",
        INGEST_RESIZE_SHORT_SIDE="64",
    )
    rng = random.Random(11)
    kills: list[str] = []
    started = time.monotonic()
    redis_restarted_after_s = None
    try:

        async def some_done() -> bool:
            return len(await s3.keys(out, "processed/records/")) >= 50

        await eventually(some_done, 120, "processing to start")
        for i in range(KILLS):
            kills.append(await _kill_a_consumer(rng))
            if i == KILLS // 2:
                redis.kill()
                await asyncio.sleep(2)
                redis.start()  # same port, same AOF
                redis_restarted_after_s = round(time.monotonic() - started, 1)
            await asyncio.sleep(rng.uniform(1.0, 3.0))

        async def all_done() -> bool:
            return len(await s3.keys(out, "processed/records/")) >= TOTAL

        await eventually(all_done, 600, f"all {TOTAL} chunks processed")
        elapsed = time.monotonic() - started

        async def settled() -> bool:
            st = await queue_state(redis.url)
            return st["pending"] == 0 and st["length"] == 0

        await eventually(settled, 60, "the queue to settle")
        assert cloud.terminate() == 0
        records = await s3.records(out)
        got = [r["chunk_id"] for r in records]
        state = await queue_state(redis.url)
    finally:
        cloud.kill()
        await client.aclose()
        redis.stop()
    [stopped] = cloud.events("deployment.stopped")
    figures = {
        "manifests": TOTAL,
        "kills": len(kills),
        "redis_restart_at_s": redis_restarted_after_s,
        "records": len(got),
        "lost": len(expected - set(got)),
        "unexpected": len(set(got) - expected),
        "dlq": state["dlq"],
        "pending": state["pending"],
        "processed_by_surviving_actors": stopped.get("processed", 0),
        "duplicates_acked": stopped.get("duplicate", 0),
        "lock_waits": stopped.get("lock_waits", 0),
        "reclaimed": stopped.get("reclaimed", 0),
        "actor_restarts": stopped.get("restarts", 0),
        "seconds": round(elapsed, 1),
        "chunks_per_s": round(TOTAL / elapsed, 1),
    }
    report_figures("queue_faults", figures)
    assert figures["lost"] == 0 and figures["unexpected"] == 0
    assert len(got) == len(set(got)) == TOTAL  # every chunk's outputs exist exactly once
    assert (state["dlq"], state["pending"], state["length"]) == (0, 0, 0)
    assert stopped["restarts"] >= KILLS // 2  # kills landed on live actors and were recovered
