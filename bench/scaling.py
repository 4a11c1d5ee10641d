"""Scaling: consumer throughput with 1, 2 and 4 actors spread over the nodes of a real
multi-node Ray cluster.

The cluster is ``ray.cluster_utils.Cluster``: a head with no CPUs (as in
configs/kuberay) and two worker nodes of 2 CPUs each, separate raylets. The real
``cloud-ingest run`` connects with ``RAY_ADDRESS`` and starts ``INGEST_CONSUMERS`` actors
(1 CPU, one media worker each), which SPREAD puts on both workers. The input is the same
for every run: K real 2 s 1080p chunks cut by the edge's own segmenter, uploaded once and
announced on a fresh stream per run (records under a fresh prefix, so nothing is a
duplicate of an earlier run).

Throughput = (K - 1) / (time of the K-th record - time of the first): start-up (driver,
actors, media workers) is left out. Ratios are against 1 actor in the same run, runs
interleaved, medians of ``ctx.repeats``.

What it can show on this 2-core machine: that the actors really work in parallel on
different nodes, up to what 2 cores give (about 2x), and that 4 actors on 2 cores do not
fall below 2 (no contention collapse). What it cannot: scaling past 2 cores; that needs
the 16-core device machine (1 -> 2 -> 4 -> 8 -> 16).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from bench.common import Context, Figure, clip_1080p, median
from bench.latency import stop_cloud
from bench.processing import _manifest, _segment
from devstack.daemons import cloud_ingest
from devstack.s3 import S3

KEY_ID, SECRET = "bench", "bench-secret-0123456789"
RAW, OUT = "bench-raw", "bench-out"
ACTORS = (1, 2, 4)


def _cluster() -> Any:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    return cluster


async def _upload(ctx: Context, chunks: list[Any]) -> None:
    async with S3(ctx.s3_endpoint) as s3:
        for bucket in (RAW, OUT):
            try:
                await s3.client.create_bucket(Bucket=bucket)
            except Exception as exc:  # already there from another benchmark
                if "BucketAlready" not in repr(exc):
                    raise
        for path, m in chunks:
            await s3.put(RAW, m.key, await asyncio.to_thread(Path(path).read_bytes))


async def _announce(ctx: Context, stream: str, chunks: list[Any]) -> None:
    import redis.asyncio as aioredis

    from shared.manifest import sign_fields
    from shared.queue import ensure_group, publish

    client = aioredis.from_url(ctx.redis_url)
    try:
        await ensure_group(client, stream, "ingest")
        for _path, m in chunks:
            await publish(client, stream, sign_fields(m, KEY_ID, SECRET.encode()))
    finally:
        await client.aclose()


async def _count(ctx: Context, prefix: str) -> int:
    async with S3(ctx.s3_endpoint) as s3:
        return len(await s3.keys(OUT, f"{prefix}/records/"))


def _one(ctx: Context, address: str, n: int, run: int, chunks: list[Any]) -> float:
    stream, prefix = f"scale-{n}-{run}", f"scale-{n}-{run}"
    asyncio.run(_announce(ctx, stream, chunks))
    env = ctx.env(
        RAY_ADDRESS=address,
        INGEST_REDIS_URL=ctx.redis_url,
        INGEST_S3_ENDPOINT_URL=ctx.s3_endpoint,
        INGEST_STREAM=stream,
        INGEST_OUTPUT_BUCKET=OUT,
        INGEST_RAW_BUCKET=RAW,
        INGEST_OUTPUT_PREFIX=prefix,
        INGEST_KEYRING=json.dumps({KEY_ID: SECRET}),
        INGEST_CONSUMERS=str(n),
        INGEST_ACTOR_CPUS="1",
        INGEST_ACTOR_CONCURRENCY="1",
        INGEST_FILTER_RECENT_CHUNKS="0",
        INGEST_LOG_FORMAT="json",
    )
    cloud = cloud_ingest(env, ctx.work / f"{stream}.log")
    first = last = None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            done = asyncio.run(_count(ctx, prefix))
            now = time.monotonic()
            if done and first is None:
                first = now
            if done >= len(chunks):
                last = now
                break
            time.sleep(0.2)
    finally:
        stop_cloud(cloud)
    if first is None or last is None or last <= first:
        raise RuntimeError(f"{n} actors did not process {len(chunks)} chunks; see {cloud.log}")
    return (len(chunks) - 1) / (last - first)


def run(ctx: Context) -> list[Figure]:
    closed = _segment(clip_1080p(20), ctx.work / "scaling", 2.0)
    k = 8 if ctx.quick else 30
    chunks = [
        (closed[i % len(closed)].path, _manifest(closed[i % len(closed)], i)) for i in range(k)
    ]
    chunks = [(p, m.model_copy(update={"bucket": RAW})) for p, m in chunks]
    asyncio.run(_upload(ctx, chunks))
    cluster = _cluster()
    runs: dict[str, list[float]] = {str(n): [] for n in ACTORS}
    try:
        for r in range(ctx.repeats):
            for n in ACTORS:
                runs[str(n)].append(_one(ctx, cluster.address, n, r, chunks))
    finally:
        cluster.shutdown()
    tp = {n: median(runs[str(n)]) for n in ACTORS}
    note = (
        f"{k} chunks of 2 s 1080p, 2 worker nodes x 2 CPUs, chunks/s: "
        + ", ".join(f"{n} actors {tp[n]:.2f}" for n in ACTORS)
        + "; 2 cores: no more than about 2x is possible here"
    )
    return [
        Figure(
            "scaling",
            f"throughput, {n} actors on 2 nodes vs 1",
            tp[n],
            tp[1],
            "chunks/s",
            ">= 1.3x 1 actor (2 cores)",
            tp[n] >= 1.3 * tp[1],
            note,
            runs=runs,
        )
        for n in ACTORS[1:]
    ]
