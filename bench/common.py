"""What every benchmark shares: the local stack, process measurement, figures.

Every figure is a ratio of ours against a baseline measured in the same run on the
same input, because this machine is shared and noisy: absolute numbers move from
run to run, ratios much less. A benchmark module exposes::

    def run(ctx: Context) -> list[Figure]

and may put series for plots in ``Figure.series``. ``bench/run.py`` runs them in
order on one stack and writes ``bench/results/``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from devstack.servers import RedisServer, SeaweedS3

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"  # generated inputs, reused across runs (git-ignored)
RESULTS = ROOT / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
# SeaweedFS without -s3.config accepts any credentials; the clients still need some.
AWS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class Context:
    """One benchmark session: a workdir, a Redis and a SeaweedFS S3, and how hard to try."""

    work: Path
    redis_url: str
    s3_endpoint: str
    repeats: int = 3  # each measurement is the median of this many runs
    quick: bool = False  # BENCH_QUICK=1: smaller inputs, for a smoke run

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a child process: ours, the S3 credentials, ``extra``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_", "INGEST_"))}
        env.update(AWS)
        env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        env.update(extra)
        return env


@dataclass
class Figure:
    """One measured comparison. ``ratio`` is ours / baseline, oriented by ``unit``."""

    bench: str  # "edge_capture", "upload", "queue", "processing", "latency"
    metric: str  # what was compared, in words
    ours: float
    baseline: float | None  # None for an absolute target (e.g. p99 latency)
    unit: str
    target: str  # e.g. ">= 0.9x s5cmd", "<= 1.1x ffmpeg", "p99 <= 4.5 s"
    met: bool | None  # None: not measured (say why in ``note``)
    note: str = ""
    runs: dict[str, list[float]] = field(default_factory=dict)  # every run's raw value
    series: dict[str, Any] = field(default_factory=dict)  # for plots

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        assert self.baseline is not None
        return self.ours / self.baseline


@dataclass
class Usage:
    """What a process tree used: wall seconds, CPU seconds (user+system), peak RSS."""

    wall_s: float
    cpu_s: float
    peak_rss: int  # bytes: the largest sum of the tree's RSS seen by the sampler
    rss_series: list[tuple[float, int]] = field(default_factory=list)  # (seconds, bytes)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def _cpu_and_rss(pid: int) -> tuple[float, int]:
    """(CPU seconds of the process and its reaped children, RSS bytes); zeros when gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0
    # fields[0] is state (field 3): utime=14, stime=15, cutime=16, cstime=17, rss=24
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / CLK_TCK, int(fields[21]) * PAGE


class Sampler:
    """Samples a set of process trees' CPU and RSS from /proc every ``interval`` seconds.

    CPU is the sum over every process ever seen (its last reading), so processes that
    exit mid-run still count; RSS is the sum over those alive at each sample.
    """

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.5) -> None:
        self._pids = pids
        self.interval = interval
        self._cpu: dict[int, float] = {}
        self.rss_series: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = 0.0

    def __enter__(self) -> Sampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        rss = 0
        for root in self._pids():
            for pid in tree(root):
                cpu, r = _cpu_and_rss(pid)
                if r:
                    self._cpu[pid] = max(self._cpu.get(pid, 0.0), cpu)
                    rss += r
        self.rss_series.append((time.monotonic() - self._t0, rss))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def usage(self) -> Usage:
        wall = self.rss_series[-1][0] if self.rss_series else 0.0
        peak = max((r for _, r in self.rss_series), default=0)
        return Usage(wall, sum(self._cpu.values()), peak, list(self.rss_series))


def run_measured(
    argv: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 600,
    cwd: Path | None = None,
) -> tuple[Usage, subprocess.CompletedProcess[bytes]]:
    """Run a command to completion and measure its process tree. The CPU figure is
    exact (the kernel's accounting of the reaped children), not sampled."""
    before = os.times()
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with Sampler(lambda: [proc.pid] if proc.poll() is None else []) as sampler:
        out, err = proc.communicate(timeout=timeout)
    after = os.times()
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    usage = sampler.usage()
    usage.wall_s, usage.cpu_s = time.monotonic() - start, cpu
    return usage, subprocess.CompletedProcess(argv, proc.returncode, out, err)


def synthetic_manifest(
    seq: int,
    digest: str,
    start: datetime,
    *,
    device: str,
    site: str,
    camera: str,
    bucket: str,
    prefix: str,
    size_bytes: int,
) -> Any:
    """A valid manifest of a 2 s 1080p chunk (30 frames, 2 keyframes) at ``start``, its
    key derived as the agent derives it. (Imports late: arq's venv has only pydantic.)"""
    from shared.keys import chunk_key
    from shared.manifest import Manifest, derive_chunk_id

    return Manifest(
        chunk_id=derive_chunk_id(device, camera, seq, digest),
        device_id=device,
        site_id=site,
        camera_id=camera,
        seq=seq,
        bucket=bucket,
        key=chunk_key(prefix, site, camera, start, seq),
        size_bytes=size_bytes,
        sha256=digest,
        container="mp4",
        codec="h264",
        width=1920,
        height=1080,
        frame_count=30,
        keyframe_count=2,
        start_time=start,
        end_time=start + timedelta(seconds=2),
        media_start_s=2.0 * seq,
        media_duration_s=2.0,
        discontinuity=False,
        gap_before_s=0.0,
        agent_version="bench",
    )


def side_venv(name: str, requirements: list[str]) -> Path:
    """The python of a virtual environment of its own, in CACHE, for a baseline whose
    pins clash with ours (arq caps redis-py below 6): created on first use."""
    venv = CACHE / f"venv-{name}"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if stamp.exists() and stamp.read_text() == repr(requirements):
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *requirements], check=True)
    stamp.write_text(repr(requirements))
    return python


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


@contextmanager
def stack(work: Path, *, quick: bool) -> Iterator[Context]:
    """A Redis and a SeaweedFS S3 for the whole session, stopped on the way out."""
    os.environ.update(AWS)
    with ExitStack() as es:
        redis = RedisServer(work)
        redis.start()
        es.callback(redis.stop)
        s3 = SeaweedS3(work)
        s3.start()
        es.callback(s3.stop)
        yield Context(work, redis.url, s3.endpoint, repeats=1 if quick else 3, quick=quick)


def clip_1080p(seconds: int = 20) -> Path:
    """A pre-encoded 1080p 15 fps H.264 clip at about 4 Mb/s, 1 s GOPs, cached in CACHE.

    Encoded once with ffmpeg's x264 (the RTSP server and every benchmark then only
    remux it: no live encoding)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"clip-1080p15-4M-{seconds}s.mp4"
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp.mp4")
    subprocess.run(
        [
            "ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc2=size=1920x1080:rate=15:duration={seconds}",
            "-f", "lavfi", "-i", f"nullsrc=size=1920x1080:rate=15:duration={seconds},"
            "geq=random(1)*255:128:128",
            "-filter_complex", "[0:v][1:v]blend=all_mode=overlay:all_opacity=0.15,format=yuv420p",
            "-c:v", "libx264", "-preset", "veryfast", "-profile:v", "high",
            "-b:v", "4M", "-maxrate", "4M", "-bufsize", "8M",
            "-g", "15", "-keyint_min", "15", "-sc_threshold", "0", "-bf", "0",
            "-movflags", "+faststart", str(tmp),
        ],
        check=True,
    )  # fmt: skip
    tmp.rename(path)
    return path
