"""Uploads against a real SeaweedFS, some seen through a proxy on the wire: single PUT,
streamed multipart with Content-MD5 per part, a part damaged in transit, bandwidth cap."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from devstack.proxy import HttpTap, TappedRequest
from devstack.s3 import S3
from devstack.servers import SeaweedS3
from shared.manifest import Manifest, derive_chunk_id
from shared.s3 import object_exists
from shared.uploader import MIB, FileRange, RateLimit, Uploader
from tests.support import Stack, report_figures


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


def busiest(sent: list[tuple[float, int]], window: float) -> int:
    """The most bytes that passed the wire within any ``window`` seconds."""
    best, start, total = 0, 0, 0
    for t, n in sent:
        total += n
        while sent[start][0] <= t - window:
            total -= sent[start][1]
            start += 1
        best = max(best, total)
    return best


async def test_uploader_rate_limit_bounds_bursts_on_the_wire(
    stack: Stack, s3_server: SeaweedS3, tmp_path: Path
) -> None:
    """EDGE_UPLOAD_MAX_BPS paces the body itself: seen from a proxy on the wire, no second
    carries more than a second's worth plus one burst (and a quarter second of scheduling
    jitter at the proxy), and the average holds the cap. (It used to take a whole PUT's
    tokens and then send it at line rate.)"""
    rate = 800_000
    path = tmp_path / "paced.bin"
    path.write_bytes(os.urandom(2_400_000))
    m = manifest_for(path, stack.raw_bucket, "a/paced.mp4")
    limit = RateLimit(rate)
    with HttpTap(s3_server.endpoint) as tap:
        async with S3(tap.url) as client:
            t0 = time.monotonic()
            await Uploader(client.client, rate=limit).upload(path, m)
            elapsed = time.monotonic() - t0
            assert await client.get(stack.raw_bucket, m.key) == path.read_bytes()
        sent = list(tap.sent)
    window = 1.0
    peak = busiest(sent, window)
    allowed = rate * (window + 0.25) + limit.burst + RateLimit.READ + 8192  # + headers
    report_figures(
        "upload_pacing",
        {
            "rate": rate,
            "burst": limit.burst,
            "peak_per_s": peak,
            "allowed": allowed,
            "seconds": round(elapsed, 2),
        },
    )
    assert peak <= allowed
    assert elapsed >= (m.size_bytes - limit.burst) / rate * 0.95


def test_uploader_rate_limit_is_shared_by_threads() -> None:
    """Four readers at once (four uploads) share one cap."""
    limit = RateLimit(2_000_000)
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: [limit.take(65536) for _ in range(16)], range(4)))
    total = 4 * 16 * 65536
    assert time.monotonic() - t0 >= (total - limit.burst) / limit.rate * 0.95
    unlimited = RateLimit(0)
    t0 = time.monotonic()
    unlimited.take(10**9)
    assert time.monotonic() - t0 < 0.1


async def test_uploader_multipart_sends_content_md5_and_a_damaged_part_is_refused(
    stack: Stack, s3_server: SeaweedS3, tmp_path: Path
) -> None:
    """Every part carries Content-MD5 (seen on the wire); a part damaged in transit is
    refused by the server (BadDigest), the upload is aborted, and the retry is intact."""
    path = tmp_path / "parts.bin"
    path.write_bytes(os.urandom(11 * MIB))
    m = manifest_for(path, stack.raw_bucket, "a/parts.mp4")
    with HttpTap(s3_server.endpoint) as tap:
        async with S3(tap.url) as client:
            uploader = Uploader(client.client, multipart_threshold=5 * MIB, part_size=5 * MIB)
            tap.damage(lambda r: r.method == "PUT" and "partNumber=2" in r.query, offset=12345)
            with pytest.raises(ClientError) as refused:
                await uploader.upload(path, m)
            assert refused.value.response["Error"]["Code"] == "BadDigest"
            assert not await object_exists(client.client, stack.raw_bucket, m.key)
            await uploader.upload(path, m)
            data = await client.get(stack.raw_bucket, m.key)
        requests = tap.snapshot()
    assert hashlib.sha256(data).hexdigest() == m.sha256
    parts = [r for r in requests if r.method == "PUT" and "partNumber=" in r.query]
    assert len(parts) == 2 + 3  # two parts of the refused attempt, three of the retry
    assert [r.damaged_at for r in parts if r.damaged_at is not None] == [12345]
    for r in parts:
        digest = base64.b64encode(hashlib.md5(_part(path, r), usedforsecurity=False).digest())
        assert r.headers.get("content-md5") == digest.decode(), r.target
    aborts = [r for r in requests if r.method == "DELETE" and "uploadId=" in r.query]
    assert len(aborts) == 1


def _part(path: Path, req: TappedRequest) -> bytes:
    number = int(dict(p.split("=", 1) for p in req.query.split("&"))["partNumber"])
    with path.open("rb") as fh:
        fh.seek((number - 1) * 5 * MIB)
        return fh.read(req.body_size)


def test_uploader_body_reads_are_whole_unless_a_low_cap_paces_them(tmp_path: Path) -> None:
    """aiohttp asks for 64 KiB at a time. With no cap a read gives all of it (4 KiB reads
    once cost the agent 2.5x the CPU at 32 cameras); under a low cap, a quarter second's
    worth, so no connection idles for seconds between sends."""
    path = tmp_path / "body.bin"
    path.write_bytes(os.urandom(200_000))
    with FileRange(path, 0, 200_000, RateLimit(0)) as body:
        assert len(body.read(65536)) == 65536
    with FileRange(path, 0, 200_000, RateLimit(100_000)) as body:
        assert len(body.read(65536)) == 25_000
