"""Benchmark 4: cloud processing (content filters + preprocessing) against plain PyAV.

Input: the cached 1080p 15 fps H.264 clip (``clip_1080p``: 40 s, 20 s when quick) cut into
10 s keyframe-aligned fMP4 chunks by the edge's own ``Source`` + ``Segmenter`` (remux only),
each with the manifest the edge would announce. Every chunk is checked up front to be
*accepted* by the default filters (not dark, static, blurred, nor a duplicate of the
camera's earlier chunks), so that preprocessing runs on all of them.

What runs, each time in a spawned process (or Ray actor) warmed up first:

- **ours**: per chunk ``media_work()``, what a consumer's media worker runs: ``analyse()``
  (container and manifest checks, demux, keyframe decode, scores), ``verdict()``, then
  ``frames_to_shard()`` (full decode, 2 frames/s sampled,
  resized to a 256 short side, JPEG, Parquet): ``IngestSettings``' default thresholds and
  options, one chunk at a time. No S3 or Redis: the media work alone.
- **baseline**: the same chunks in a plain loop: PyAV decodes every frame and ``reformat``s
  it to the same short side, nothing else. It gets the cheapest settings ours uses (one
  decoder thread, no probe decode at open), so the ratio is ours' overhead alone.

Frames per second = source frames decoded / seconds. "Per core" divides by the CPU seconds
(user + system, all threads) of the process doing the work: on 2 cores shared with other
work that is fairer than wall time. Scaling: the whole chunk set by 1 Ray actor against
the set split over 2 actors (``num_cpus=1`` each, local ``ray.init(num_cpus=2)``), wall
time; 2 plain processes against 1 doing the same work say what the machine allows, and
each scaling figure reports how many cores other work kept busy meanwhile (``/proc/stat``).
Filter only: ``analyse()`` alone on one 10 s chunk, 10 s / its CPU seconds.
Every measurement is repeated ``ctx.repeats`` times, interleaved; medians are reported.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import av

from bench.common import CLK_TCK, ROOT, Context, Figure, clip_1080p, median
from cloud_ingest.config import IngestSettings
from cloud_ingest.filters import Thresholds, analyse, verdict
from cloud_ingest.preprocess import Options, _size, media_work
from shared.keys import chunk_key
from shared.manifest import Manifest, derive_chunk_id

CHUNK_S = 10.0
FILTER_RUNS = 7  # analyse() is short: more runs for a stable median
SITE, CAMERA, DEVICE = "site-bench", "cam-bench", "dev-bench"


@dataclass(frozen=True, slots=True)
class Chunk:
    path: Path
    manifest: Manifest
    recent: tuple[str, ...]  # difference hashes of the camera's earlier chunks


@dataclass(slots=True)
class Pass:
    """One process's pass over some chunks."""

    frames: int
    wall_s: float
    cpu_s: float
    chunk_fps: list[float] = field(default_factory=list)  # frames / wall seconds, per chunk


# ---------------------------------------------------------------------------------------
# The work, run inside the worker processes and actors.


def _cpu() -> float:
    """CPU seconds of this whole process, every thread included."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(chunks: Sequence[Chunk], one: Callable[[Chunk, bytes], int]) -> Pass:
    """Run ``one`` on each chunk; reading the file is not timed (ours gets bytes from S3)."""
    blobs = [c.path.read_bytes() for c in chunks]
    result = Pass(0, 0.0, 0.0)
    cpu0, wall0 = _cpu(), time.perf_counter()
    for chunk, data in zip(chunks, blobs, strict=True):
        t0 = time.perf_counter()
        frames = one(chunk, data)
        result.chunk_fps.append(frames / (time.perf_counter() - t0))
        result.frames += frames
    result.wall_s, result.cpu_s = time.perf_counter() - wall0, _cpu() - cpu0
    return result


def ours(chunks: Sequence[Chunk], limits: Thresholds, options: Options) -> Pass:
    def one(chunk: Chunk, data: bytes) -> int:
        # What a consumer's media worker runs per chunk (cloud_ingest.media_pool).
        result = media_work(data, chunk.manifest, limits, list(chunk.recent), options)
        if result.analysis.reason is not None:  # setup guarantees this never happens
            raise RuntimeError(f"chunk {chunk.manifest.seq} rejected: {result.analysis.reason}")
        assert result.frames > 0
        return chunk.manifest.frame_count  # preprocess decoded every frame

    return _timed(chunks, one)


def plain(chunks: Sequence[Chunk], short_side: int) -> Pass:
    def one(chunk: Chunk, data: bytes) -> int:
        frames = 0
        # Like ours: no probe decode at open, one decoder thread (threads add CPU per frame).
        with av.open(io.BytesIO(data), mode="r", options={"skip_frame": "all"}) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            for frame in container.decode(stream):
                w, h = _size(frame.width, frame.height, short_side)
                frame.reformat(width=w, height=h)
                frames += 1
        return frames

    return _timed(chunks, one)


def filter_cpu(chunk: Chunk, limits: Thresholds, runs: int) -> list[float]:
    """CPU seconds of ``analyse()`` alone, one value per run."""
    data = chunk.path.read_bytes()
    out = []
    for _ in range(runs):
        cpu0 = _cpu()
        analyse(data, chunk.manifest, limits)
        out.append(_cpu() - cpu0)
    return out


# ---------------------------------------------------------------------------------------
# Where the work runs: spawned processes (a fresh interpreter each, like a Ray worker) and
# Ray actors.


def _serve(conn: Connection) -> None:
    while (job := conn.recv()) is not None:
        fn, args = job
        try:
            conn.send((True, fn(*args)))
        except Exception as exc:  # reported to the parent, which raises it
            conn.send((False, repr(exc)))


class Worker:
    """One spawned process that runs the jobs it is sent, one at a time."""

    def __init__(self) -> None:
        spawn = mp.get_context("spawn")
        self._conn, child = spawn.Pipe()
        self._proc = spawn.Process(target=_serve, args=(child,), daemon=True)
        self._proc.start()
        child.close()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._conn.send((fn, args))

    def result(self) -> Any:
        ok, value = self._conn.recv()
        if not ok:
            raise RuntimeError(f"worker failed: {value}")
        return value

    def close(self) -> None:
        with contextlib.suppress(OSError):  # already gone
            self._conn.send(None)
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)


class Actor:
    """A Ray actor that runs the same jobs (``ray.remote`` is applied at run time)."""

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


def _in_parallel(
    workers: Sequence[Worker], jobs: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]]
) -> list[Any]:
    """Each worker runs its job, all at once; their results."""
    for worker, (fn, args) in zip(workers, jobs, strict=True):
        worker.submit(fn, *args)
    return [w.result() for w in workers]


@dataclass(frozen=True, slots=True)
class Run:
    """One timed run over the whole chunk set, by one or more workers at once."""

    wall_s: float  # from the first job sent to the last result back
    cpu_s: float  # the workers' own CPU seconds for their passes
    busy_s: float  # CPU seconds the whole machine spent meanwhile: ours, Ray's, anyone's

    def fps(self, frames: int) -> float:
        return frames / self.wall_s

    @property
    def others(self) -> float:
        """Cores busy with anything but the passes meanwhile (Ray's own processes too)."""
        return max(0.0, self.busy_s - self.cpu_s) / self.wall_s


def _machine_busy_s() -> float:
    """CPU seconds every core has spent not idle since boot (``/proc/stat``)."""
    with open("/proc/stat") as fh:
        ticks = [int(x) for x in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def _timed_run(work: Callable[[], list[Pass]]) -> tuple[Run, list[Pass]]:
    busy0, start = _machine_busy_s(), time.perf_counter()
    passes = work()
    wall, busy = time.perf_counter() - start, _machine_busy_s() - busy0
    return Run(wall, sum(p.cpu_s for p in passes), busy), passes


# ---------------------------------------------------------------------------------------
# Input: real chunks cut the way the edge cuts them.


def _settings() -> IngestSettings:
    """The cloud's configuration with its defaults (the required fields filled in)."""
    return IngestSettings(
        output_bucket="bench-out",
        raw_bucket="bench-raw",
        keyring={"bench": {"secret": "bench-secret-0123456789"}},
    )


def _segment(clip: Path, out: Path, seconds: float) -> list[Any]:
    """The edge's capture and segmenter on a file, without real-time pacing."""
    from edge_agent.capture import Source, SourceSpec
    from edge_agent.segmenter import ClosedChunk, Segmenter

    closed: list[ClosedChunk] = []
    source = Source(f"file://{clip.resolve()}", threading.Event())
    source.spec = SourceSpec(source.spec.target, {}, realtime=False, loop=False)
    try:
        seg = Segmenter(CAMERA, source.stream, out, seconds, closed.append)
        for pkt in source.packets():
            seg.feed(pkt)
        seg.flush()
    finally:
        source.close()
    return closed


def _manifest(c: Any, seq: int) -> Manifest:
    """What ``edge_agent.publisher.build_manifest`` announces for this chunk."""
    return Manifest(
        chunk_id=derive_chunk_id(DEVICE, c.camera_id, seq, c.sha256),
        device_id=DEVICE,
        site_id=SITE,
        camera_id=c.camera_id,
        seq=seq,
        bucket="bench-raw",
        key=chunk_key("raw", SITE, c.camera_id, c.wall_start, seq),
        size_bytes=c.size_bytes,
        sha256=c.sha256,
        container="mp4",
        codec=c.codec,
        width=c.width,
        height=c.height,
        frame_count=c.frame_count,
        keyframe_count=c.keyframe_count,
        start_time=c.wall_start,
        end_time=c.wall_end,
        media_start_s=c.media_start_s,
        media_duration_s=max(0.0, c.media_end_s - c.media_start_s),
        discontinuity=False,
        gap_before_s=0.0,
        agent_version="bench",
    )


def make_chunks(ctx: Context, limits: Thresholds, recent_max: int) -> list[Chunk]:
    """10 s 1080p chunks, each accepted by the filters (else preprocessing would not run),
    duplicate check included: each chunk is compared with the camera's earlier ones."""
    clip = clip_1080p(20 if ctx.quick else 40)
    closed = _segment(clip, ctx.work / "processing", CHUNK_S)
    chunks: list[Chunk] = []
    hashes: list[str] = []
    for seq, c in enumerate(closed):
        m = _manifest(c, seq)
        recent = tuple(hashes[-recent_max:]) if recent_max else ()
        result = analyse(c.path.read_bytes(), m, limits)
        reason = verdict(result, limits, list(recent))
        if reason is not None:
            raise RuntimeError(
                f"chunk {seq} of {clip.name} is rejected ({reason}): {result.scores}"
            )
        hashes.append(result.dhash)
        chunks.append(Chunk(c.path, m, recent))
    return chunks


# ---------------------------------------------------------------------------------------
# Measurements.


@dataclass(slots=True)
class Local:
    """What the spawned processes measured, one entry per repeat."""

    ours: list[Pass] = field(default_factory=list)  # one process, every chunk
    one: list[Run] = field(default_factory=list)  # the same, seen from the parent
    two: list[Run] = field(default_factory=list)  # two processes, half the chunks each
    plain: list[Pass] = field(default_factory=list)  # one process, every chunk
    filter_cpu: list[float] = field(default_factory=list)  # analyse() alone, one chunk


def _halves(chunks: list[Chunk]) -> tuple[list[Chunk], list[Chunk]]:
    return chunks[0::2], chunks[1::2]


def measure_processes(
    ctx: Context, chunks: list[Chunk], limits: Thresholds, options: Options
) -> Local:
    workers = [Worker(), Worker()]
    first = workers[:1]
    out = Local()
    try:
        # Warm-up, not measured: imports (pyarrow loads pandas on first use), codec setup.
        _in_parallel(workers, [(ours, ([chunks[0]], limits, options))] * 2)
        _in_parallel(first, [(plain, ([chunks[0]], options.short_side))])
        whole = [(ours, (chunks, limits, options))]
        halves = [(ours, (h, limits, options)) for h in _halves(chunks)]
        # Interleaved, so that a burst of load from elsewhere hits every variant alike.
        for _ in range(ctx.repeats):
            run, [result] = _timed_run(lambda: _in_parallel(first, whole))
            out.ours.append(result)
            out.one.append(run)
            out.two.append(_timed_run(lambda: _in_parallel(workers, halves))[0])
            [result] = _in_parallel(first, [(plain, (chunks, options.short_side))])
            out.plain.append(result)
        runs = (3 if ctx.quick else FILTER_RUNS) * ctx.repeats
        [out.filter_cpu] = _in_parallel(first, [(filter_cpu, (chunks[0], limits, runs))])
    finally:
        for w in workers:
            w.close()
    return out


def measure_actors(
    ctx: Context, chunks: list[Chunk], limits: Thresholds, options: Options
) -> tuple[list[Run], list[Run]]:
    """The whole chunk set by 1 actor, then split over 2 actors, per repeat."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=100 * 1024**2,  # nothing big goes through it: chunks are paths
        # The actors import this module (pickled by reference) from the checkout.
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    try:
        remote: Any = ray.remote(num_cpus=1)(Actor)
        actors = [remote.remote() for _ in range(2)]
        ray.get([a.call.remote(ours, [chunks[0]], limits, options) for a in actors])  # warm-up
        whole = [(actors[0], (chunks, limits, options))]
        halves = [(a, (h, limits, options)) for a, h in zip(actors, _halves(chunks), strict=True)]

        def on_actors(jobs: list[tuple[Any, tuple[Any, ...]]]) -> list[Pass]:
            return list(ray.get([actor.call.remote(ours, *args) for actor, args in jobs]))

        one: list[Run] = []
        two: list[Run] = []
        for _ in range(ctx.repeats):
            one.append(_timed_run(lambda: on_actors(whole))[0])
            two.append(_timed_run(lambda: on_actors(halves))[0])
        return one, two
    finally:
        ray.shutdown()


def run(ctx: Context) -> list[Figure]:
    settings = _settings()
    limits, options = settings.thresholds(), settings.preprocess()
    chunks = make_chunks(ctx, limits, settings.filter_recent_chunks)
    if len(chunks) < 2:
        raise RuntimeError(f"need at least 2 chunks, got {len(chunks)}")
    frames = sum(c.manifest.frame_count for c in chunks)
    local = measure_processes(ctx, chunks, limits, options)
    actor_one, actor_two = measure_actors(ctx, chunks, limits, options)
    setting = (
        f"{len(chunks)} x {CHUNK_S:.0f} s 1080p15 chunks ({frames} frames), sample "
        f"{options.sample_fps:g} fps, short side {options.short_side}, JPEG q{options.jpeg_quality}"
    )
    actors = _scaling_figure("2 Ray actors vs 1", actor_one, actor_two, frames, ">= 1.8x 1 actor")
    processes = _scaling_figure("2 processes vs 1", local.one, local.two, frames, None)
    actors.series = {"throughput vs workers (whole chunk set)": _scaling_plot(actors, processes)}
    return [
        _per_core_figure(local, frames, setting),
        actors,
        processes,
        _filter_figure(local, chunks[0]),
    ]


def _scaling_plot(actors: Figure, processes: Figure) -> dict[str, Any]:
    one = actors.baseline or 0.0
    return {
        "xlabel": "workers",
        "ylabel": "frames/s (wall)",
        "lines": {
            "Ray actors": [[1.0, one], [2.0, actors.ours]],
            "plain processes": [[1.0, processes.baseline or 0.0], [2.0, processes.ours]],
            "linear (2x one actor)": [[1.0, one], [2.0, 2 * one]],
        },
    }


def _per_core_figure(local: Local, frames: int, setting: str) -> Figure:
    ours_core = [p.frames / p.cpu_s for p in local.ours]
    plain_core = [p.frames / p.cpu_s for p in local.plain]
    ours_wall = [p.frames / p.wall_s for p in local.ours]
    plain_wall = [p.frames / p.wall_s for p in local.plain]
    ratio = median(ours_core) / median(plain_core)
    per_chunk = {
        "ours (filter + preprocess)": _per_chunk(local.ours),
        "plain PyAV decode + resize": _per_chunk(local.plain),
    }
    return Figure(
        bench="processing",
        metric="frames/s per core: filter + preprocess vs plain PyAV decode + resize",
        ours=median(ours_core),
        baseline=median(plain_core),
        unit="frames/s/core",
        target=">= 0.9x plain PyAV loop per core",
        met=ratio >= 0.9,
        note=(
            f"{setting}; wall, one thread each: ours {median(ours_wall):.0f} fps, plain "
            f"{median(plain_wall):.0f} fps. Ours also checks the container, decodes the "
            "keyframes twice, encodes JPEGs and Parquet; plain resizes every frame, ours "
            "the sampled ones"
        ),
        runs={
            "ours_fps_per_core": ours_core,
            "plain_fps_per_core": plain_core,
            "ours_fps_wall": ours_wall,
            "plain_fps_wall": plain_wall,
        },
        series={
            "fps per 10 s chunk (one process, one thread)": {
                "xlabel": "chunk",
                "ylabel": "frames/s (wall)",
                "lines": per_chunk,
            }
        },
    )


def _per_chunk(passes: list[Pass]) -> list[list[float]]:
    """Each chunk's median fps over the repeats, as plot points."""
    columns = zip(*(p.chunk_fps for p in passes), strict=True)
    return [[float(i), median(list(col))] for i, col in enumerate(columns)]


def _scaling_figure(
    what: str, one: list[Run], two: list[Run], frames: int, target: str | None
) -> Figure:
    """Throughput of the whole set with two workers against one. Without a target it is
    the reference: what this machine allows to plain processes doing the same work."""
    fps1, fps2 = [r.fps(frames) for r in one], [r.fps(frames) for r in two]
    ratio = median(fps2) / median(fps1)
    pairs = ", ".join(f"{b / a:.2f}" for a, b in zip(fps1, fps2, strict=True))
    return Figure(
        bench="processing",
        metric=f"throughput: {what} (filter + preprocess)",
        ours=median(fps2),
        baseline=median(fps1),
        unit="frames/s",
        target=target or "none: the machine's reference",
        met=None if target is None else ratio >= 1.8,
        note=(
            f"per repeat {pairs}; other load meanwhile (Ray's own processes included): "
            f"{median([r.others for r in one]):.2f} cores with one, "
            f"{median([r.others for r in two]):.2f} with two, of {os.cpu_count()}"
        ),
        runs={
            "fps_1": fps1,
            "fps_2": fps2,
            "others_1": [r.others for r in one],
            "others_2": [r.others for r in two],
        },
    )


def _filter_figure(local: Local, chunk: Chunk) -> Figure:
    seconds = chunk.manifest.media_duration_s
    factors = [seconds / cpu for cpu in local.filter_cpu]
    ours = median(factors)
    return Figure(
        bench="processing",
        metric=f"filter-only path on one {seconds:.0f} s 1080p chunk",
        ours=ours,
        baseline=None,
        unit="x real time per core",
        target=">= 200x real time per core",
        met=ours >= 200,
        note=(
            f"analyse(): {median(local.filter_cpu) * 1000:.0f} ms CPU for "
            f"{chunk.manifest.keyframe_count} keyframes of {chunk.manifest.frame_count} frames"
        ),
        runs={"cpu_s": local.filter_cpu, "x_real_time": factors},
    )
