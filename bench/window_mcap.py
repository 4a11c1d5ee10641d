"""Window MCAPs: what writing one costs, and that its memory does not grow with the window.

Input: the cached 1080p15 4 Mb/s clip cut into 4 s chunks, as three cameras' footage
(the writer's fetch reads the chunk files, so S3 is not measured). Two ratios, each
measured in this run:

- CPU seconds to write a 60 s, three-camera window's MCAP (demux, Annex B filter,
  protobuf, zstd) against ffmpeg copying the same chunks' packets into one MP4 per
  camera (``-f concat -c copy``): the same packets through a muxer.
- peak RSS of the writer for a 120 s window against a 20 s one: memory is bounded by
  one chunk per camera, not by the window.

    python -m bench.window_mcap --child WINDOW_S OUT.mcap   (one measured write)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bench.common import CACHE, Context, Figure, clip_1080p, median, run_measured

CAMERAS = ("cam1", "cam2", "cam3")
CHUNK_S = 4.0
START = 1_800_000_000  # any epoch second divisible by the window sizes below


def _chunks(clip: Path) -> list[Any]:
    from edge_agent.capture import Source, SourceSpec
    from edge_agent.segmenter import ClosedChunk, Segmenter

    out = CACHE / "window-mcap-chunks"
    done = sorted(out.glob("*.mp4")) if out.exists() else []
    if done:
        return done
    import threading

    chunks: list[ClosedChunk] = []
    source = Source(f"file://{clip}", threading.Event())
    source.spec = SourceSpec(source.spec.target, {}, realtime=False, loop=False)
    seg = Segmenter("cam", source.stream, out, CHUNK_S, chunks.append)
    for pkt in source.packets():
        seg.feed(pkt)
    seg.flush()
    source.close()
    return sorted(c.path for c in chunks)


def _doc(files: list[Path], window_s: int) -> dict[str, Any]:
    """A window document whose cameras replay the chunk files in turn."""
    notes: dict[str, list[dict[str, Any]]] = {}
    for camera in CAMERAS:
        items = []
        for i in range(int(window_s / CHUNK_S)):
            path = files[i % len(files)]
            begin = START + i * CHUNK_S
            items.append(
                {
                    "chunk_id": f"{i:032x}",
                    "key": str(path),
                    "verdict": "accepted",
                    "scores": {},
                    "start": begin,
                    "end": begin + CHUNK_S,
                    "seq": i,
                    "codec": "h264",
                }
            )
        notes[camera] = items
    return {
        "window_id": f"bench-{START}",
        "revision": 1,
        "revision_id": f"bench-{START}-r1",
        "supersedes": None,
        "site_id": "bench",
        "start": START,
        "end": START + window_s,
        "closed_because": "complete",
        "cameras": [],
        "chunks": notes,
        "gaps": {},
    }


def child(window_s: int, out: Path) -> None:
    from cloud_ingest.scene_mcap import write_mcap

    files = _chunks(clip_1080p())
    with out.open("wb") as fh:
        write_mcap(fh, _doc(files, window_s), {}, lambda note: Path(note["key"]).read_bytes())


def _write(ctx: Context, window_s: int) -> tuple[float, int, int]:
    """(CPU s, peak RSS, bytes) of one write in a process of its own."""
    out = ctx.work / f"window-{window_s}.mcap"
    usage, proc = run_measured(
        [sys.executable, "-m", "bench.window_mcap", "--child", str(window_s), str(out)],
        env=ctx.env(),
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.decode()[-2000:])
    return usage.cpu_s, usage.peak_rss, out.stat().st_size


def _ffmpeg(ctx: Context, files: list[Path], window_s: int) -> float:
    """CPU s of ffmpeg copying each camera's chunks into one MP4 (concat, -c copy)."""
    listing = ctx.work / f"concat-{window_s}.txt"
    count = int(window_s / CHUNK_S)
    listing.write_text("".join(f"file '{files[i % len(files)]}'\n" for i in range(count)))
    script = " && ".join(
        f"ffmpeg -hide_banner -loglevel error -y -f concat -safe 0 -i {listing} -c copy -an "
        f"{ctx.work / f'{camera}.mp4'}"
        for camera in CAMERAS
    )
    usage, proc = run_measured(["sh", "-c", script])
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.decode()[-2000:])
    return usage.cpu_s


def run(ctx: Context) -> list[Figure]:
    files = _chunks(clip_1080p())
    small, large, cost = (20, 40, 60) if ctx.quick else (20, 120, 60)
    ours = [_write(ctx, cost) for _ in range(ctx.repeats)]
    theirs = [_ffmpeg(ctx, files, cost) for _ in range(ctx.repeats)]
    short = [_write(ctx, small) for _ in range(ctx.repeats)]
    long = [_write(ctx, large) for _ in range(ctx.repeats)]
    cpu, base = median([o[0] for o in ours]), median(theirs)
    rss_small, rss_large = median([s[1] for s in short]), median([g[1] for g in long])
    size = median([float(o[2]) for o in ours])
    setting = f"3 cameras, 1080p15 4 Mb/s, {CHUNK_S:g} s chunks"
    return [
        Figure(
            bench="window_mcap",
            metric=f"CPU to write a {cost} s window's MCAP vs ffmpeg -c copy of its chunks",
            ours=cpu,
            baseline=base,
            unit="cpu-s (lower is better)",
            target="<= 3x ffmpeg",
            met=cpu <= 3 * base,
            note=f"{setting}; MCAP {size / 1e6:.1f} MB",
            runs={"ours": [o[0] for o in ours], "ffmpeg": theirs},
        ),
        Figure(
            bench="window_mcap",
            metric=f"peak RSS writing a {large} s window vs a {small} s one",
            ours=float(rss_large),
            baseline=float(rss_small),
            unit="bytes (lower is better)",
            target="<= 1.25x (bounded by chunks, not by the window)",
            met=rss_large <= 1.25 * rss_small,
            note=f"{setting}; MCAP {median([float(g[2]) for g in long]) / 1e6:.1f} MB "
            f"vs {median([float(s[2]) for s in short]) / 1e6:.1f} MB",
            runs={"long": [float(g[1]) for g in long], "short": [float(s[1]) for s in short]},
        ),
    ]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), Path(sys.argv[3]))
    else:
        print(__doc__)
