"""The coverage audit on real servers: a hand-made bucket with a hole nobody declared, a
mixed fleet of version 1 and version 2 agents, and a live run through kill -9, a camera
outage and spool evictions in which every second of every camera is accounted for."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from devstack.s3 import S3
from devstack.servers import RedisServer, RtspServer, SeaweedS3, free_port
from edge_agent.segmenter import ClosedChunk
from shared.keys import chunk_key, coverage_index_key, manifest_key
from shared.queue import ensure_group
from tests.support import (
    BASE_TIME,
    Edge,
    Stack,
    cloud_ingest,
    edge_agent,
    eventually,
    report_figures,
)

ROOT = Path(__file__).resolve().parent.parent


def coverage(stack: Stack, *args: str, **env: str) -> dict[str, Any]:
    """``cloud-ingest coverage --json`` as an operator runs it."""
    out = subprocess.run(
        [sys.executable, "-m", "cloud_ingest", "coverage", *args, "--json"],
        env=stack.ingest_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout))


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def by_camera(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["camera_id"]: c for c in doc["cameras"]}


def spans(cam: dict[str, Any], kind: str) -> list[tuple[float, float, str | None]]:
    base = BASE_TIME.timestamp()
    return [
        (round(ts(i["start"]) - base, 3), round(ts(i["end"]) - base, 3), i["cause"])
        for i in cam["intervals"]
        if i["kind"] == kind
    ]


async def test_coverage_reports_an_undeclared_hole_exactly_and_reads_a_mixed_fleet(
    stack: Stack, edge: Edge, chunks: list[ClosedChunk], tmp_path: Path
) -> None:
    """cam1 (a version 2 agent): seq 3 never reached the bucket and nothing declared it:
    unexplained, its exact two seconds. Its seq 5 declares one second of camera outage.
    cam2 (a version 1 agent, not upgraded yet): a declared gap without a cause. First from
    the manifests alone (nothing processed: pending), then from the consumers' index."""

    def start(offset: float) -> datetime:
        return BASE_TIME + timedelta(seconds=offset)

    for seq, offset in [(0, 0), (1, 2), (2, 4), (4, 8)]:
        await edge.send(chunks[seq % 3], seq, start_time=start(offset), sidecar=True)
    await edge.send(
        chunks[2],
        5,
        start_time=start(11),
        sidecar=True,
        discontinuity=True,
        gap_before_s=1.0,
        gap_cause="camera_outage",
    )
    for seq, offset in [(0, 0), (1, 2), (2, 4)]:
        await edge.send(
            chunks[seq],
            seq,
            camera_id="cam2",
            start_time=start(offset),
            sidecar=True,
            schema_version=1,
        )
    await edge.send(
        chunks[0],
        3,
        camera_id="cam2",
        start_time=start(9),
        sidecar=True,
        schema_version=1,
        discontinuity=True,
        gap_before_s=3.0,
    )
    # Not evidence: a sidecar that is not JSON, one signed with a key the cloud does not
    # hold, and a chunk whose manifest never came (all past the range: no seconds).
    for seq, sidecar in [(6, b"not json"), (7, None)]:
        key = chunk_key("raw", "site-1", "cam1", start(20 + seq), seq)
        await edge.s3.put(stack.raw_bucket, key, b"")
        if sidecar is not None:
            await edge.s3.put(stack.raw_bucket, manifest_key(key), sidecar)
    await edge.send(
        chunks[0], 8, start_time=start(30), sidecar=True, secret="not-our-key", announce=False
    )
    # Signed with our key, but not where its own fields put it (a copy, or a device naming
    # another chunk's key): the consumers refuse it as foreign_key, and so does the audit.
    foreign = chunk_key("raw", "site-1", "cam1", start(40), 99)
    await edge.send(chunks[0], 9, start_time=start(45), key=foreign, sidecar=True, announce=False)
    window = ("--site", "site-1", "--since", iso(start(0)), "--until", iso(start(13)))
    doc = coverage(stack, *window)
    cam1, cam2 = by_camera(doc)["cam1"], by_camera(doc)["cam2"]
    assert spans(cam1, "unexplained") == [(6.0, 8.0, None)]
    assert spans(cam1, "gap") == [(10.0, 11.0, "camera_outage")]
    assert spans(cam1, "pending") == [(0.0, 6.0, None), (8.0, 10.0, None), (11.0, 13.0, None)]
    assert (cam1["wall_s"], cam1["pending_s"], cam1["gap_s"], cam1["unexplained_s"]) == (
        13.0,
        10.0,
        1.0,
        2.0,
    )
    assert cam1["chunks_from_manifests"] == 5 and cam1["chunks_from_index"] == 0
    assert (cam1["unverified_manifests"], cam1["unannounced_chunks"]) == (3, 1)
    # Version 1: the gap is declared, its cause unknown; nothing after 11 s: unexplained.
    assert spans(cam2, "gap") == [(6.0, 9.0, "unspecified")]
    assert spans(cam2, "unexplained") == [(11.0, 13.0, None)]
    assert cam2["gaps_by_cause"] == {"unspecified": 3.0}
    for cam in (cam1, cam2):
        total = sum(cam[k] for k in ("accepted_s", "rejected_s", "pending_s", "gap_s"))
        total += cam["dead_lettered_s"] + cam["unexplained_s"]
        assert total == pytest.approx(cam["wall_s"], abs=1e-3)
    worst = doc["worst_holes"][0]  # the worst first, whichever camera
    assert (worst["camera_id"], worst["kind"], worst["seconds"]) == ("cam2", "gap", 3.0)
    assert doc["unexplained_s"] == 4.0 and doc["ratio"] == pytest.approx(18 / 26, abs=1e-6)

    # An hour that cannot be merged, first in line: the others are merged all the same.
    await edge.redis.zadd("ingest:cov:dirty", {"ingest:cov:not-an-hour": 0})
    cloud_port = free_port()
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_COVERAGE_FLUSH_S="0",
        INGEST_CONSUMERS="1",
        INGEST_HTTP_BIND=f"127.0.0.1:{cloud_port}",
    )
    try:

        async def media_seconds() -> bool:  # the cloud's live count of the same seconds
            found = _samples(await _metrics(cloud_port), "cloud_ingest_media_seconds_total")
            return sum(found.values()) == pytest.approx(18.0)

        async def indexed() -> bool:
            keys = [
                coverage_index_key("processed", "site-1", c, BASE_TIME) for c in ("cam1", "cam2")
            ]
            listed = set(await edge.s3.keys(stack.out_bucket, "processed/coverage/"))
            if not set(keys) <= listed:
                return False
            docs = [json.loads(await edge.s3.get(stack.out_bucket, k)) for k in keys]
            return [len(d["entries"]) for d in docs] == [5, 4]

        await eventually(indexed, 120, "both camera-hours indexed in S3")
        await eventually(media_seconds, 60, "cloud_ingest_media_seconds_total: 18 s")
    finally:
        cloud.kill()
    assert await edge.redis.xlen("chunks:dlq") == 0  # version 1 and 2 both accepted
    after = by_camera(coverage(stack, *window))
    cam1, cam2 = after["cam1"], after["cam2"]
    assert cam1["chunks_from_index"] == 5 and cam1["chunks_from_manifests"] == 0
    assert cam1["pending_s"] == 0 and cam1["accepted_s"] + cam1["rejected_s"] == 10.0
    assert spans(cam1, "unexplained") == [(6.0, 8.0, None)]
    assert spans(cam1, "gap") == [(10.0, 11.0, "camera_outage")]
    assert cam2["accepted_s"] + cam2["rejected_s"] == 8.0 and cam2["gap_s"] == 3.0
    # Merged and forgotten in Redis; the unmergeable one is still there, tried again.
    assert await edge.redis.zrange("ingest:cov:dirty", 0, -1) == [b"ingest:cov:not-an-hour"]
    # An index object that is not ours to read: that hour is read from its manifests.
    await edge.s3.put(
        stack.out_bucket, coverage_index_key("processed", "site-1", "cam2", BASE_TIME), b"{garbage"
    )
    again = by_camera(coverage(stack, *window))["cam2"]
    assert (again["chunks_from_index"], again["chunks_from_manifests"]) == (0, 4)
    assert again["accepted_s"] + again["rejected_s"] == 8.0 and again["pending_s"] == 0

    png = tmp_path / "coverage.png"
    subprocess.run(  # noqa: ASYNC221 - the CLI as a user runs it
        [sys.executable, "-m", "cloud_ingest", "coverage", *window, "--plot", str(png)],
        env=stack.ingest_env(),
        check=True,
        timeout=120,
        capture_output=True,
        cwd=ROOT,
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_coverage_merge_and_entry_rules() -> None:
    """A verdict outlives a later dead letter (a copy refused afterwards), unless the
    letter is forced (the chunk's record was never written); a requeued letter that was
    processed is the verdict again. Entries not fit to count are refused."""
    from cloud_ingest.coverage import merge, valid_entry

    accepted = {"chunk_id": "a", "kind": "accepted", "start": 0.0, "end": 1.0}
    letter = {**accepted, "kind": "dead_lettered", "reason": "max_deliveries"}
    assert merge(accepted, letter) is accepted
    assert merge(accepted, {**letter, "forced": True})["kind"] == "dead_lettered"
    assert merge(letter, accepted) is accepted
    assert valid_entry(accepted)
    for bad in (
        {**accepted, "kind": "stolen"},
        {**accepted, "start": float("nan")},
        {**accepted, "end": "soon"},
        {**accepted, "gap_before_s": -1.0},
        {k: v for k, v in accepted.items() if k != "start"},
        ["not", "a", "dict"],
    ):
        assert not valid_entry(bad), bad


# -- a live run -------------------------------------------------------------------------


async def _metrics(port: int) -> str:
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            return await resp.text()
    except (aiohttp.ClientError, OSError):
        return ""


def _samples(text: str, name: str) -> dict[str, float]:
    """{labels: value} of one metric family's samples."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line[len(name) :].rpartition(" ")
            out[labels] = float(value)
    return out


async def _announced(client: aioredis.Redis, camera: str) -> list[dict[str, Any]]:
    out = {}
    for _, fields in await client.xrange("chunks"):
        m = json.loads(fields[b"manifest"])
        if m["camera_id"] == camera:
            out[m["seq"]] = m
    return [out[s] for s in sorted(out)]


@pytest.mark.timeout(480)
async def test_coverage_accounts_for_every_second_through_kill9_outage_and_eviction(
    tmp_path: Path, ray_address: str
) -> None:
    """cam1 and cam2 on an agent that is killed -9 and restarted; cam3 on an agent not
    upgraded yet (EDGE_MANIFEST_SCHEMA_VERSION=1: gaps without causes). All three cameras
    go out (the RTSP server killed and started again), then S3 goes down while the
    spools are full enough to evict. The audit explains every second of every camera,
    each gap by the cause its agent gave, and agrees with the agent's own counters."""
    for sub in ("redis", "s3", "rtsp"):
        (tmp_path / sub).mkdir()
    redis = RedisServer(tmp_path / "redis", aof=True)
    redis.start()
    s3 = SeaweedS3(tmp_path / "s3")
    s3.start()
    rtsp = RtspServer(tmp_path / "rtsp", {"cam1": None, "cam2": None, "cam3": None})
    rtsp.start()
    try:
        await _live_run(tmp_path, ray_address, redis, s3, rtsp)
    finally:
        rtsp.stop()
        s3.kill()
        redis.stop()


async def _live_run(
    tmp_path: Path, ray_address: str, redis: RedisServer, s3: SeaweedS3, rtsp: RtspServer
) -> None:
    stack = Stack(redis.url, s3.endpoint, ray_address, "raw", "out", tmp_path)
    client = aioredis.from_url(redis.url)
    await ensure_group(client, "chunks", "ingest")
    async with S3(s3.endpoint) as helper:
        for b in ("raw", "out"):
            await helper.client.create_bucket(Bucket=b)
    port, old_port = free_port(), free_port()
    cams = [{"id": c, "url": rtsp.url(c)} for c in ("cam1", "cam2")]
    env = {
        "EDGE_SEGMENT_SECONDS": "1",
        "EDGE_HTTP_BIND": f"127.0.0.1:{port}",
        "EDGE_RECONNECT_MAX_S": "1",
        "EDGE_WATCHDOG_S": "2",
        "EDGE_CAMERA_TIMEOUT_S": "2",
        "EDGE_SPOOL_MAX_BYTES": "80000",
    }
    old_env = {
        **env,
        "EDGE_HTTP_BIND": f"127.0.0.1:{old_port}",
        "EDGE_SPOOL_DIR": str(tmp_path / "old-spool"),
        "EDGE_MANIFEST_SCHEMA_VERSION": "1",
    }
    everyone = ("cam1", "cam2", "cam3")

    async def announced(n: int) -> bool:
        counts = [len(await _announced(client, c)) for c in everyone]
        return min(counts) >= n

    async def metric(name: str, at_least: float, on: int = port) -> bool:
        return sum(_samples(await _metrics(on), name).values()) >= at_least

    old = edge_agent(
        stack, [{"id": "cam3", "url": rtsp.url("cam3")}], tmp_path / "old.log", **old_env
    )
    edge = edge_agent(stack, cams, tmp_path / "edge1.log", **env)
    try:
        await eventually(lambda: announced(3), 90, "chunks before the kill")
        edge.kill()  # SIGKILL: the agent's restart is a gap, with its cause
        await asyncio.sleep(1)  # the gap itself, not a wait for a condition
        edge = edge_agent(stack, cams, tmp_path / "edge2.log", **env)
        await eventually(lambda: announced(6), 90, "chunks after the restart")
        rtsp.kill()  # every camera out
        await eventually(
            lambda: metric("edge_agent_camera_errors_total", 2), 60, "the outage to be seen"
        )
        rtsp.start()
        await eventually(lambda: announced(9), 90, "chunks after the outage")
        s3.kill()  # the spools fill and evict while S3 is down
        evicted = "edge_agent_chunks_evicted_total"
        await eventually(lambda: metric(evicted, 4), 90, "evictions")
        await eventually(lambda: metric(evicted, 2, old_port), 90, "evictions (old agent)")
        s3.start()
        await eventually(lambda: announced(14), 120, "the backlog and new chunks")
        edge_metrics = await _metrics(port)
        assert edge.terminate() == 0 and old.terminate() == 0
    finally:
        edge.kill()
        old.kill()
    cloud = cloud_ingest(
        stack,
        tmp_path / "cloud.log",
        INGEST_COVERAGE_FLUSH_S="0",
        INGEST_CONSUMERS="1",
        INGEST_HTTP_BIND=f"127.0.0.1:{free_port()}",
    )
    try:
        streams = {c: await _announced(client, c) for c in everyone}
        total = sum(len(v) for v in streams.values())

        async def processed() -> bool:  # acknowledged entries leave the stream
            return total > 0 and await client.xlen("chunks") == 0

        await eventually(processed, 180, "every chunk processed")
        await eventually(
            lambda: _zero(client.zcard("ingest:cov:dirty")), 60, "the index merged into S3"
        )
        dead = await client.xlen("chunks:dlq")
    finally:
        cloud.kill()
        await client.aclose()
    assert dead == 0  # version 1 and version 2 manifests alike
    assert {m["schema_version"] for m in streams["cam3"]} == {1}
    assert all("gap_cause" not in m for m in streams["cam3"])
    assert {m["schema_version"] for c in ("cam1", "cam2") for m in streams[c]} == {2}
    table = {}
    for camera, ms in streams.items():
        since, until = ms[0]["start_time"], ms[-1]["end_time"]
        doc = coverage(
            stack, "--site", "site-1", "--camera", camera, "--since", since, "--until", until
        )
        [cam] = doc["cameras"]
        table[camera] = {
            k: cam[k]
            for k in (
                "wall_s",
                "accepted_s",
                "rejected_s",
                "pending_s",
                "gap_s",
                "dead_lettered_s",
                "unexplained_s",
                "ratio",
                "gaps_by_cause",
                "chunks_from_index",
            )
        }
        assert cam["unexplained_s"] <= 1 / 15, cam["intervals"]  # to one frame interval
        assert cam["pending_s"] == 0 and cam["dead_lettered_s"] == 0
        causes = cam["gaps_by_cause"]
        if camera == "cam3":  # version 1: the outage has no cause; an eviction is inferred
            assert set(causes) == {"unspecified", "eviction"}, causes
            continue
        assert {"agent_restart", "eviction"} <= set(causes), causes
        assert causes.keys() & {"camera_outage", "reconnect"}, causes
        assert "unspecified" not in causes
        # The edge's own counters (its second run: every gap came after its start).
        gaps = _samples(edge_metrics, "edge_agent_gap_seconds_total")
        for cause, seconds in causes.items():
            counted = gaps.get(f'{{camera="{camera}",cause="{cause}"}}', 0.0)
            assert counted == pytest.approx(seconds, abs=0.25), (cause, gaps)
    report_figures("coverage_live", table)


async def _zero(call: Any) -> bool:
    return int(await call) == 0
