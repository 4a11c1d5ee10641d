"""Scene windows and their hand-off, through the real consumers: a downstream stream, a
signed webhook (a real aiohttp server) and Ray jobs through the Job Submission API."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow.parquet as pq

from devstack.media import make_clip
from devstack.servers import free_port
from edge_agent.segmenter import ClosedChunk
from tests.support import (
    BASE_TIME,
    S3,
    Edge,
    Stack,
    cloud_ingest,
    eventually,
    ingest_settings,
    segment_file,
    strict_json,
)

SECRET = "webhook-secret"
ENTRYPOINT = """python -c "print('reconstruct {revision_id} {mcap_key} from {chunk_ids}')" """


async def send_window(edge: Edge, chunks: list[ClosedChunk], cameras: list[str]) -> None:
    """Five 2 s chunks per camera: exactly one 10 s window starting at BASE_TIME."""
    for camera in cameras:
        for seq in range(5):
            await edge.send(chunks[seq % len(chunks)], seq, camera_id=camera)


async def downstream(edge: Edge) -> list[dict[str, Any]]:
    entries = await edge.redis.xrange("windows.closed")
    return [json.loads(f[b"window"]) for _, f in entries]


async def test_handoff_window_closes_when_every_view_arrived(
    stack: Stack,
    s3: S3,
    edge: Edge,
    chunks: list[ClosedChunk],
    webhook: tuple[str, list[dict[str, Any]], list[int]],
) -> None:
    url, received, _ = webhook
    await send_window(edge, chunks, ["cam1", "cam2"])
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_WINDOW_S="10",
        INGEST_WINDOW_TIMEOUT_S="600",
        INGEST_SITE_CAMERAS=json.dumps({"site-1": ["cam1", "cam2"]}),
        INGEST_HANDOFF_SINKS='["stream", "webhook"]',
        INGEST_WEBHOOK_URL=url,
        INGEST_WEBHOOK_SECRET=SECRET,
        INGEST_FILTER_RECENT_CHUNKS="0",
    )
    try:

        async def handed_off() -> bool:
            return len(await downstream(edge)) == 1 and len(received) == 1

        await eventually(handed_off, 90, "the window handed off to both sinks")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    [window] = await downstream(edge)
    assert window["closed_because"] == "complete"
    assert window["revision"] == 1 and window["revision_id"] == f"{window['window_id']}-r1"
    assert window["supersedes"] is None
    seconds = {c["camera_id"]: (c["accepted_s"], c["unexplained_s"]) for c in window["cameras"]}
    assert seconds == {"cam1": (10.0, 0.0), "cam2": (10.0, 0.0)}
    assert window["missing_cameras"] == []
    assert {c: len(v) for c, v in window["chunks"].items()} == {"cam1": 5, "cam2": 5}
    [call] = received
    body, headers = call["body"], call["headers"]
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Signature"] == f"sha256={expected}"
    payload = json.loads(body)
    assert headers["Idempotency-Key"] == window["revision_id"] == payload["revision_id"]
    # Presigned GETs that work without credentials: the MCAP and every raw chunk.
    mcap = await s3.get(stack.out_bucket, window["mcap_key"])
    assert (
        payload["urls"]["expires_in_s"] == 86400
        and "X-Amz-Expires=86400" in payload["urls"]["mcap"]
    )
    async with aiohttp.ClientSession() as http:
        async with http.get(payload["urls"]["mcap"]) as resp:
            assert resp.status == 200 and await resp.read() == mcap
        first = window["chunks"]["cam2"][0]
        async with http.get(payload["urls"]["chunks"]["cam2"][first["chunk_id"]]) as resp:
            assert resp.status == 200
            assert await resp.read() == await s3.get(stack.raw_bucket, first["key"])
    assert payload["mcap"]["sha256"] == hashlib.sha256(mcap).hexdigest()
    done = await edge.redis.hgetall(f"ingest:handoff:{window['revision_id']}")
    assert set(done) == {b"mcap", b"stream", b"webhook"}
    assert await edge.redis.xlen("chunks:windows") == 0  # hand-off acknowledged and deleted


async def test_handoff_window_closes_on_timeout_with_a_missing_view(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    await send_window(edge, chunks, ["cam1"])
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_WINDOW_S="10",
        INGEST_WINDOW_TIMEOUT_S="8",
        INGEST_SITE_CAMERAS=json.dumps({"site-1": ["cam1", "cam2"]}),
        INGEST_FILTER_RECENT_CHUNKS="0",
    )
    try:

        async def closed() -> bool:
            return len(await downstream(edge)) == 1

        await eventually(closed, 90, "the window to time out")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    [window] = await downstream(edge)
    assert window["closed_because"] == "timeout"
    cameras = {c["camera_id"]: c for c in window["cameras"]}
    assert cameras["cam1"]["accepted_s"] == 10.0 and cameras["cam1"]["accounted"]
    assert cameras["cam2"]["unexplained_s"] == 10.0 and not cameras["cam2"]["accounted"]
    assert window["missing_cameras"] == ["cam2"] and list(window["chunks"]) == ["cam1"]
    assert len(window["chunks"]["cam1"]) == 5


async def test_handoff_submits_one_ray_job_per_window(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk], ray_cluster: tuple[str, str]
) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    dashboard = ray_cluster[1]
    await send_window(edge, chunks, ["cam1"])
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_WINDOW_S="10",
        INGEST_WINDOW_TIMEOUT_S="600",
        INGEST_SITE_CAMERAS=json.dumps({"site-1": ["cam1"]}),
        INGEST_HANDOFF_SINKS='["ray_job"]',
        INGEST_JOB_ADDRESS=dashboard,
        INGEST_FILTER_RECENT_CHUNKS="0",
        INGEST_JOB_ENTRYPOINT=ENTRYPOINT,
    )
    client = JobSubmissionClient(dashboard)
    window_id = f"site-1-{int(BASE_TIME.timestamp())}-r1"
    submission = f"window-{window_id}"
    try:

        async def succeeded() -> bool:
            jobs = {j.submission_id: j.status for j in client.list_jobs()}
            return jobs.get(submission) == JobStatus.SUCCEEDED

        await eventually(succeeded, 120, "the reconstruction job to succeed")

        async def tracked() -> bool:  # the deployment followed the job to its end
            return bool(await edge.redis.hget("ingest:jobs", submission) == b"SUCCEEDED")

        await eventually(tracked, 60, "the job's final status recorded")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    logs = client.get_job_logs(submission)
    [line] = [ln for ln in logs.splitlines() if ln.startswith(f"reconstruct {window_id} ")]
    mcap_key = f"processed/windows/site-1/{int(BASE_TIME.timestamp())}/{window_id}.mcap"
    assert line.split()[2] == mcap_key and await s3.get(stack.out_bucket, mcap_key)
    assert len(line.rsplit(" ", 1)[1].split(",")) == 5  # the window's five chunk ids
    ours = [j for j in client.list_jobs() if (j.submission_id or "").startswith("window-")]
    assert [j.submission_id for j in ours] == [submission]  # one job per window, once
    done = await edge.redis.hgetall(f"ingest:handoff:{window_id}")
    assert done[b"ray_job"] == submission.encode() and set(done) == {b"mcap", b"ray_job"}
    assert await edge.redis.hget("ingest:jobs", submission) == b"SUCCEEDED"
    assert not await edge.redis.sismember("ingest:jobs:active", submission)


async def test_handoff_respects_the_concurrent_job_limit(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk], ray_cluster: tuple[str, str]
) -> None:
    """Two windows, INGEST_JOB_MAX_CONCURRENT=1, jobs that take 4 s: the second job is only
    submitted once the first has finished."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    dashboard = ray_cluster[1]
    for seq in range(10):  # seqs 0-4: window 04:00:00, seqs 5-9: window 04:00:10
        await edge.send(chunks[seq % len(chunks)], seq, camera_id="cam7", site_id="site-9")
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_WINDOW_S="10",
        INGEST_WINDOW_TIMEOUT_S="600",
        INGEST_SITE_CAMERAS=json.dumps({"site-9": ["cam7"]}),
        INGEST_HANDOFF_SINKS='["ray_job"]',
        INGEST_JOB_ADDRESS=dashboard,
        INGEST_FILTER_RECENT_CHUNKS="0",
        INGEST_JOB_MAX_CONCURRENT="1",
        INGEST_HANDOFF_CLAIM_S="3",  # the busy window is tried again this soon
        INGEST_JOB_ENTRYPOINT="sleep 4 # {window_id}",
    )
    client = JobSubmissionClient(dashboard)

    def ours() -> list[Any]:
        return sorted(
            (
                j
                for j in client.list_jobs()
                if (j.submission_id or "").startswith("window-site-9-")
                and "sleep 4" in j.entrypoint
            ),
            key=lambda j: j.start_time or 0,
        )

    try:

        async def both_done() -> bool:
            jobs = ours()
            return len(jobs) == 2 and all(j.status == JobStatus.SUCCEEDED for j in jobs)

        await eventually(both_done, 150, "both window jobs to succeed")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    first, second = ours()
    assert second.start_time >= first.end_time  # never two at once


async def test_handoff_two_consumers_submitting_at_once_respect_the_job_limit(
    stack: Stack, s3: S3, edge: Edge, ray_cluster: tuple[str, str]
) -> None:
    """Two consumers hand off a window each at the same moment, INGEST_JOB_MAX_CONCURRENT=1:
    one job is submitted and the other consumer is told the sink is busy (without a lock
    around "count the running jobs, then submit", both saw a free slot: CI caught two
    reconstruction jobs running at once)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from cloud_ingest.handoff import Handoff, SinkBusy
    from cloud_ingest.totals import Tally

    client = JobSubmissionClient(ray_cluster[1])
    live = (JobStatus.PENDING, JobStatus.RUNNING)

    def ours(status: tuple[JobStatus, ...]) -> list[str]:
        return [
            j.submission_id or ""
            for j in client.list_jobs()
            if (j.submission_id or "").startswith("window-") and j.status in status
        ]

    async def idle() -> bool:
        return not ours(live)

    await eventually(idle, 60, "earlier tests' window jobs to finish")
    settings = ingest_settings(
        stack,
        handoff_sinks=["ray_job"],
        job_address=ray_cluster[1],
        job_max_concurrent=1,
        job_entrypoint="sleep 2 # {revision_id}",
    )
    tag = f"race{time.time_ns()}"
    docs = [
        {
            "window_id": f"{tag}-{n}",
            "revision_id": f"{tag}-{n}-r1",
            "revision": 1,
            "mcap_key": f"{tag}/{n}.mcap",
            "site_id": tag,
            "start": n,
            "end": n + 10,
            "chunks": {},
        }
        for n in range(2)
    ]
    handoffs = [Handoff(settings, edge.redis, s3.client, f"c{n}", Tally()) for n in range(2)]
    outcomes = await asyncio.gather(
        *(h._sink_ray_job(d) for h, d in zip(handoffs, docs, strict=True)),
        return_exceptions=True,
    )
    submitted = [o for o in outcomes if isinstance(o, str)]
    busy = [o for o in outcomes if isinstance(o, SinkBusy)]
    assert len(submitted) == 1 and len(busy) == 1, outcomes
    assert [s for s in ours(tuple(JobStatus)) if tag in s] == submitted
    assert await edge.redis.get("ingest:lock:job-submit") is None  # released
    await eventually(idle, 60, "the job to finish")
    for h in handoffs:
        await h.close()


async def test_handoff_every_output_is_strict_json(
    stack: Stack,
    s3: S3,
    edge: Edge,
    chunks: list[ClosedChunk],
    webhook: tuple[str, list[dict[str, Any]], list[int]],
    tmp_path: Path,
) -> None:
    """A window whose chunks include one with a single decodable keyframe (no motion to
    measure): every JSON object written to the output bucket, every shard's scores column,
    the closed window on the downstream stream and the webhook's body parse with a strict
    parser (no NaN, no Infinity); the missing score is null, with the reason beside it."""
    url, received, _ = webhook
    clip = make_clip(tmp_path / "one-keyframe.mp4", 2, gop=30)  # 30 frames, one GOP
    [single] = segment_file(clip, tmp_path / "one-keyframe", 2.0)
    assert single.keyframe_count == 1
    for seq in range(5):
        await edge.send(single if seq == 2 else chunks[seq % len(chunks)], seq)
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_WINDOW_S="10",
        INGEST_WINDOW_TIMEOUT_S="600",
        INGEST_SITE_CAMERAS=json.dumps({"site-1": ["cam1"]}),
        INGEST_HANDOFF_SINKS='["stream", "webhook"]',
        INGEST_WEBHOOK_URL=url,
        INGEST_WEBHOOK_SECRET=SECRET,
        INGEST_FILTER_RECENT_CHUNKS="0",
    )
    try:

        async def handed_off() -> bool:
            return len(await downstream(edge)) == 1 and len(received) == 1

        await eventually(handed_off, 90, "the window handed off to both sinks")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    keys = await s3.keys(stack.out_bucket)
    documents = [await s3.get(stack.out_bucket, k) for k in keys]
    records = [strict_json(await s3.get(stack.out_bucket, k)) for k in keys if "/records/" in k]
    states = [strict_json(d) for k, d in zip(keys, documents, strict=True) if "state.json" in k]
    shards = [pq.read_table(io.BytesIO(d)) for d in documents if d.startswith(b"PAR1")]
    scores = [strict_json(s) for t in shards for s in t.column("scores").to_pylist()]
    windows = [strict_json(f[b"window"]) for _, f in await edge.redis.xrange("windows.closed")]
    bodies = [strict_json(call["body"]) for call in received]
    [one] = [r for r in records if r["manifest"]["seq"] == 2]
    assert len(records) == 5 and len(states) == 1  # the window's state (S3), one MCAP
    assert len(documents) == len(records) + len(states) + len(shards) + 1
    assert len(shards) == 5 and len(windows) == len(bodies) == 1
    assert one["status"] == "accepted" and one["integrity"]["keyframes_decoded"] == 1
    assert one["scores"]["motion"] is None and "one keyframe" in one["score_notes"]["motion"]
    assert {"motion": None} in [{"motion": s["motion"]} for s in scores]
    assert {c["chunk_id"] for c in windows[0]["chunks"]["cam1"]} == {r["chunk_id"] for r in records}


async def test_handoff_a_dashboard_that_never_answers_is_given_up_on_and_retried(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    """The Ray dashboard (Job Submission API) accepts connections and never answers. The
    client has no timeout of its own; each call is given up after INGEST_JOB_API_TIMEOUT_S,
    the retry is logged and counted, the window stays pending (not lost; a reaper tries it
    again), the chunks keep flowing, and the deployment still stops at once."""

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes

    dashboard = await asyncio.start_server(hang, "127.0.0.1", 0)
    address = f"http://127.0.0.1:{dashboard.sockets[0].getsockname()[1]}"
    await send_window(edge, chunks, ["cam1"])
    port = free_port()
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_WINDOW_S="10",
        INGEST_WINDOW_TIMEOUT_S="600",
        INGEST_SITE_CAMERAS=json.dumps({"site-1": ["cam1"]}),
        INGEST_HANDOFF_SINKS='["ray_job"]',
        INGEST_JOB_ADDRESS=address,
        INGEST_JOB_API_TIMEOUT_S="1",
        INGEST_FILTER_RECENT_CHUNKS="0",
        INGEST_HTTP_BIND=f"127.0.0.1:{port}",
    )
    retries = 'cloud_ingest_chunks_total{outcome="handoff_retries"}'
    try:
        async with aiohttp.ClientSession() as http:

            async def retried() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                        page = await resp.text()
                except (aiohttp.ClientError, OSError):
                    return False
                counts = [float(x.split()[-1]) for x in page.splitlines() if x.startswith(retries)]
                return bool(counts) and counts[0] >= 1

            await eventually(retried, 60, "a given-up hand-off attempt")
        assert len(await s3.records(stack.out_bucket)) == 5
        asked = time.monotonic()
        assert cloud.terminate() == 0
        stopped_in = time.monotonic() - asked
    finally:
        cloud.kill()
        dashboard.close()
    [group] = await edge.redis.xinfo_groups("chunks:windows")
    assert group["pending"] == 1  # the window waits for its hand-off, nothing lost
    done = await edge.redis.hgetall(f"ingest:handoff:site-1-{int(BASE_TIME.timestamp())}-r1")
    assert b"mcap" in done and b"ray_job" not in done  # the MCAP is written, the job is not
    assert stopped_in < 15
    assert any("Job API call exceeded 1s" in e["error"] for e in cloud.events("handoff.retry"))
