"""End to end on real parts: camera → edge agent → S3 + Redis → Ray consumers → records."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from devstack.media import make_clip, remux
from devstack.servers import HttpFileServer, RtspServer
from shared.keys import manifest_key
from shared.manifest import SigningKey, verify_fields
from tests.support import (
    BIN,
    KEY_ID,
    S3,
    SECRET,
    Daemon,
    Stack,
    cloud_ingest,
    edge_agent,
    eventually,
    log_events,
    queue_state,
    sha256,
)


async def processed_records(s3: S3, stack: Stack) -> list[dict[str, Any]]:
    return await s3.records(stack.out_bucket)


async def assert_all_accounted_for(s3: S3, stack: Stack, cloud: Daemon) -> list[dict[str, Any]]:
    """Every raw chunk in S3 matches its manifest and was processed exactly once."""
    raw_keys = await s3.chunk_keys(stack.raw_bucket)
    records = await processed_records(s3, stack)
    assert raw_keys, "no chunks were uploaded"
    manifests = [r["manifest"] for r in records]
    assert sorted(m["key"] for m in manifests) == raw_keys
    keyring = {KEY_ID: SigningKey(SECRET.encode(), device_id="dev-1", site_id="site-1")}
    for m in manifests:
        data = await s3.get(stack.raw_bucket, m["key"])
        assert sha256(data) == m["sha256"]
        assert len(data) == m["size_bytes"]
        # The signed manifest sits beside its chunk, so the bucket alone can rebuild the queue.
        sidecar = json.loads(await s3.get(stack.raw_bucket, manifest_key(m["key"])))
        fields = {k.encode(): v.encode() for k, v in sidecar.items()}
        assert verify_fields(fields, keyring).manifest.chunk_id == m["chunk_id"]
    chunk_ids = [r["chunk_id"] for r in records]
    assert len(set(chunk_ids)) == len(chunk_ids)
    state = await queue_state(stack.redis_url)
    assert state["pending"] == 0
    assert state["dlq"] == 0, state["dlq_reasons"]
    assert state["length"] == 0  # acknowledged entries are deleted
    assert cloud.terminate() == 0, cloud.text()[-3000:]
    [stopped] = cloud.events("deployment.stopped")
    assert stopped["processed"] == len(records)  # each manifest processed once
    assert stopped.get("duplicate", 0) == 0
    return records


def by_camera(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: r["manifest"]["seq"]):
        out.setdefault(r["manifest"]["camera_id"], []).append(r["manifest"])
    return out


async def test_pipeline_file_replay_end_to_end(stack: Stack, s3: S3, clip: Path) -> None:
    """A 6 s clip replayed in real time: 3 chunks, every frame once, all processed."""
    cloud = cloud_ingest(stack, stack.workdir / "cloud.log")
    edge = edge_agent(stack, [{"id": "cam1", "url": f"file://{clip}"}], stack.workdir / "edge.log")
    try:
        await eventually(lambda: _has(edge, "camera.finished"), 60, "replay to finish")

        async def all_processed() -> bool:
            return len(edge.events("chunk")) == 3 and len(await processed_records(s3, stack)) == 3

        await eventually(all_processed, 60, "3 chunks processed")
        assert edge.terminate() == 0, edge.text()[-3000:]
        records = await assert_all_accounted_for(s3, stack, cloud)
    finally:
        edge.kill()
        cloud.kill()
    [manifests] = by_camera(records).values()
    assert [m["seq"] for m in manifests] == [0, 1, 2]
    assert sum(m["frame_count"] for m in manifests) == 90
    assert [m["media_start_s"] for m in manifests] == [0.0, 2.0, 4.0]
    assert not any(m["discontinuity"] for m in manifests)
    assert all(r["integrity"]["keyframes_decoded"] == 2 for r in records)
    # Replay is paced to the media clock: wall and media time agree to within scheduling noise.
    assert all(abs(m["clock_drift_s"]) < 1.0 for m in manifests)
    assert all(m["start_time"] < m["end_time"] for m in manifests)


async def test_pipeline_hevc_replay_end_to_end(stack: Stack, s3: S3, tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "hevc.mp4", 4, codec="libx265")
    cloud = cloud_ingest(stack, stack.workdir / "cloud.log")
    edge = edge_agent(stack, [{"id": "cam9", "url": f"file://{clip}"}], stack.workdir / "edge.log")
    try:
        await eventually(lambda: _has(edge, "camera.finished"), 60, "replay to finish")

        async def processed() -> bool:
            return len(await processed_records(s3, stack)) == 2

        await eventually(processed, 60, "2 HEVC chunks processed")
        assert edge.terminate() == 0
        records = await assert_all_accounted_for(s3, stack, cloud)
    finally:
        edge.kill()
        cloud.kill()
    assert {r["manifest"]["codec"] for r in records} == {"hevc"}
    assert sum(r["integrity"]["packets"] for r in records) == 60


async def test_pipeline_rtsp_end_to_end_with_sigterm_drain(
    stack: Stack, s3: S3, rtsp_server: RtspServer
) -> None:
    """Two live RTSP cameras for a few seconds; SIGTERM closes the open chunks and drains."""
    cameras = [{"id": m, "url": rtsp_server.url(m)} for m in ("cam1", "cam2")]
    cloud = cloud_ingest(stack, stack.workdir / "cloud.log")
    edge = edge_agent(stack, cameras, stack.workdir / "edge.log")
    try:
        await eventually(lambda: _count(edge, "chunk", 4), 60, "4 chunks announced")
        assert edge.terminate() == 0, edge.text()[-3000:]
        announced = edge.events("chunk")

        async def all_processed() -> bool:
            return len(await processed_records(s3, stack)) == len(announced)

        await eventually(all_processed, 60, "every announced chunk processed")
        records = await assert_all_accounted_for(s3, stack, cloud)
    finally:
        edge.kill()
        cloud.kill()
    cams = by_camera(records)
    assert set(cams) == {"cam1", "cam2"}
    for manifests in cams.values():
        assert [m["seq"] for m in manifests] == list(range(len(manifests)))
        assert all(m["codec"] == "h264" and m["width"] == 320 for m in manifests)
        assert all(m["frame_count"] >= 1 and m["keyframe_count"] >= 1 for m in manifests)
    ledger = sqlite3.connect(stack.workdir / "spool" / "ledger.sqlite3")
    states = dict(ledger.execute("SELECT state, COUNT(*) FROM chunks GROUP BY state").fetchall())
    assert states == {"announced": len(records)}  # drained: nothing left behind
    assert not list((stack.workdir / "spool").glob("cam*/*.mp4"))  # announced files are freed


async def test_pipeline_seq_survives_restart_and_gap_is_flagged(
    stack: Stack, s3: S3, rtsp_server: RtspServer
) -> None:
    cameras = [{"id": "cam1", "url": rtsp_server.url("cam1")}]
    for run in range(2):
        edge = edge_agent(stack, cameras, stack.workdir / f"edge{run}.log")
        try:
            await eventually(lambda: _count(edge, "chunk", 2), 60, "2 chunks")  # noqa: B023
            assert edge.terminate() == 0
        finally:
            edge.kill()
    raw = await s3.chunk_keys(stack.raw_bucket)
    seqs = sorted(int(k.rsplit("-", 1)[1].split(".")[0]) for k in raw)
    assert seqs == list(range(len(seqs)))  # strictly increasing across the restart, no reuse
    first_after_restart = log_events(stack.workdir / "edge1.log", "chunk")[0]
    assert first_after_restart["discontinuity"] is True
    assert first_after_restart["gap_before_s"] > 0


async def _has(d: Daemon, event: str) -> bool:
    return bool(d.events(event))


async def _count(d: Daemon, event: str, n: int) -> bool:
    if d.proc.poll() is not None:
        raise AssertionError(f"daemon exited early:\n{d.text()[-3000:]}")
    return len(d.events(event)) >= n


async def test_pipeline_http_camera_is_captured(stack: Stack, s3: S3, clip: Path) -> None:
    """An http:// MPEG-TS stream is chunked (into MP4) and uploaded like any other source."""
    ts = remux(clip, stack.workdir / "clip.ts", "mpegts")
    server = HttpFileServer(stack.workdir)
    server.start()
    edge = edge_agent(stack, [{"id": "web", "url": server.url(ts.name)}], stack.workdir / "e.log")
    try:
        await eventually(lambda: _count(edge, "chunk", 3), 60, "3 chunks from HTTP")
        assert edge.terminate() == 0
    finally:
        edge.kill()
        server.stop()
    chunks = edge.events("chunk")
    assert sum(c["frames"] for c in chunks) >= 90  # the whole recording (then it reconnects)
    assert len(await s3.chunk_keys(stack.raw_bucket, "raw/site-1/web/")) == len(chunks)


async def test_pipeline_status_command_reports_queue(stack: Stack) -> None:
    from shared.queue import ensure_group, publish

    client = aioredis.from_url(stack.redis_url)
    await ensure_group(client, "chunks", "ingest")
    for i in range(3):
        await publish(client, "chunks", {"n": str(i).encode()})
    await client.xreadgroup("ingest", "consumer-0", {"chunks": ">"}, count=2)
    await publish(client, "chunks:dlq", {"reason": b"bad_signature"})
    await client.aclose()
    result = await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "cloud-ingest"), "status", "--json", "--interval", "0.5"],
        env=stack.ingest_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    doc = json.loads(result.stdout)
    assert (doc["length"], doc["pending"], doc["lag"], doc["dlq"]) == (3, 2, 1, 1)
    assert doc["rates"] == {"in_per_s": 0.0, "out_per_s": 0.0}  # nothing moved while sampling
    assert doc["consumers"][0]["name"] == "consumer-0"
    assert doc["consumers"][0]["pending"] == 2


async def test_pipeline_many_cameras_all_capture_at_once(stack: Stack, clip: Path) -> None:
    """More cameras than a default thread pool has threads (6 on 2 cores): every one of
    them captures at the same time, and SIGTERM still drains and exits 0."""
    cams = [{"id": f"cam{i}", "url": f"file://{clip}?loop=1"} for i in range(12)]
    edge = edge_agent(stack, cams, stack.workdir / "edge.log")
    try:

        async def every_camera_announced() -> bool:
            assert edge.running(), edge.text()[-3000:]
            announced = [e for e in edge.events("chunk") if e.get("outcome") == "announced"]
            return {e["camera_id"] for e in announced} == {c["id"] for c in cams}

        await eventually(every_camera_announced, 45, "a chunk from each of 12 cameras")
        assert edge.terminate(timeout=60) == 0, edge.text()[-3000:]
    finally:
        edge.kill()
