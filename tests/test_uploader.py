"""Uploads against a real SeaweedFS: single PUT, streamed multipart, bandwidth cap."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime
from pathlib import Path

from devstack.s3 import S3
from edge_agent.uploader import MIB, RateLimit, Uploader
from shared.manifest import Manifest, derive_chunk_id
from tests.support import Stack


def manifest_for(path: Path, bucket: str, key: str) -> Manifest:
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    now = datetime.now(UTC)
    return Manifest(
        chunk_id=derive_chunk_id("d", "c", 0, sha),
        device_id="d",
        site_id="s",
        camera_id="c",
        seq=0,
        bucket=bucket,
        key=key,
        size_bytes=len(data),
        sha256=sha,
        container="mp4",
        codec="h264",
        width=1,
        height=1,
        frame_count=1,
        keyframe_count=1,
        start_time=now,
        end_time=now,
        media_start_s=0.0,
        media_duration_s=1.0,
        discontinuity=False,
        gap_before_s=0.0,
        agent_version="test",
    )


async def test_uploader_single_put_carries_sha_metadata(
    stack: Stack, s3: S3, tmp_path: Path
) -> None:
    path = tmp_path / "small.bin"
    path.write_bytes(os.urandom(300_000))
    m = manifest_for(path, stack.raw_bucket, "a/small.mp4")
    await Uploader(s3.client).upload(path, m)
    assert await s3.get(stack.raw_bucket, m.key) == path.read_bytes()
    head = await s3.client.head_object(Bucket=stack.raw_bucket, Key=m.key)
    assert head["Metadata"]["sha256"] == m.sha256


async def test_uploader_multipart_above_threshold_streams_parts(
    stack: Stack, s3: S3, tmp_path: Path
) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(12 * MIB + 123))
    m = manifest_for(path, stack.raw_bucket, "a/big.mp4")
    uploader = Uploader(s3.client, multipart_threshold=5 * MIB, part_size=5 * MIB)
    await uploader.upload(path, m)
    head = await s3.client.head_object(Bucket=stack.raw_bucket, Key=m.key)
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    assert hashlib.sha256(await s3.get(stack.raw_bucket, m.key)).hexdigest() == m.sha256


async def test_uploader_rate_limit_holds_bytes_to_the_cap() -> None:
    limit = RateLimit(200_000)  # 200 kB/s, one second of burst
    t0 = time.monotonic()
    for _ in range(5):
        await limit.take(100_000)  # 500 kB: 200 kB burst, then 300 kB at 200 kB/s
    assert time.monotonic() - t0 >= 1.4
    unlimited = RateLimit(0)
    t0 = time.monotonic()
    await unlimited.take(10**9)
    assert time.monotonic() - t0 < 0.1
