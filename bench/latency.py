"""Latency: frame received at the edge -> manifest in the stream -> outputs written.

A few live 1080p RTSP cameras (the edge_capture clip, one shared mount) run
through the real ``edge-agent run`` (4 s chunks) and the real ``cloud-ingest
run`` (local Ray, 2 consumer actors), both as their own processes on the
session's Redis and S3, on a stream, group and buckets of their own.

* **Edge**, per announced chunk, from the agent's canonical ``chunk`` log line
  (the manifest's ``start_time``, ``media_s`` and the ``entry_id`` XADD returned):
  the chunk's first frame was received at ``start_time`` (UTC wall clock) and
  the chunk cannot be announced before ``start_time + media duration``, so
  ``XADD - start_time`` is frame received -> manifest in the stream for the
  oldest frame of the chunk (target: p99 <= segment + 0.5 s), and
  ``XADD - (start_time + media duration)`` is the part beyond the chunk's own
  length (close, fsync, hash, ledger, upload, sidecar, XADD).
* **Cloud**, per done record: ``processed_at`` (a UTC timestamp the processor
  puts in the record right before writing it, after the Parquet shard) minus
  the XADD time (the stream entry id's milliseconds, also in the record).

Only chunks that started at least ``SETTLE_S`` after the cloud answered
``/readyz`` count, so none waited for Ray to start. The stream length
(unacknowledged entries: acks delete) is sampled every second to show that the
cloud was not backlogged. The duplicate filter is switched off
(``INGEST_FILTER_RECENT_CHUNKS=0``): the clip repeats every 20 s, and rejected
duplicates would skip the preprocessing whose output we time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis

from bench.common import Context, Figure, percentile, tree
from bench.edge_capture import (
    KEY_ID,
    SECRET,
    SEGMENT_S,
    agent_env,
    cameras,
    ensure_bucket,
    epoch,
    looped_clip,
)
from devstack.daemons import Daemon, cloud_ingest, edge_agent
from devstack.s3 import S3
from devstack.servers import free_port

BENCH = "latency"
RAW, OUT = "bench-lat-raw", "bench-lat-out"
SETTLE_S = 5.0  # after /readyz: the actors' first chunk pays for imports and a cold decoder
EDGE_TARGET_S = SEGMENT_S + 0.5


@dataclass
class Plan:
    cameras: int
    seconds: float  # edge running after the cloud is ready
    ray_timeout_s: float = 90.0
    drain_timeout_s: float = 45.0


def plan(ctx: Context) -> Plan:
    return Plan(cameras=2, seconds=16) if ctx.quick else Plan(cameras=4, seconds=60)


def cloud_env(ctx: Context, stream: str, bind: str) -> dict[str, str]:
    env = ctx.env(
        INGEST_REDIS_URL=ctx.redis_url,
        INGEST_S3_ENDPOINT_URL=ctx.s3_endpoint,
        INGEST_STREAM=stream,
        INGEST_HANDOFF_STREAM=f"{stream}:windows",
        INGEST_OUTPUT_BUCKET=OUT,
        INGEST_RAW_BUCKET=RAW,
        INGEST_KEYRING=json.dumps({KEY_ID: SECRET}),
        INGEST_CONSUMERS="2",
        INGEST_ACTOR_CPUS="0.5",
        INGEST_HTTP_BIND=bind,
        INGEST_LOG_FORMAT="json",
        INGEST_FILTER_RECENT_CHUNKS="0",
    )
    env.pop("RAY_ADDRESS", None)  # a local Ray, started by cloud-ingest itself
    return env


def wait_ready(bind: str, cloud: Daemon, timeout: float) -> float:
    """Poll the cloud's /readyz until 200 (an actor answered); returns that moment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not cloud.running():
            raise RuntimeError(f"cloud-ingest exited during start-up; see {cloud.log}")
        try:
            with urllib.request.urlopen(f"http://{bind}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return time.time()
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"cloud-ingest not ready within {timeout:.0f}s; see {cloud.log}")


class Backlog:
    """Samples the stream's length (entries not yet acknowledged) every second."""

    def __init__(self, redis_url: str, stream: str) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.stream = stream
        self.lengths: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            n: Any = self.client.xlen(self.stream)
            self.lengths.append((time.monotonic() - self._t0, int(n)))

    @contextmanager
    def running(self) -> Iterator[Backlog]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self.client.close()


def records(endpoint: str) -> list[dict[str, Any]]:
    async def fetch() -> list[dict[str, Any]]:
        async with S3(endpoint) as s3:
            keys = await s3.keys(OUT, "processed/records/")
            return [json.loads(await s3.get(OUT, k)) for k in keys]

    return asyncio.run(fetch())


def stop_cloud(cloud: Daemon) -> None:
    """SIGTERM (drain), then make sure no Ray process it started outlives it."""
    started = tree(cloud.proc.pid)
    try:
        cloud.terminate(60)
    finally:
        cloud.kill()
        for pid in started[1:]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue


@dataclass
class Sample:
    edge_since_start: list[float] = field(default_factory=list)
    edge_beyond: list[float] = field(default_factory=list)
    cloud: list[float] = field(default_factory=list)
    backlog: list[tuple[float, int]] = field(default_factory=list)
    announced: int = 0
    processed: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


def measure(ctx: Context, p: Plan) -> Sample:
    ensure_bucket(ctx.s3_endpoint, RAW)
    ensure_bucket(ctx.s3_endpoint, OUT)
    work = ctx.work / "latency"
    work.mkdir(parents=True)
    stream = f"bench:latency:{os.getpid()}"
    bind = f"127.0.0.1:{free_port()}"
    cloud = cloud_ingest(cloud_env(ctx, stream, bind), work / "cloud-ingest.log")
    try:
        with cameras(ctx, looped_clip(), p.cameras, shared=True) as feeds:
            env = agent_env(ctx, work, feeds.urls, stream, bucket=RAW)
            edge = edge_agent(env, work / "edge-agent.log")
            try:
                # The edge starts with the cloud, so Ray's start-up (~30 s) is not waited out
                # twice; chunks started before the cloud was ready are left out below.
                ready = wait_ready(bind, cloud, p.ray_timeout_s)
                with Backlog(ctx.redis_url, stream).running() as backlog:
                    time.sleep(SETTLE_S + p.seconds)
                    if edge.terminate(60) != 0:
                        raise RuntimeError(f"edge-agent failed; see {edge.log}")
                    chunks = edge.events("chunk")
                    done = wait_processed(ctx, len(chunks), p.drain_timeout_s)
            finally:
                edge.kill()
    finally:
        stop_cloud(cloud)
    return sample(chunks, done, ready + SETTLE_S, backlog.lengths)


def wait_processed(ctx: Context, announced: int, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    found = records(ctx.s3_endpoint)
    while len(found) < announced and time.monotonic() < deadline:
        time.sleep(1.0)
        found = records(ctx.s3_endpoint)
    return found


def _xadd(entry_id: str) -> float:
    return int(entry_id.split("-")[0]) / 1000


def _counted(start_iso: str, media_s: float, since: float) -> bool:
    """Steady state only: started after the cloud was ready and settled, and a whole
    segment long (the chunks the stop cut short are shorter and so quicker)."""
    return epoch(start_iso) >= since and media_s >= SEGMENT_S - 0.5


def sample(
    chunks: list[dict[str, Any]],
    done: list[dict[str, Any]],
    since: float,
    backlog: list[tuple[float, int]],
) -> Sample:
    out = Sample(backlog=backlog, announced=len(chunks), processed=len(done))
    for c in chunks:
        if c.get("outcome") != "announced" or not _counted(c["start_time"], c["media_s"], since):
            continue
        start, xadd = epoch(c["start_time"]), _xadd(c["entry_id"])
        out.edge_since_start.append(xadd - start)
        out.edge_beyond.append(xadd - start - c["media_s"])
    for r in done:
        m = r["manifest"]
        if not _counted(m["start_time"], m["media_duration_s"], since):
            continue
        out.cloud.append(epoch(r["processed_at"]) - _xadd(r["stream_entry_id"]))
        out.statuses[r["status"]] = out.statuses.get(r["status"], 0) + 1
    return out


def run(ctx: Context) -> list[Figure]:
    p = plan(ctx)
    s = measure(ctx, p)
    if not s.edge_since_start or not s.cloud:
        raise RuntimeError(f"no chunks measured: {s.announced} announced, {s.processed} done")
    setup = (
        f"{p.cameras} cameras 1080p15 4 Mb/s, {SEGMENT_S:.0f} s chunks, {p.seconds:.0f} s after "
        f"the cloud was ready; {s.announced} announced, {s.processed} processed, of which "
        f"{len(s.edge_since_start)} / {len(s.cloud)} whole chunks in steady state counted"
    )
    return [*_edge(s, setup), _edge_beyond(s), *_cloud(s, p)]


def _cdf(values: list[float]) -> list[list[float]]:
    ordered = sorted(values)
    return [[v, (i + 1) / len(ordered)] for i, v in enumerate(ordered)]


def _edge(s: Sample, setup: str) -> list[Figure]:
    values = s.edge_since_start
    p99 = percentile(values, 99)
    cdf = {
        "latency CDF": {
            "xlabel": "seconds",
            "ylabel": "fraction of chunks",
            "lines": {
                "edge: frame -> stream": _cdf(values),
                "edge: beyond chunk length": _cdf(s.edge_beyond),
                "cloud: stream -> record": _cdf(s.cloud),
            },
        }
    }
    what = "edge: first frame received -> manifest in stream"
    return [
        Figure(
            BENCH,
            f"{what}, p50",
            percentile(values, 50),
            None,
            "s",
            "report (no target)",
            None,
            note="XADD time (stream entry id) - manifest start_time (first frame's receipt); "
            "the chunk's oldest frame waits a whole segment",
            runs={"edge_since_start_s": values},
        ),
        Figure(
            BENCH,
            f"{what}, p99",
            p99,
            None,
            "s",
            f"p99 <= {EDGE_TARGET_S:.1f} s (segment + 0.5 s)",
            p99 <= EDGE_TARGET_S,
            note=setup,
            series=cdf,
        ),
    ]


def _edge_beyond(s: Sample) -> Figure:
    p99 = percentile(s.edge_beyond, 99)
    return Figure(
        BENCH,
        "edge: chunk end -> manifest in stream (beyond its own length), p99",
        p99,
        None,
        "s",
        "p99 <= 0.5 s (the target less the segment)",
        p99 <= 0.5,
        note=f"p50 {percentile(s.edge_beyond, 50):.3f} s, max {max(s.edge_beyond):.3f} s; XADD - "
        "(start_time + media duration): close, fsync, sha256, ledger, S3 PUT, sidecar PUT, XADD",
        runs={"edge_beyond_s": s.edge_beyond},
    )


def _cloud(s: Sample, p: Plan) -> list[Figure]:
    backlog = max((n for _, n in s.backlog), default=0)
    calm = backlog <= p.cameras  # at most one chunk per camera waiting or in work
    state = (
        f"stream length max {backlog} entries: {'not ' if calm else ''}backlogged; "
        f"records {s.statuses}"
    )
    what = "cloud: manifest in stream -> record written"
    how = "record's processed_at (set right before its PUT, after the shard) - XADD time"
    return [
        Figure(
            BENCH,
            f"{what}, p50",
            percentile(s.cloud, 50),
            None,
            "s",
            "report (no target)",
            None,
            note=f"{how}; {state}",
            runs={"cloud_s": s.cloud},
        ),
        Figure(
            BENCH,
            f"{what}, p99",
            percentile(s.cloud, 99),
            None,
            "s",
            "report (no target), when not backlogged",
            None,
            note=f"{state}; 2 actors x 0.5 CPU, duplicate filter off; every camera closes its "
            "chunk at the same moment (one shared feed), so chunks arrive in bursts of N",
            runs={"backlog": [float(n) for _, n in s.backlog]},
            series={
                "stream length (unacknowledged)": {
                    "xlabel": "seconds since the cloud was ready",
                    "ylabel": "entries",
                    "lines": {"XLEN": [[t, float(n)] for t, n in s.backlog]},
                }
            },
        ),
    ]
