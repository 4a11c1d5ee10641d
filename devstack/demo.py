"""``make demo``: the whole pipeline for about a minute on a local stack, then a summary.

Starts redis-server, SeaweedFS S3 and a GStreamer RTSP camera (live test
pattern) plus a file-replay camera, runs ``edge-agent run`` and ``cloud-ingest
run`` (local Ray) as real processes, stops the edge with SIGTERM, lets the cloud
drain, prints what happened to every chunk, writes a report (``report.html`` in the
run's work directory, ``.stack/demo-*/``: coverage timeline, latency histograms, filter
verdicts, closed windows, the summary) and shuts everything down.

Environment: ``DEMO_SECONDS`` (default 60); ``CAMERA_URL`` (rtsp://…, http://…
or file://…) feeds a real camera instead of the synthetic ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from botocore.exceptions import ClientError

from devstack import report
from devstack.daemons import Daemon, cloud_ingest, edge_agent
from devstack.media import make_clip
from devstack.s3 import S3
from devstack.servers import RedisServer, RtspServer, SeaweedS3
from shared.keys import OPEN_WINDOWS, handoff_stream
from shared.queue import status

ROOT = Path(__file__).resolve().parent.parent
SITE = "demo-site"
PROGRESS_S = 5.0
SECRET = "demo-signing-key-not-for-production"  # noqa: S105 - demo stack only
# SeaweedFS without -s3.config accepts any credentials; the clients still need some.
AWS = {
    "AWS_ACCESS_KEY_ID": "demo",
    "AWS_SECRET_ACCESS_KEY": "demo-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def cameras(work: Path, stack: ExitStack) -> list[dict[str, str]]:
    url = os.environ.get("CAMERA_URL")
    if url:
        return [{"id": "camera", "url": url}]
    rtsp = RtspServer(work, {"live": None}, width=640, height=360)
    rtsp.start()
    stack.callback(rtsp.stop)
    clip = make_clip(work / "replay.mp4", 20, width=640, height=360, audio=True)
    return [
        {"id": "rtsp-live", "url": rtsp.url("live")},
        {"id": "replay", "url": f"file://{clip}?loop=1"},
    ]


def environment(
    redis: RedisServer, s3: SeaweedS3, cams: list[dict[str, str]], work: Path
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_", "INGEST_"))}
    env.pop("RAY_ADDRESS", None)  # local Ray, started by cloud-ingest itself
    env.update(
        {
            **AWS,
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            "EDGE_DEVICE_ID": "demo-box-1",
            "EDGE_SITE_ID": SITE,
            "EDGE_CAMERAS": json.dumps(cams),
            "EDGE_SEGMENT_SECONDS": "4",
            "EDGE_SPOOL_DIR": str(work / "spool"),
            "EDGE_S3_ENDPOINT_URL": s3.endpoint,
            "EDGE_S3_BUCKET": "raw",
            "EDGE_REDIS_URL": redis.url,
            "EDGE_SIGNING_KEY_ID": "demo-key",
            "EDGE_SIGNING_KEY": SECRET,
            "EDGE_LOG_FORMAT": "json",
            "INGEST_REDIS_URL": redis.url,
            "INGEST_S3_ENDPOINT_URL": s3.endpoint,
            "INGEST_OUTPUT_BUCKET": "processed",
            "INGEST_RAW_BUCKET": "raw",
            "INGEST_CONSUMERS": "2",
            "INGEST_ACTOR_CPUS": "0.5",
            "INGEST_VISIBILITY_TIMEOUT_S": "30",
            "INGEST_KEYRING": json.dumps({"demo-key": SECRET}),
            "INGEST_LOG_FORMAT": "json",
            # Scene windows of 20 s over both views; the last ones close 15 s after the
            # edge stops (their footage ends mid-window: by timeout, with its seconds).
            "INGEST_SITE_CAMERAS": json.dumps({SITE: [c["id"] for c in cams]}),
            "INGEST_WINDOW_S": "20",
            "INGEST_WINDOW_TIMEOUT_S": "15",
        }
    )
    return env


async def make_buckets(s3: SeaweedS3) -> None:
    async with S3(s3.endpoint) as client:
        for bucket in ("raw", "processed"):
            await client.client.create_bucket(Bucket=bucket)


async def processed(s3: SeaweedS3) -> list[dict[str, Any]]:
    async with S3(s3.endpoint) as client:
        return await client.records("processed")


async def queue(redis: RedisServer) -> dict[str, Any]:
    client = aioredis.from_url(redis.url)
    try:
        st = await status(client, "chunks", "ingest")
    finally:
        await client.aclose()
    return {"length": st.length, "pending": st.pending, "dlq": st.dlq}


def run(work: Path, seconds: float) -> int:
    os.environ.update(AWS)
    with ExitStack() as stack:
        redis = RedisServer(work, aof=True)
        redis.start()
        stack.callback(redis.stop)
        s3 = SeaweedS3(work)
        s3.start()
        stack.callback(s3.stop)
        asyncio.run(make_buckets(s3))
        cams = cameras(work, stack)
        env = environment(redis, s3, cams, work)
        say(f"stack up: redis {redis.url}, S3 {s3.endpoint}, cameras {[c['url'] for c in cams]}")
        t0 = time.monotonic()
        since = datetime.now(UTC)
        cloud = cloud_ingest(env, work / "cloud-ingest.log")
        stack.callback(cloud.kill)
        edge = edge_agent(env, work / "edge-agent.log")
        stack.callback(edge.kill)
        say(f"edge-agent and cloud-ingest running for {seconds:.0f}s (logs in {work})")
        _watch(edge, cloud, t0, seconds)
        say("SIGTERM edge-agent (closes open chunks, drains uploads)")
        edge_rc = edge.terminate()
        until = datetime.now(UTC)
        announced = len(edge.events("chunk"))
        _wait_processed(s3, redis, announced, edge, cloud, t0, timeout=120)
        say("waiting for the last scene windows to close and be handed off")
        _wait_windows(redis, timeout=90)
        say("SIGTERM cloud-ingest (finishes in-flight chunks, acks)")
        cloud_rc = cloud.terminate()
        got = asyncio.run(collect(redis.url, s3.endpoint, "processed"))
        rc, lines = summary(work, edge, cloud, got, edge_rc, cloud_rc)
        say("auditing coverage (cloud-ingest coverage) and writing the report")
        # From the first chunk of any camera to the last: the stack's own start-up is no
        # camera's to explain (a camera whose first chunk came later shows that as such).
        starts = [datetime.fromisoformat(r["manifest"]["start_time"]) for r in got.records]
        ends = [datetime.fromisoformat(r["manifest"]["end_time"]) for r in got.records]
        if starts:
            since, until = min(starts), max(ends)
        doc = coverage(env, SITE, since, until, work / "coverage.png")
        page = report.write(
            work,
            report.ReportInput(
                title=f"make demo: {work.name} ({seconds:.0f} s, {len(cams)} cameras)",
                summary=lines,
                records=got.records,
                windows=got.windows,
                coverage=doc,
                coverage_png=work / "coverage.png",
            ),
        )
        print(f"report: {page}")
        return rc


def progress(t0: float, edge: Daemon, cloud: Daemon) -> str:
    """One line: chunks announced (the edge's log) and processed (the cloud's) per camera."""

    def per_camera(events: list[dict[str, Any]], outcome: str) -> str:
        counts = Counter(e["camera_id"] for e in events if e.get("outcome") == outcome)
        return " ".join(f"{c}={n}" for c, n in sorted(counts.items())) or "none"

    return (
        f"t={time.monotonic() - t0:.0f}s announced {per_camera(edge.events('chunk'), 'announced')}"
        f" processed {per_camera(cloud.events('chunk'), 'processed')}"
    )


def _watch(edge: Daemon, cloud: Daemon, t0: float, seconds: float) -> None:
    deadline = t0 + seconds
    while time.monotonic() < deadline:
        if not edge.running() or not cloud.running():
            say("a daemon exited early; see its log")
            return
        time.sleep(min(PROGRESS_S, max(0.1, deadline - time.monotonic())))
        say(progress(t0, edge, cloud))


def _wait_processed(
    s3: SeaweedS3,
    redis: RedisServer,
    announced: int,
    edge: Daemon,
    cloud: Daemon,
    t0: float,
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    said = time.monotonic()
    while time.monotonic() < deadline:
        q = asyncio.run(queue(redis))
        if len(asyncio.run(processed(s3))) + q["dlq"] >= announced and q["pending"] == 0:
            return
        if time.monotonic() - said >= PROGRESS_S:
            said = time.monotonic()
            say(progress(t0, edge, cloud))
        time.sleep(1)


async def windows_left(redis: RedisServer) -> int:
    """Windows still open plus closed ones not yet handed off."""
    client = aioredis.from_url(redis.url)
    try:
        # A handed-off window's entry is acknowledged and deleted: what is left is not.
        left = int(await client.zcard(OPEN_WINDOWS))
        left += int(await client.xlen(handoff_stream("chunks")))
    finally:
        await client.aclose()
    return left


def _wait_windows(redis: RedisServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and asyncio.run(windows_left(redis)):
        time.sleep(1)


@dataclass(frozen=True, slots=True)
class Collected:
    """What the run left behind: the done records, the queue, the windows handed off."""

    records: list[dict[str, Any]]
    queue: dict[str, Any]
    windows: list[report.Window]


async def collect(
    redis_url: str,
    s3_endpoint: str,
    bucket: str,
    stream: str = "chunks",
    group: str = "ingest",
    windows_stream: str = "windows.closed",
) -> Collected:
    """The records from the output bucket, the queue's state, and every window revision
    from the hand-off's stream sink (INGEST_HANDOFF_STREAM) with its MCAP's size."""
    client = aioredis.from_url(redis_url)
    try:
        st = await status(client, stream, group)
        entries: Any = await client.xrange(windows_stream)
    finally:
        await client.aclose()
    async with S3(s3_endpoint) as s3:
        records = await s3.records(bucket)
        windows = []
        for _, fields in entries:
            doc = json.loads(fields[b"window"])
            windows.append(
                report.Window(
                    revision_id=doc["revision_id"],
                    closed_because=doc["closed_because"],
                    start=int(doc["start"]),
                    end=int(doc["end"]),
                    mcap_key=doc["mcap_key"],
                    mcap_bytes=await _size(s3, bucket, doc["mcap_key"]),
                    cameras={
                        c["camera_id"]: {
                            k: float(c[k])
                            for k in ("accepted_s", "rejected_s", "gap_s", "unexplained_s")
                        }
                        for c in doc["cameras"]
                    },
                )
            )
    queue = {"length": st.length, "pending": st.pending, "dlq": st.dlq}
    return Collected(records, queue, sorted(windows, key=lambda w: w.revision_id))


async def _size(s3: S3, bucket: str, key: str) -> int | None:
    try:
        head = await s3.client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return int(head["ContentLength"])


def coverage(
    env: dict[str, str], site: str, since: datetime, until: datetime, png: Path
) -> dict[str, Any]:
    """``cloud-ingest coverage --json --plot``: the audit's document; the timeline in ``png``."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cloud_ingest",
            "coverage",
            "--site",
            site,
            "--since",
            since.isoformat(),
            "--until",
            until.isoformat(),
            "--json",
            "--plot",
            str(png),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"cloud-ingest coverage exited {result.returncode}: {result.stderr}")
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def summary_lines(
    edge: Daemon,
    cloud: Daemon,
    records: list[dict[str, Any]],
    q: dict[str, Any],
    edge_rc: int,
    cloud_rc: int,
) -> tuple[list[tuple[str, Any]], bool]:
    """The summary's lines, and whether every captured chunk was processed."""
    stopped = (edge.events("agent.stopped") or [{}])[-1]
    chunks = [c for c in edge.events("chunk") if c.get("outcome") == "announced"]
    lat = report.latencies(records)
    edge_lat = [c["latency_s"] for c in chunks]
    e2e = lat[report.CLOSED_PROCESSED]
    gaps = [c for c in chunks if c["discontinuity"]]
    accepted = [r for r in records if r["status"] == "accepted"]
    rejected = Counter(r["reason"] for r in records if r["status"] == "rejected")
    captured = stopped.get("chunks_written", 0)
    pct = report.percentile
    lines: list[tuple[str, Any]] = [
        ("chunks captured", captured),
        ("chunks uploaded", stopped.get("chunks_uploaded", 0)),
        ("chunks announced", stopped.get("chunks_announced", 0)),
        ("chunks processed", len(records)),
        (
            "  accepted (frames in shards)",
            f"{len(accepted)} ({sum(r['shard']['frames'] for r in accepted)})",
        ),
        (
            "  rejected by a filter",
            ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items())) or "0",
        ),
        ("chunks dead-lettered", q["dlq"]),
        ("left pending / in stream", f"{q['pending']} / {q['length']}"),
        ("frames processed", sum(r["manifest"]["frame_count"] for r in records)),
        ("bytes processed", sum(r["manifest"]["size_bytes"] for r in records)),
        ("gaps flagged", len(gaps)),
        (
            "chunk closed → announced p50/p99 s",
            f"{pct(edge_lat, 0.5):.3f} / {pct(edge_lat, 0.99):.3f}",
        ),
        ("chunk closed → processed p50/p99 s", f"{pct(e2e, 0.5):.3f} / {pct(e2e, 0.99):.3f}"),
        (
            "mean chunk media length s",
            f"{statistics.fmean([c['media_s'] for c in chunks] or [0]):.2f}",
        ),
        ("exit codes edge / cloud", f"{edge_rc} / {cloud_rc}"),
    ]
    closed = _closed(cloud)
    mcaps = {e["revision_id"]: e for e in cloud.events("window.mcap")}
    because = Counter(e["closed_because"] for e in closed)
    lines += [
        ("scene windows closed", len(closed)),
        ("  complete / by timeout", f"{because['complete']} / {because['timeout']}"),
        ("  revisions after the first", sum(1 for e in closed if e["revision"] > 1)),
        ("  MCAPs written (bytes, write s)", len(mcaps)),
    ]
    ok = (
        captured > 0
        and bool(closed)
        and all(f"{e['window_id']}-r{e['revision']}" in mcaps for e in closed)
        and len(records) == captured
        and q["dlq"] == 0
        and q["pending"] == 0
        and edge_rc == 0
        and cloud_rc == 0
    )
    return lines, ok


def _closed(cloud: Daemon) -> list[dict[str, Any]]:
    return sorted(cloud.events("window.closed"), key=lambda e: (e["window_id"], e["revision"]))


def summary(
    work: Path, edge: Daemon, cloud: Daemon, got: Collected, edge_rc: int, cloud_rc: int
) -> tuple[int, list[tuple[str, Any]]]:
    """Prints the summary; returns the exit status (0: every captured chunk was processed)
    and the summary's lines."""
    lines, ok = summary_lines(edge, cloud, got.records, got.queue, edge_rc, cloud_rc)
    mcaps = {e["revision_id"]: e for e in cloud.events("window.mcap")}
    print("\n=== demo summary ===")
    for name, value in lines:
        print(f"{name:<38} {value}")
    for e in _closed(cloud):
        rid = f"{e['window_id']}-r{e['revision']}"
        m = mcaps.get(rid, {})
        print(
            f"  window {rid:<28} {e['closed_because']:<8} {e['mcap_key']}"
            f"  {m.get('bytes', '?')} B  {m.get('write_s', '?')} s"
        )
    print(
        "result: "
        + ("every captured chunk was processed" if ok else "NOT every chunk was processed")
    )
    print(f"logs: {work}/edge-agent.log, {work}/cloud-ingest.log")
    return (0 if ok else 1), lines


def main() -> int:
    seconds = float(os.environ.get("DEMO_SECONDS", "60"))
    work = ROOT / ".stack" / time.strftime("demo-%Y%m%dT%H%M%S")
    work.mkdir(parents=True)
    try:
        return run(work, seconds)
    finally:
        for data in ("spool",):
            shutil.rmtree(work / data, ignore_errors=True)
        for d in work.glob("seaweed-*"):
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
