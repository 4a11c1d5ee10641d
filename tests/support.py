"""Helpers for tests on real servers: daemons as subprocesses, S3 and Redis inspection."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from devstack import daemons
from devstack.daemons import BIN, Daemon, log_events
from devstack.s3 import S3
from edge_agent.segmenter import ClosedChunk
from shared.keys import chunk_key, dlq_stream, manifest_key
from shared.manifest import Manifest, derive_chunk_id, sign
from shared.queue import publish

__all__ = ["BIN", "S3", "Daemon", "log_events"]
SECRET = "test-signing-secret"
KEY_ID = "k1"
# Chunks sent by Edge start at the top of the previous hour: recent enough for the cloud's
# freshness check on any day the suite runs, and aligned to scene windows.
# Fault tests' figures, printed again in the session's summary (captured output is not).
FIGURES: list[str] = []


def report_figures(name: str, figures: dict[str, Any]) -> None:
    line = f"{name}: {json.dumps(figures, default=str)}"
    FIGURES.append(line)
    print(f"\nFIGURES {line}")


BASE_TIME = (datetime.now(UTC) - timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)


@dataclass
class Stack:
    redis_url: str
    s3_endpoint: str
    ray_address: str
    raw_bucket: str
    out_bucket: str
    workdir: Path

    def edge_env(self, cameras: list[dict[str, str]], **extra: str) -> dict[str, str]:
        env = {
            "EDGE_DEVICE_ID": "dev-1",
            "EDGE_SITE_ID": "site-1",
            "EDGE_CAMERAS": json.dumps(cameras),
            "EDGE_SEGMENT_SECONDS": "2",
            "EDGE_SPOOL_DIR": str(self.workdir / "spool"),
            "EDGE_S3_ENDPOINT_URL": self.s3_endpoint,
            "EDGE_S3_BUCKET": self.raw_bucket,
            "EDGE_REDIS_URL": self.redis_url,
            "EDGE_STREAM": "chunks",
            "EDGE_SIGNING_KEY_ID": KEY_ID,
            "EDGE_SIGNING_KEY": SECRET,
            "EDGE_LOG_FORMAT": "json",
        }
        return {**base_env(), **env, **extra}

    def ingest_env(self, **extra: str) -> dict[str, str]:
        env = {
            "INGEST_REDIS_URL": self.redis_url,
            "INGEST_STREAM": "chunks",
            "INGEST_GROUP": "ingest",
            "INGEST_S3_ENDPOINT_URL": self.s3_endpoint,
            "INGEST_OUTPUT_BUCKET": self.out_bucket,
            "INGEST_RAW_BUCKET": self.raw_bucket,
            "INGEST_OUTPUT_PREFIX": "processed",
            "INGEST_CONSUMERS": "2",
            "INGEST_VISIBILITY_TIMEOUT_S": "10",
            "INGEST_MAX_DELIVERIES": "3",
            "INGEST_KEYRING": json.dumps({KEY_ID: {"secret": SECRET, "device_id": "dev-1"}}),
            "INGEST_ACTOR_CPUS": "0.25",
            "INGEST_LOG_FORMAT": "json",
            "RAY_ADDRESS": self.ray_address,
        }
        return {**base_env(), **env, **extra}


def base_env() -> dict[str, str]:
    keep = {
        k: v for k, v in os.environ.items() if not k.startswith(("EDGE_", "INGEST_", "RAY_ADDRESS"))
    }
    return {
        **keep,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    }


def edge_agent(stack: Stack, cameras: list[dict[str, str]], log: Path, **extra: str) -> Daemon:
    return daemons.edge_agent(stack.edge_env(cameras, **extra), log)


def cloud_ingest(stack: Stack, log: Path, **extra: str) -> Daemon:
    return daemons.cloud_ingest(stack.ingest_env(**extra), log)


async def metric_appears(http: Any, base: str, line: str) -> bool:
    """True once ``line`` is in ``{base}/metrics`` (False while the server is not up yet)."""
    try:
        async with http.get(f"{base}/metrics") as resp:
            return line in await resp.text()
    except (aiohttp.ClientError, OSError):
        return False


def promtool_problems(text: str) -> list[str]:
    """What ``promtool check metrics`` (Prometheus's own linter) says of a /metrics page;
    empty when it passes. Exit 1 is a parse error, 3 a lint problem."""
    import shutil
    import subprocess

    if shutil.which("promtool") is None:
        raise AssertionError("promtool missing: make deps installs Debian's prometheus package")
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    said = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    if result.returncode != 0 and not said:
        said = [f"promtool exited {result.returncode}"]
    return said


class NotifySocket:
    """A real AF_UNIX datagram socket where systemd's ``$NOTIFY_SOCKET`` would be: a thread
    reads every sd_notify message as it comes (as systemd would), with its monotonic time."""

    def __init__(self, path: Path) -> None:
        import socket
        import threading

        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._open = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._open:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def count(self, text: str, since: float = 0.0) -> int:
        return sum(m == text and t >= since for t, m in list(self.messages))

    def texts(self) -> list[str]:
        return [m for _, m in list(self.messages)]

    def close(self) -> None:
        self._open = False
        self._thread.join(2)
        self.sock.close()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def queue_state(
    redis_url: str, stream: str = "chunks", group: str = "ingest"
) -> dict[str, Any]:
    client = aioredis.from_url(redis_url)
    try:
        from shared.queue import status

        st = await status(client, stream, group)
        letters = await client.xrange(dlq_stream(stream))
    finally:
        await client.aclose()
    return {
        "length": st.length,
        "pending": st.pending,
        "dlq": st.dlq,
        "dlq_reasons": [f[b"reason"].decode() for _, f in letters],
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def segment_file(
    clip: Path, out: Path, seconds: float, *, loop: bool = False, limit: int = 0
) -> list[Any]:
    """Cut a clip into chunks with the Segmenter alone (no timestamp repair), without
    real-time pacing: chunks for tests of what comes after capture. ``capture_file``
    runs the agent's whole capture path."""
    import threading

    from edge_agent.capture import Source, SourceSpec
    from edge_agent.segmenter import Segmenter

    chunks: list[ClosedChunk] = []
    source = Source(f"file://{clip}", threading.Event())
    source.spec = SourceSpec(source.spec.target, {}, realtime=False, loop=loop)
    seg = Segmenter("cam1", source.stream, out, seconds, chunks.append)
    for n, pkt in enumerate(source.packets()):
        if limit and n >= limit:
            break
        seg.feed(pkt)
    seg.flush()
    source.close()
    return chunks


def capture_file(
    src: Path, out: Path, segment_s: float, on_chunk: Callable[[Any], None], camera: str = "cam1"
) -> None:
    """Run ``CameraWorker.capture_from`` on a recording, as fast as it demuxes."""
    import threading

    import structlog.testing

    from edge_agent.camera import CameraWorker
    from edge_agent.capture import Source, SourceSpec
    from edge_agent.config import EdgeSettings
    from edge_agent.metrics import EdgeMetrics

    config: dict[str, Any] = {
        "device_id": "dev-1",
        "site_id": "site-1",
        "s3_bucket": "raw-bucket",
        "signing_key": "k",
        "segment_seconds": segment_s,
        "cameras": [{"id": camera, "url": f"file://{src}"}],
    }
    settings = EdgeSettings(**config)
    stop = threading.Event()
    worker = CameraWorker(settings.cameras[0], settings, out, on_chunk, EdgeMetrics(), stop)
    source = Source(f"file://{src}", stop)
    source.spec = SourceSpec(source.spec.target, {}, realtime=False, loop=False)
    # Its log lines are captured, not printed: in the test process structlog may still be
    # bound to an earlier test's (closed) captured stdout.
    try:
        with structlog.testing.capture_logs():
            worker.capture_from(source)
    finally:
        source.close()


@dataclass
class Edge:
    """Plays a (possibly misbehaving) edge device: uploads a chunk and announces it."""

    stack: Stack
    s3: S3
    redis: aioredis.Redis

    async def send(
        self,
        chunk: ClosedChunk,
        seq: int,
        *,
        data: bytes | None = None,
        upload: bool = True,
        key_id: str = KEY_ID,
        secret: str = SECRET,
        tamper: bool = False,
        unsigned: bool = False,
        sidecar: bool = False,
        announce: bool = True,
        **fields: Any,
    ) -> Manifest:
        body = chunk.path.read_bytes() if data is None else data
        start = fields.pop("start_time", BASE_TIME + timedelta(seconds=2 * seq))
        duration = float(fields.pop("media_duration_s", 2.0))
        device, site = fields.get("device_id", "dev-1"), fields.get("site_id", "site-1")
        camera = fields.get("camera_id", "cam1")
        digest = chunk.sha256 if data is None else sha256(body)
        doc: dict[str, Any] = {
            "chunk_id": derive_chunk_id(device, camera, seq, fields.get("sha256", digest)),
            "device_id": device,
            "site_id": site,
            "camera_id": camera,
            "seq": seq,
            "bucket": self.stack.raw_bucket,
            "key": chunk_key("raw", site, camera, start, seq),
            "size_bytes": len(body),
            "sha256": digest,
            "container": "mp4",
            "codec": chunk.codec,
            "width": chunk.width,
            "height": chunk.height,
            "frame_count": chunk.frame_count,
            "keyframe_count": chunk.keyframe_count,
            "start_time": start,
            "end_time": start + timedelta(seconds=duration),
            "media_start_s": 2.0 * seq,
            "media_duration_s": duration,
            "discontinuity": False,
            "gap_before_s": 0.0,
            "agent_version": "test",
        }
        doc.update(fields)
        if doc["discontinuity"] and doc.get("schema_version", 2) == 2:
            doc.setdefault("gap_cause", "reconnect")  # version 2 names the cause of a gap
        manifest = Manifest.model_validate(doc)
        if upload:
            await self.s3.put(manifest.bucket, manifest.key, body)
        entry = sign(manifest, key_id, secret.encode()).to_fields()
        if tamper:
            entry["manifest"] = entry["manifest"].replace(b'"seq":', b'"seq":1')
        if unsigned:
            del entry["key_id"], entry["sig"]
        if sidecar:  # the signed manifest beside its chunk, as the agent stores it
            doc_text = json.dumps({k: v.decode() for k, v in entry.items()}, sort_keys=True)
            await self.s3.put(manifest.bucket, manifest_key(manifest.key), doc_text.encode())
        if announce:
            await publish(self.redis, "chunks", entry)
        return manifest


# -- cloud-side helpers -------------------------------------------------------------------

_SLOW_CHUNKS: dict[tuple[Path, int], ClosedChunk] = {}
# What makes the media work of a slow chunk slow (every frame decoded and JPEG'd at
# 1280x720), and lets its still scene pass the `static` filter.
SLOW_WORK = {
    "INGEST_SAMPLE_FPS": "30",
    "INGEST_RESIZE_SHORT_SIDE": "720",
    "INGEST_FILTER_STATIC_MOTION": "0",
}


def slow_chunk_in(session_dir: Path, seconds: int = 20) -> ClosedChunk:
    """A 1280x720, 30 fps chunk of a still scene, one keyframe a second (one per session
    and length, shared by the modules that need it). Cheap to make (x264 skips the
    repeated frames) and small (about 60 kB a second), but with SLOW_WORK its media work
    takes about 0.2 s per second of video (20 s: ~4 s, 60 s: ~9 s on one core), where
    the small test chunks take a tenth of a second."""
    if (session_dir, seconds) not in _SLOW_CHUNKS:
        clip = _still_clip(session_dir / f"still-{seconds}.mp4", seconds)
        [chunk] = segment_file(clip, session_dir / f"still-{seconds}", float(seconds))
        _SLOW_CHUNKS[session_dir, seconds] = chunk
    return _SLOW_CHUNKS[session_dir, seconds]


def _still_clip(path: Path, seconds: int, fps: int = 30, width: int = 1280) -> Path:
    import av
    import numpy as np

    height = width * 9 // 16
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x % 256, y % 256, (x + y) // 2 % 256], axis=2).astype(np.uint8)
    rgb[100:300, 200:400] = 255  # edges: not blurred
    image = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    with av.open(str(path), "w") as out:
        stream: Any = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": str(fps), "keyint_min": str(fps), "sc_threshold": "0"}
        stream.options["preset"] = "ultrafast"
        for i in range(seconds * fps):
            image.pts = i
            for packet in stream.encode(image):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def ingest_settings(stack: Stack, **overrides: Any) -> Any:
    """IngestSettings for a consumer actor a test starts itself (as ``ingest_env`` says)."""
    from cloud_ingest.config import IngestSettings

    values: dict[str, Any] = {
        "redis_url": stack.redis_url,
        "stream": "chunks",
        "group": "ingest",
        "s3_endpoint_url": stack.s3_endpoint,
        "output_bucket": stack.out_bucket,
        "raw_bucket": stack.raw_bucket,
        "visibility_timeout_s": 10,
        "max_deliveries": 3,
        "keyring": {KEY_ID: {"secret": SECRET, "device_id": "dev-1"}},
        "log_format": "json",
    }
    return IngestSettings(**{**values, **overrides})


def strict_json(text: str | bytes) -> Any:
    """``json.loads`` that refuses NaN and Infinity, as every strict parser does."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


# -- the cloud consumers' fault tests: servers of their own, actors, invariants ------------


@contextlib.contextmanager
def own_redis(workdir: Path) -> Iterator[Any]:
    """A redis-server of the test's own, to fill up, flush or cut off without the others."""
    from devstack.servers import RedisServer

    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def start_consumer(
    settings: Any, name: str, consumer_class: Any = None, env: dict[str, str] | None = None
) -> Any:
    """A consumer actor as the deployment starts one (not named, not supervised)."""
    import ray

    from cloud_ingest.consumer import Consumer

    options: dict[str, Any] = {"num_cpus": 0.25, "max_concurrency": 64}
    if env is not None:
        options["runtime_env"] = {"env_vars": env}
    return ray.remote(consumer_class or Consumer).options(**options).remote(settings, name)


async def actor_stats(actor: Any, timeout_s: float = 5.0) -> dict[str, float]:
    """A consumer actor's stats, or {} while it cannot answer (dead, restarting, busy)."""
    import ray

    try:
        stats: dict[str, float] = await asyncio.wait_for(actor.stats.remote(), timeout_s)
    except (ray.exceptions.RayError, TimeoutError):
        return {}
    return stats


async def holds(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    """``check`` is true at every look for ``seconds`` (that nothing happens takes a while
    to see); fails at the first look where it is not."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not await check():
            raise AssertionError(f"no longer true: {what}")
        await asyncio.sleep(0.25)


class SilentProxy:
    """A real TCP proxy, on a thread and event loop of its own, in front of ``host:port``.
    ``go_silent()``: every connection open at that moment stops passing bytes either way
    and is never closed, as when the peer vanished without a reset (a crashed host, a
    dropped NAT entry, a failover's old master); connections opened later pass as before."""

    def __init__(self, host: str, port: int) -> None:
        from devstack.servers import free_port

        self.upstream = (host, port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._links: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> SilentProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def go_silent(self) -> int:
        """Silence every open connection; returns how many."""
        result: int = self._call(self._silence(("up", "down")))
        return result

    def lose_replies(self) -> int:
        """Every open connection still carries commands to the server but no reply back:
        a command runs, its reply never comes. Returns how many."""
        result: int = self._call(self._silence(("down",)))
        return result

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port)

    async def _silence(self, ways: tuple[str, ...]) -> int:
        for link in self._links:
            for way in ways:
                link[way] = True
        return len(self._links)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self._links:
            for writer in link["writers"]:
                writer.close()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        link: dict[str, Any] = {"up": False, "down": False, "writers": [writer, up_writer]}
        self._links.append(link)
        await asyncio.gather(
            self._pipe(reader, up_writer, link, "up"),
            self._pipe(up_reader, writer, link, "down"),
            return_exceptions=True,
        )

    @staticmethod
    async def _pipe(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: dict[str, Any], way: str
    ) -> None:
        while data := await src.read(65536):
            if not link[way]:
                dst.write(data)
                await dst.drain()
        if not link[way]:
            dst.close()
