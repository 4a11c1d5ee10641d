"""Training-ready data: the Ray Data loader and the example jobs, on small real shards."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from cloud_ingest.dataset import frames
from edge_agent.segmenter import ClosedChunk
from tests.support import S3, Edge, Stack, cloud_ingest, eventually

ROOT = Path(__file__).resolve().parent.parent


async def processed_three(stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]) -> list[str]:
    sent = [await edge.send(c, seq) for seq, c in enumerate(chunks)]
    cloud = cloud_ingest(stack, stack.workdir / "cloud.log", INGEST_RESIZE_SHORT_SIDE="120")
    try:

        async def done() -> bool:
            return len(await s3.keys(stack.out_bucket, "processed/shards/")) == 3

        await eventually(done, 90, "3 shards")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    return [m.chunk_id for m in sent]


async def test_dataset_streams_decoded_frames_from_the_shards(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    ids = await processed_three(stack, s3, edge, chunks)
    ds = frames(stack.out_bucket, endpoint_url=stack.s3_endpoint, site="site-1")
    rows = await asyncio.to_thread(ds.take_all)
    assert len(rows) == 12  # 3 chunks x 2 s x 2 frames/s
    assert {r["chunk_id"] for r in rows} == set(ids)
    for r in rows:
        assert r["image"].shape == (120, 160, 3) and r["image"].dtype == np.uint8
        assert r["camera_id"] == "cam1"
    assert float(np.mean([r["image"].mean() for r in rows])) > 50  # real pixels, not zeros


async def test_dataset_training_example_runs_on_real_shards(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    await processed_three(stack, s3, edge, chunks)
    env = {
        **stack.ingest_env(),
        "INGEST_S3_ENDPOINT_URL": stack.s3_endpoint,
        "PYTHONPATH": str(ROOT),
    }

    def example(*args: str) -> dict[str, object]:
        result = subprocess.run(
            [sys.executable, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    trained = await asyncio.to_thread(
        example, "examples/train_brightness.py", "--bucket", stack.out_bucket, "--epochs", "2"
    )
    assert trained["frames"] == 12 and trained["epochs"] == 2
