"""Coverage audit: the per-camera-hour index against one GET per chunk, on a synthetic day.

A day of 100 cameras at 4 s chunks is 2.16 M chunks: reading every chunk's manifest
(and its done record) is 4.32 M GETs. ``cloud_ingest.coverage.audit`` instead lists
each camera-hour of the raw bucket (two pages for 900 chunks and their sidecars), GETs
the hour's index object from the output bucket and HGETALLs its Redis hash, and reads a
manifest only for a chunk the index lacks.

**The synthetic bucket.** Cameras of 24 hours of 4 s chunks each (900 per hour), every
chunk an empty ``.mp4`` object beside a ``.mp4.manifest.json`` sidecar, and one index
object per camera-hour whose entries are ``coverage.entry_of`` of the chunk's manifest
(1 chunk in 100 rejected as a duplicate, the rest accepted; no gaps). The sidecars of
the indexed hours are two-byte placeholders: the listing counts them, the index path
never reads them. One camera-hour (the first camera's first hour) has real signed
sidecars (``sign_fields``, the JSON ``announce`` writes) and done records, so the
fallback path can be measured on it. The PUT rate is measured first on a sample, and
the largest scale among 1/10 (10 cameras), 1/20, 1/50 and 1/100 (1 camera) of the
full day whose population fits in ``POPULATE_BUDGET_S`` is used: the figures say
which. Population: aiobotocore, 64 PUTs in flight.

**Measured, in this run.**

- Index path against the manifest fallback, per chunk: ``Auditor.hour`` (the audit's
  unit of work: listing, index, Redis hash, and the manifests and records of chunks the
  index lacks) on the fallback camera-hour with its index object and without it,
  alternating; the two must return the same entries.
- Wall seconds and peak memory of ``audit`` over 1/4, 1/2 and all of the synthetic day,
  each in a process of its own after a warm-up audit of one hour: peak RSS growth
  (``ru_maxrss`` after the audit minus before it) in untraced runs (which give the
  seconds), and in one traced run per range the ``tracemalloc`` peak and what is still
  allocated once the audit has returned (the document: its ``intervals`` list grows with
  the range, two per rejected chunk here). The same traced run for one camera tells
  how memory grows with the cameras.

**Extrapolated, not measured**: the seconds for 2.16 M chunks, linearly in chunks from
the full synthetic day (the audit is client-CPU bound here: botocore's listing parse
and JSON); and the fallback's seconds for the same day from its per-chunk cost.

    python -m bench.coverage_audit --child SPEC.json   (one measured audit)
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.common import ROOT, Context, Figure, median

SITE = "covsite"
DEVICE = "cov-dev"
KEY_ID = "covbench"
SECRET = b"coverage-bench-signing-secret-0123"
RAW_BUCKET = "bench-cov-raw"
OUT_BUCKET = "bench-cov-out"
RAW_PREFIX = "raw"
OUT_PREFIX = "processed"
CHUNK_S = 4
PER_HOUR = 3600 // CHUNK_S  # 900 chunks per camera-hour
DAY_H = 24
FULL_CAMERAS = 100
FULL_DAY_CHUNKS = FULL_CAMERAS * DAY_H * PER_HOUR  # 2.16 M: the day
REJECT_EVERY = 100  # 1 chunk in 100 rejected as a duplicate
PUT_CONCURRENCY = 64
POPULATE_BUDGET_S = 300.0  # the whole benchmark should stay under ~15 minutes
PROBE_PUTS = 2000
SCALES = (10, 5, 2, 1)  # cameras of 24 h: 1/10, 1/20, 1/50, 1/100 of the full day
LIST_PAGE = 1000  # keys per LIST page (S3's maximum and SeaweedFS's default)


@dataclass(frozen=True)
class Day:
    cameras: list[str]
    hours: int
    start: float  # epoch seconds of the first hour (the day ends at the current hour)

    @property
    def chunks(self) -> int:
        return len(self.cameras) * self.hours * PER_HOUR

    @property
    def objects(self) -> int:
        """What populating it PUTs: chunk, sidecar, an index per hour, records of one hour."""
        return 2 * self.chunks + len(self.cameras) * self.hours + PER_HOUR

    def at(self, hour: int) -> datetime:
        return datetime.fromtimestamp(self.start + 3600 * hour, UTC)


def settings(s3_endpoint: str, redis_url: str) -> Any:
    from cloud_ingest.config import IngestSettings

    return IngestSettings(
        redis_url=redis_url,
        s3_endpoint_url=s3_endpoint,
        output_bucket=OUT_BUCKET,
        output_prefix=OUT_PREFIX,
        raw_bucket=RAW_BUCKET,
        raw_prefix=RAW_PREFIX,
        keyring={KEY_ID: {"secret": SECRET.decode(), "device_id": DEVICE, "site_id": SITE}},
        log_format="json",
        log_level="WARNING",
    )


# -- the synthetic bucket ----------------------------------------------------------------


def manifest(day: Day, camera: str, hour: int, i: int) -> Any:
    """The signed manifest an agent would announce for chunk ``i`` of ``hour``."""
    from shared.keys import chunk_key
    from shared.manifest import Manifest, derive_chunk_id

    seq = hour * PER_HOUR + i
    start = day.at(hour) + timedelta(seconds=CHUNK_S * i)
    digest = hashlib.sha256(f"{camera}/{seq}".encode()).hexdigest()
    return Manifest(
        chunk_id=derive_chunk_id(DEVICE, camera, seq, digest),
        device_id=DEVICE,
        site_id=SITE,
        camera_id=camera,
        seq=seq,
        bucket=RAW_BUCKET,
        key=chunk_key(RAW_PREFIX, SITE, camera, start, seq),
        size_bytes=8_000_000,
        sha256=digest,
        container="mp4",
        codec="h264",
        width=1920,
        height=1080,
        frame_count=15 * CHUNK_S,
        keyframe_count=CHUNK_S,
        start_time=start,
        end_time=start + timedelta(seconds=CHUNK_S),
        media_start_s=float(CHUNK_S * seq),
        media_duration_s=float(CHUNK_S),
        discontinuity=False,
        gap_before_s=0.0,
        agent_version="bench",
    )


def verdict(seq: int) -> tuple[str, str | None]:
    return ("rejected", "duplicate") if seq % REJECT_EVERY == 37 else ("accepted", None)


def record(fields: dict[str, bytes], m: Any) -> bytes:
    """A done record shaped as ``ChunkProcessor._record`` writes it (what the audit reads:
    ``status`` and ``reason``)."""
    kind, reason = verdict(m.seq)
    doc = {
        "chunk_id": m.chunk_id,
        "status": kind,
        "reason": reason,
        "scores": {"luma": 120.0, "blur_var": 300.0, "motion": 4.0, "duplicate_distance": 40},
        "score_notes": {},
        "manifest": m.model_dump(mode="json"),
        "signature": {"key_id": KEY_ID, "alg": "HMAC-SHA256", "mac": fields["sig"].decode()},
        "integrity": {"sha256_ok": True, "frames": m.frame_count},
        "shard": None,
        "stream_entry_id": "0-1",
        "deliveries": 1,
        "consumer": "bench",
        "processed_at": datetime.now(UTC).isoformat(),
    }
    return json.dumps(doc, sort_keys=True, allow_nan=False).encode()


def objects(day: Day) -> Iterator[tuple[str, str, bytes]]:
    """(bucket, key, body) of every object of the synthetic day, an hour at a time."""
    from cloud_ingest.coverage import entry_of
    from shared.keys import manifest_key, record_key
    from shared.manifest import sign_fields

    for camera in day.cameras:
        for hour in range(day.hours):
            entries: dict[str, Any] = {}
            signed = (camera, hour) == fallback_hour(day)
            for i in range(PER_HOUR):
                m = manifest(day, camera, hour, i)
                yield RAW_BUCKET, m.key, b""
                kind, reason = verdict(m.seq)
                entries[m.chunk_id] = entry_of(m, kind, reason)
                if not signed:
                    yield RAW_BUCKET, manifest_key(m.key), b"{}"
                    continue
                fields = sign_fields(m, KEY_ID, SECRET)  # as edge_agent.publisher.announce
                sidecar = {k: v.decode() for k, v in fields.items()}
                body = json.dumps(sidecar, sort_keys=True).encode()
                yield RAW_BUCKET, manifest_key(m.key), body
                yield OUT_BUCKET, record_key(OUT_PREFIX, m), record(fields, m)
            yield OUT_BUCKET, *index_object(day, camera, hour, entries)


def index_object(day: Day, camera: str, hour: int, entries: dict[str, Any]) -> tuple[str, bytes]:
    """The hour's index object as ``Index._merge`` writes it."""
    from shared.keys import coverage_index_key

    at = day.at(hour)
    body = json.dumps(
        {"site_id": SITE, "camera_id": camera, "hour": at.isoformat(), "entries": entries},
        sort_keys=True,
        allow_nan=False,
    ).encode()
    return coverage_index_key(OUT_PREFIX, SITE, camera, at), body


def fallback_hour(day: Day) -> tuple[str, int]:
    return day.cameras[0], 0


async def put_all(s3: Any, items: Iterator[tuple[str, str, bytes]]) -> int:
    """PUT every item, PUT_CONCURRENCY at a time; how many."""
    count = 0

    async def worker() -> None:
        nonlocal count
        for bucket, key, body in items:  # one iterator shared by the workers
            await s3.put_object(Bucket=bucket, Key=key, Body=body)
            count += 1

    await asyncio.gather(*(worker() for _ in range(PUT_CONCURRENCY)))
    return count


async def populate(ctx: Context) -> tuple[Day, dict[str, float]]:
    """Measure the PUT rate, pick the scale, fill the buckets; the day and the rates."""
    from shared.s3 import open_s3

    async with AsyncExitStack() as stack:
        s3 = await open_s3(stack, ctx.s3_endpoint, "us-east-1", max_connections=PUT_CONCURRENCY)
        for bucket in (RAW_BUCKET, OUT_BUCKET):
            await s3.create_bucket(Bucket=bucket)
        probe = PROBE_PUTS // 4 if ctx.quick else PROBE_PUTS
        started = time.monotonic()
        await put_all(s3, ((RAW_BUCKET, f"probe/{n:08d}.mp4", b"") for n in range(probe)))
        probe_rate = probe / (time.monotonic() - started)
        now = time.time()
        end = now - now % 3600  # the day ends at the current hour: no lookahead past it
        if ctx.quick:
            cameras, hours = 1, 4
        else:
            hours = DAY_H
            fits = [c for c in SCALES if 2 * c * hours * PER_HOUR / probe_rate <= POPULATE_BUDGET_S]
            cameras = fits[0] if fits else SCALES[-1]
        day = Day([f"cam{n:02d}" for n in range(cameras)], hours, end - 3600 * hours)
        print(
            f"[bench]   coverage_audit: PUT probe {probe_rate:.0f}/s, full 1/10 scale would "
            f"take {2 * FULL_DAY_CHUNKS / 10 / probe_rate / 60:.1f} min to populate; using "
            f"{cameras} camera(s) x {hours} h = {day.chunks} chunks ({day.objects} objects)",
            flush=True,
        )
        started = time.monotonic()
        count = await put_all(s3, objects(day))
        seconds = time.monotonic() - started
        assert count == day.objects, (count, day.objects)
    return day, {"probe_rate": probe_rate, "rate": count / seconds, "seconds": seconds}


# -- one measured audit, in a process of its own -----------------------------------------


async def child(spec: dict[str, Any]) -> dict[str, Any]:
    from cloud_ingest.coverage import audit
    from shared.queue import connect
    from shared.s3 import open_s3

    conf = settings(spec["s3_endpoint"], spec["redis_url"])
    redis = connect(conf, conf.redis_timeout_s)
    first = datetime.fromtimestamp(spec["day_start"], UTC)
    try:
        async with AsyncExitStack() as stack:
            s3 = await open_s3(stack, conf.s3_endpoint_url, conf.s3_region)  # as the CLI
            # Warm-up: the hour before the day (its lookahead reads the day's first hour).
            await audit(conf, s3, redis, SITE, first - timedelta(hours=1), first, spec["cameras"])
            gc.collect()
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            if spec["trace"]:
                tracemalloc.start()
            cpu, started = os.times(), time.monotonic()
            doc = await audit(
                conf,
                s3,
                redis,
                SITE,
                first + timedelta(hours=spec["since_h"]),
                first + timedelta(hours=spec["until_h"]),
                spec["cameras"],
            )
            wall = time.monotonic() - started
            after = os.times()
            traced = tracemalloc.get_traced_memory() if spec["trace"] else (0, 0)
            tracemalloc.stop()
    finally:
        await redis.aclose()
    cams = doc["cameras"]
    return {
        "wall_s": wall,
        "cpu_s": (after.user - cpu.user) + (after.system - cpu.system),
        "rss_before": rss_before,
        "rss_growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before,
        "traced_peak": traced[1],
        "retained": traced[0],  # allocated still, the document held: mostly the document
        "doc_bytes": len(json.dumps(doc)),
        "intervals": sum(len(c["intervals"]) for c in cams),
        "chunks": sum(c["chunks"] for c in cams),
        "from_index": sum(c["chunks_from_index"] for c in cams),
        "from_manifests": sum(c["chunks_from_manifests"] for c in cams),
        "unexplained_s": doc["unexplained_s"],
        "rejected_s": sum(c["rejected_s"] for c in cams),
    }


def measured(ctx: Context, day: Day, until_h: int, trace: bool, cameras: list[str]) -> Any:
    spec = {
        "s3_endpoint": ctx.s3_endpoint,
        "redis_url": ctx.redis_url,
        "day_start": day.start,
        "since_h": 0,
        "until_h": until_h,
        "cameras": cameras,
        "trace": trace,
    }
    path = ctx.work / "coverage-spec.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.coverage_audit", "--child", str(path)],
        env=ctx.env(),
        cwd=ROOT,
        capture_output=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.decode()[-2000:])
    out: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    expected = len(cameras) * until_h * PER_HOUR  # every chunk of the range, from the index
    per_hour = sum(verdict(seq)[0] == "rejected" for seq in range(PER_HOUR))
    rejected = len(cameras) * until_h * per_hour * CHUNK_S
    if (out["chunks"], out["from_index"], out["unexplained_s"], out["rejected_s"]) != (
        expected,
        expected,
        0,
        rejected,
    ):
        raise RuntimeError(f"the audit of {until_h} h does not add up: {out}")
    return out


# -- the fallback against the index, one camera-hour ---------------------------------------


async def fallback(ctx: Context, day: Day) -> dict[str, list[float]]:
    """Seconds of ``Auditor.hour`` on the fallback hour with its index and without it."""
    from cloud_ingest.coverage import Auditor
    from shared.keys import coverage_index_key
    from shared.queue import connect
    from shared.s3 import open_s3

    conf = settings(ctx.s3_endpoint, ctx.redis_url)
    redis = connect(conf, conf.redis_timeout_s)
    camera, hour = fallback_hour(day)
    at = day.at(hour)
    okey = coverage_index_key(OUT_PREFIX, SITE, camera, at)
    runs: dict[str, list[float]] = {"index": [], "fallback": []}
    try:
        async with AsyncExitStack() as stack:
            s3 = await open_s3(stack, conf.s3_endpoint_url, conf.s3_region)
            index = await (await s3.get_object(Bucket=OUT_BUCKET, Key=okey))["Body"].read()
            auditor = Auditor(conf, s3, redis)
            await auditor.hour(SITE, camera, at)  # warm-up
            seen: dict[str, list[dict[str, Any]]] = {}
            for _ in range(max(3, ctx.repeats)):
                for path in ("index", "fallback"):
                    if path == "fallback":
                        await s3.delete_object(Bucket=OUT_BUCKET, Key=okey)
                    started = time.monotonic()
                    entries = await auditor.hour(SITE, camera, at)
                    runs[path].append(time.monotonic() - started)
                    if path == "fallback":
                        await s3.put_object(Bucket=OUT_BUCKET, Key=okey, Body=index)
                    seen[path] = sorted(entries, key=lambda e: int(e["seq"]))
    finally:
        await redis.aclose()
    sources = {p: {e.pop("_source") for e in seen[p]} for p in seen}
    if (
        sources != {"index": {"index"}, "fallback": {"manifest"}}
        or seen["index"] != seen["fallback"]
        or len(seen["index"]) != PER_HOUR
    ):
        raise RuntimeError(f"the fallback does not read what the index says: {sources}")
    return runs


# -- the figures ---------------------------------------------------------------------------


def run(ctx: Context) -> list[Figure]:
    day, rates = asyncio.run(populate(ctx))
    ranges = [day.hours // 4, day.hours // 2, day.hours]
    timed: dict[int, list[dict[str, Any]]] = {h: [] for h in ranges}
    for _ in range(ctx.repeats):
        for h in ranges:
            timed[h].append(measured(ctx, day, h, False, day.cameras))
    traced = {h: measured(ctx, day, h, True, day.cameras) for h in ranges}
    one = measured(ctx, day, day.hours, True, day.cameras[:1]) if len(day.cameras) > 1 else None
    fb = asyncio.run(fallback(ctx, day))
    return figures(day, rates, ranges, timed, traced, one, fb)


def figures(
    day: Day,
    rates: dict[str, float],
    ranges: list[int],
    timed: dict[int, list[dict[str, Any]]],
    traced: dict[int, dict[str, Any]],
    one: dict[str, Any] | None,
    fb: dict[str, list[float]],
) -> list[Figure]:
    quarter, full = ranges[0], ranges[-1]
    wall = {h: median([r["wall_s"] for r in timed[h]]) for h in ranges}
    cpu = {h: median([r["cpu_s"] for r in timed[h]]) for h in ranges}
    growth = {h: median([float(r["rss_growth"]) for r in timed[h]]) for h in ranges}
    peak = {h: float(traced[h]["traced_peak"]) for h in ranges}
    kept = {h: float(traced[h]["retained"]) for h in ranges}
    scale = f"1/{FULL_DAY_CHUNKS // day.chunks}" if FULL_DAY_CHUNKS % day.chunks == 0 else ""
    setting = (
        f"synthetic day at {scale} scale: {len(day.cameras)} camera(s) x {day.hours} h x "
        f"{PER_HOUR} chunks of {CHUNK_S} s = {day.chunks} chunks, {day.objects} objects "
        f"populated at {rates['rate']:.0f} PUT/s ({rates['seconds']:.0f} s; probe "
        f"{rates['probe_rate']:.0f}/s)"
    )
    per_index = median(fb["index"]) / PER_HOUR
    per_fallback = median(fb["fallback"]) / PER_HOUR
    per_chunk = wall[full] / (len(day.cameras) * full * PER_HOUR)
    projected = per_chunk * FULL_DAY_CHUNKS
    hours = FULL_CAMERAS * DAY_H
    pages = hours * math.ceil(2 * PER_HOUR / LIST_PAGE)
    mb = 1e6
    camera_note = ""
    if one is not None:
        slope = (peak[full] - one["traced_peak"]) / (len(day.cameras) - 1)
        camera_note = (
            f"; 1 camera, full range: traced peak {one['traced_peak'] / mb:.1f} MB, so "
            f"{slope / mb:.2f} MB per further camera (extrapolated to {FULL_CAMERAS} cameras: "
            f"{(one['traced_peak'] + slope * (FULL_CAMERAS - 1)) / mb:.0f} MB, if linear)"
        )
    by_range = ", ".join(
        f"{h} h: {wall[h]:.1f} s wall, {cpu[h]:.1f} cpu-s, traced peak {peak[h] / mb:.1f} MB "
        f"(document {kept[h] / mb:.1f} MB, {traced[h]['intervals']} intervals), "
        f"RSS growth {growth[h] / mb:.1f} MB"
        for h in ranges
    )
    return [
        Figure(
            bench="coverage_audit",
            metric="audit cost per chunk: the camera-hour index vs its manifests and records",
            ours=per_index,
            baseline=per_fallback,
            unit="s/chunk (lower is better)",
            target="<= 0.1x the manifest fallback",
            met=per_index <= 0.1 * per_fallback,
            note=f"Auditor.hour on one camera-hour of {PER_HOUR} chunks, with its index "
            f"object and without it (then {2 * PER_HOUR} GETs, manifests verified), the same "
            f"entries either way; {setting}",
            runs={"index": fb["index"], "fallback": fb["fallback"]},
        ),
        Figure(
            bench="coverage_audit",
            metric=f"audit peak memory (tracemalloc), {full} h of the synthetic day vs {quarter} h",
            ours=peak[full],
            baseline=peak[quarter],
            unit="bytes (lower is better)",
            target="<= 1.25x (camera-hours in flight, not the range)",
            met=peak[full] <= 1.25 * peak[quarter],
            note=f"{by_range}{camera_note}; {setting}",
            runs={f"{h}h": [peak[h]] for h in ranges}
            | {f"rss_growth_{h}h": [float(r["rss_growth"]) for r in timed[h]] for h in ranges}
            | {f"document_{h}h": [kept[h]] for h in ranges},
            series={
                "audit memory by range": {
                    "xlabel": "hours of the synthetic day audited",
                    "ylabel": "MB",
                    "lines": {
                        "tracemalloc peak": [[h, peak[h] / mb] for h in ranges],
                        "document (retained)": [[h, kept[h] / mb] for h in ranges],
                        "RSS growth": [[h, growth[h] / mb] for h in ranges],
                    },
                }
            },
        ),
        Figure(
            bench="coverage_audit",
            metric=f"audit wall seconds, {full} h of the synthetic day vs {quarter} h",
            ours=wall[full],
            baseline=wall[quarter],
            unit="s (lower is better)",
            target=f"<= {1.1 * full / quarter:.1f}x (linear in the range)",
            met=wall[full] <= 1.1 * full / quarter * wall[quarter],
            note=f"{by_range}; {setting}",
            runs={f"{h}h": [r["wall_s"] for r in timed[h]] for h in ranges},
            series={
                "audit seconds by range": {
                    "xlabel": "hours of the synthetic day audited",
                    "ylabel": "s",
                    "lines": {
                        "wall": [[h, wall[h]] for h in ranges],
                        "audit CPU": [[h, cpu[h]] for h in ranges],
                    },
                }
            },
        ),
        Figure(
            bench="coverage_audit",
            metric=f"audit seconds for a day of {FULL_CAMERAS} cameras ({FULL_DAY_CHUNKS} chunks), "
            "extrapolated",
            ours=projected,
            baseline=None,
            unit="s (lower is better)",
            target="extrapolation, no target",
            met=None,
            note=f"EXTRAPOLATED linearly in chunks from {wall[full]:.1f} s for {day.chunks} "
            f"chunks ({per_chunk * 1e6:.0f} us/chunk), not measured; the index path reads "
            f"{hours} index objects, {hours} Redis hashes and about {pages} LIST pages, the "
            f"fallback {2 * FULL_DAY_CHUNKS} GETs: about {per_fallback * FULL_DAY_CHUNKS:.0f} "
            f"s at its measured {per_fallback * 1e3:.2f} ms/chunk; {setting}",
        ),
    ]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        result = asyncio.run(child(json.loads(Path(sys.argv[2]).read_text())))
        print(json.dumps(result))
    else:
        print(__doc__)
