"""Operator commands on real servers: dead letters and reconcile."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from edge_agent.segmenter import ClosedChunk
from tests.support import BIN, S3, Edge, Stack, cloud_ingest, edge_agent, eventually, queue_state


async def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "cloud-ingest"), *args],
        env=stack.ingest_env(INGEST_RAW_BUCKET=stack.raw_bucket),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def listed(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


async def test_admin_dlq_list_requeue_and_purge(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    missing = await edge.send(chunks[0], 0, upload=False)  # announced before its upload existed
    await edge.send(chunks[1], 1, tamper=True)
    cloud = cloud_ingest(stack, stack.workdir / "cloud.log")
    try:

        async def two_letters() -> bool:
            return (await queue_state(stack.redis_url))["dlq"] == 2

        await eventually(two_letters, 60, "two dead letters")
        letters = listed(await cli(stack, "dlq", "list"))
        assert sorted(x["reason"] for x in letters) == ["bad_signature", "object_missing"]
        assert (
            next(x for x in letters if x["reason"] == "object_missing")["chunk_id"]
            == missing.chunk_id
        )

        refused = await cli(stack, "dlq", "requeue")
        assert refused.returncode == 2  # no selection: nothing is replayed by accident

        await s3.put(missing.bucket, missing.key, chunks[0].path.read_bytes())  # the fix
        result = await cli(stack, "dlq", "requeue", "--reason", "object_missing")
        assert json.loads(result.stdout) == {"requeued": 1}

        async def processed() -> bool:
            return len(await s3.records(stack.out_bucket)) == 1

        await eventually(processed, 60, "the requeued chunk to be processed")
        result = await cli(stack, "dlq", "purge", "--reason", "bad_signature")
        assert json.loads(result.stdout) == {"purged": 1}
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    state = await queue_state(stack.redis_url)
    assert (state["dlq"], state["pending"], state["length"]) == (0, 0, 0)
    [record] = await s3.records(stack.out_bucket)
    assert record["chunk_id"] == missing.chunk_id


async def test_admin_reconcile_rebuilds_the_queue_from_the_bucket(
    stack: Stack, s3: S3, clip: Path
) -> None:
    """The stream loses its entries (say, a Redis without AOF restarted); the bucket has all."""
    edge = edge_agent(stack, [{"id": "cam1", "url": f"file://{clip}"}], stack.workdir / "e.log")
    try:

        async def finished() -> bool:
            return bool(edge.events("camera.finished")) and len(edge.events("chunk")) == 3

        await eventually(finished, 60, "3 chunks announced")
        assert edge.terminate() == 0
    finally:
        edge.kill()
    client = aioredis.from_url(stack.redis_url)
    await client.delete("chunks")  # every entry gone
    await client.aclose()

    dry = json.loads((await cli(stack, "reconcile", "--dry-run")).stdout)
    assert (dry["chunks"], dry["requeued"], dry["done"]) == (3, 3, 0)
    assert (await queue_state(stack.redis_url))["length"] == 0  # a dry run changes nothing
    outside = json.loads((await cli(stack, "reconcile", "--until", "2000-01-01T00:00:00Z")).stdout)
    assert (outside["requeued"], outside["out_of_range"]) == (0, 3)

    report = json.loads((await cli(stack, "reconcile")).stdout)
    assert report["requeued"] == 3
    cloud = cloud_ingest(stack, stack.workdir / "cloud.log")
    try:

        async def processed() -> bool:
            return len(await s3.records(stack.out_bucket)) == 3

        await eventually(processed, 60, "the reconciled chunks to be processed")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    again = json.loads((await cli(stack, "reconcile")).stdout)
    assert (again["done"], again["requeued"]) == (3, 0)  # done records stop a second replay
