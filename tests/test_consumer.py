"""The cloud consumers against real Redis, SeaweedFS and Ray: DLQ reasons and faults."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
from pathlib import Path

import aiohttp
import pytest
import ray

from devstack.servers import free_port
from edge_agent.segmenter import ClosedChunk
from shared.queue import publish
from tests.support import (
    S3,
    SLOW_WORK,
    Edge,
    Stack,
    cloud_ingest,
    eventually,
    metric_appears,
    promtool_problems,
    queue_state,
    report_figures,
    slow_chunk_in,
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


COUNTERS = ("cloud_ingest_chunks_total", "cloud_ingest_stage_seconds_total", "cloud_ingest_actor")


def acknowledged(sample: dict[str, float]) -> float:
    """Chunks acknowledged, by the counters: processed, or found done (a chunk the killed
    actor processed but had not acknowledged is redone as a duplicate)."""
    return sum(sample.get(f'cloud_ingest_chunks_total{{outcome="{o}"}}', 0) for o in OUTCOMES)


OUTCOMES = ("processed", "duplicate")


def counters(page: str) -> dict[str, float]:
    """The counter samples of a /metrics page: series (name and labels) -> value."""
    out = {}
    for line in page.splitlines():
        if line.startswith(COUNTERS):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


async def test_consumer_killed_mid_run_loses_nothing(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    """kill -9 a consumer actor mid-run: it is replaced and its entries are not lost. The
    exported counters (chunk outcomes, stage seconds, restarts), scraped from the live
    /metrics all along, never go down across the kill, and the page passes promtool."""
    total = 300
    for seq in range(total):
        await edge.send(chunks[seq % len(chunks)], seq)
    port = free_port()
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_VISIBILITY_TIMEOUT_S="3",
        INGEST_BATCH_SIZE="4",
        INGEST_ACTOR_CONCURRENCY="1",
        INGEST_HTTP_BIND=f"127.0.0.1:{port}",
    )
    pages: list[str] = []

    async def scrape(http: aiohttp.ClientSession) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    pages.append(await resp.text())
            await asyncio.sleep(0.3)

    try:
        async with aiohttp.ClientSession() as http:
            scraper = asyncio.create_task(scrape(http))

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

            async def exported() -> bool:
                return bool(pages) and acknowledged(counters(pages[-1])) >= total

            await eventually(exported, 30, "the counters to show every chunk")
            scraper.cancel()
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
    samples = [counters(p) for p in pages]
    drops = [
        (series, a[series], b[series])
        for a, b in itertools.pairwise(samples)
        for series in a
        if series in b and b[series] < a[series]
    ]
    last = samples[-1]
    report_figures(
        "counters_across_a_kill",
        {
            "scrapes": len(samples),
            "series": len(last),
            "decreases": len(drops),
            "processed": last.get('cloud_ingest_chunks_total{outcome="processed"}'),
            "duplicate": last.get('cloud_ingest_chunks_total{outcome="duplicate"}', 0),
            "restarts": last.get("cloud_ingest_actor_restarts_total"),
        },
    )
    assert drops == []
    assert acknowledged(last) == total  # each chunk counted once, with its acknowledgement
    assert last["cloud_ingest_actor_restarts_total"] >= 1
    assert last['cloud_ingest_stage_seconds_total{stage="preprocess"}'] > 0
    assert promtool_problems(pages[-1]) == []


@pytest.fixture(scope="session")
def slow_chunk(session_dir: Path) -> ClosedChunk:
    return slow_chunk_in(session_dir)


async def test_consumer_poison_chunk_dead_lettered_after_exactly_max_deliveries(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk], slow_chunk: ClosedChunk
) -> None:
    """A chunk whose processing always overruns INGEST_PROCESS_TIMEOUT_S (seconds of work
    against a 0.5 s limit) fails exactly INGEST_MAX_DELIVERIES (3) attempts and is then
    dead-lettered `process_timeout`; small chunks (~0.1 s of work, retried if a busy
    machine slows one down) flow past it."""
    await edge.send(slow_chunk, 0, media_duration_s=20.0)
    for seq, c in enumerate(chunks, start=1):
        await edge.send(c, seq)
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_PROCESS_TIMEOUT_S="0.5",
        INGEST_VISIBILITY_TIMEOUT_S="1",
        **SLOW_WORK,
        INGEST_FILTER_RECENT_CHUNKS="0",
    )
    try:

        async def settled() -> bool:
            st = await queue_state(stack.redis_url)
            return st["dlq"] == 1 and st["pending"] == 0 and st["length"] == 0

        await eventually(settled, 120, "the poison chunk in the DLQ")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    [(_, letter)] = await edge.redis.xrange("chunks:dlq")
    assert letter[b"reason"] == b"process_timeout"
    assert letter[b"deliveries"] == b"3"
    assert b"INGEST_PROCESS_TIMEOUT_S=0.5s" in letter[b"detail"]
    records = await s3.records(stack.out_bucket)
    assert sorted(r["manifest"]["seq"] for r in records) == [1, 2, 3]
    [stopped] = cloud.events("deployment.stopped")
    assert stopped["failed_attempts"] >= 3  # the poison's three (and any slowed small one)
    assert stopped["process_timeouts"] >= 3
    assert stopped["rejected_process_timeout"] == 1


async def test_consumer_chunk_slower_than_visibility_timeout_is_processed_once(
    stack: Stack, s3: S3, edge: Edge, slow_chunk: ClosedChunk
) -> None:
    """Processing takes longer than INGEST_VISIBILITY_TIMEOUT_S=1; lease renewal keeps the
    reaper of the other actor away, so there is one delivery and no reclaim."""
    await edge.send(slow_chunk, 0, media_duration_s=20.0)
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_VISIBILITY_TIMEOUT_S="1",
        **SLOW_WORK,
    )
    try:

        async def done() -> bool:
            return len(await s3.records(stack.out_bucket)) == 1

        await eventually(done, 120, "the slow chunk processed")
        await asyncio.sleep(2)  # give a wrongful reclaim time to show up

        async def logged() -> bool:  # the actor's chunk line, forwarded to the driver's log
            return bool(cloud.events("chunk"))

        await eventually(logged, 30, "the chunk's log line")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    [record] = await s3.records(stack.out_bucket)
    assert record["deliveries"] == 1
    [stopped] = cloud.events("deployment.stopped")
    assert stopped.get("reclaimed", 0) == 0 and stopped.get("duplicate", 0) == 0
    assert stopped["processed"] == 1
    [line] = cloud.events("chunk")  # one canonical line: one delivery, processed once
    assert (line["outcome"], line["deliveries"]) == ("processed", 1)
    assert line["preprocess_s"] > 1.0  # it really was slower than the visibility timeout


async def test_consumer_deployment_serves_health_and_metrics(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    for seq, c in enumerate(chunks):
        await edge.send(c, seq)
    port = free_port()
    cloud = cloud_ingest(stack, stack.workdir / "cloud.log", INGEST_HTTP_BIND=f"127.0.0.1:{port}")
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            processed = 'cloud_ingest_chunks_total{outcome="processed"} 3.0'
            await eventually(lambda: metric_appears(http, base, processed), 90, "3 processed")
            # The queue gauges are sampled apart from the counters: the acks show a moment later.
            acked = "cloud_ingest_pending 0.0"
            await eventually(lambda: metric_appears(http, base, acked), 30, "all acknowledged")
            async with http.get(f"{base}/readyz") as resp:
                assert resp.status == 200
                assert (await resp.json())["checks"] == {"redis": True, "consumers": True}
            async with http.get(f"{base}/healthz") as resp:
                assert resp.status == 200
            async with http.get(f"{base}/metrics") as resp:
                text = await resp.text()
        assert "cloud_ingest_dlq_length 0.0" in text
        assert "cloud_ingest_consumers_alive 2.0" in text
        assert "cloud_ingest_consumers_paused 0.0" in text
        assert "cloud_ingest_media_workers 4.0" in text  # 2 actors x INGEST_ACTOR_CONCURRENCY
        assert "# TYPE cloud_ingest_stage_seconds_total counter" in text
        assert 'cloud_ingest_stage_seconds_total{stage="preprocess"}' in text
        assert promtool_problems(text) == []
        assert cloud.terminate() == 0
    finally:
        cloud.kill()


async def test_consumer_deployment_will_not_run_without_its_health_endpoint(stack: Stack) -> None:
    """INGEST_HTTP_BIND names a port another process holds: `cloud-ingest run` exits
    non-zero at once, saying why, instead of consuming with no /readyz and no /metrics
    (an observer thread that died alone, unnoticed)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cloud = cloud_ingest(
            stack, stack.workdir / "cloud.log", INGEST_HTTP_BIND=f"127.0.0.1:{port}"
        )
        try:
            code = await asyncio.to_thread(cloud.proc.wait, 30)
        finally:
            cloud.kill()
    assert code == 1
    [fatal] = cloud.events("deployment.fatal")
    assert f"127.0.0.1:{port}" in fatal["exception"]
    assert not cloud.events("deployment.started")  # no actor was started
