"""The edge daemon: start-up → main loop → drain, each readable on its own.

Camera threads capture and segment (blocking PyAV work) and commit chunks to
the spool; asyncio workers upload each committed chunk and only then announce
its manifest. The ledger makes every step resumable after a restart. The main
loop serves health and metrics, pings the systemd watchdog while the agent is
healthy, and enforces the spool's disk limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
import structlog
from botocore.exceptions import BotoCoreError, ClientError
from redis.exceptions import RedisError

from edge_agent.camera import CameraWorker
from edge_agent.config import EdgeSettings
from edge_agent.metrics import EdgeMetrics
from edge_agent.publisher import announce, build_manifest, with_evictions
from edge_agent.segmenter import ClosedChunk
from edge_agent.spool import UPLOADED, WRITTEN, Limits, Position, Record, Spool
from edge_agent.uploader import RateLimit, Uploader
from shared import systemd
from shared.backoff import Backoff
from shared.http import serve
from shared.manifest import Manifest
from shared.s3 import open_s3

log = structlog.get_logger("edge_agent")

RETRYABLE = (BotoCoreError, ClientError, RedisError, OSError)
HOUSEKEEPING_S = 5.0


class EdgeService:
    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self.metrics = EdgeMetrics()
        limits = Limits(
            settings.spool_max_bytes, settings.spool_min_free_bytes, settings.spool_eviction
        )
        self.spool = Spool(settings.spool_dir, limits)
        self.stop_capture = threading.Event()
        self._stopping = asyncio.Event()
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.workers: list[CameraWorker] = []
        self.s3: Any = None

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        async with AsyncExitStack() as stack:
            s3 = self.s3 = await open_s3(
                stack, self.settings.s3_endpoint_url, self.settings.s3_region
            )
            redis = aioredis.from_url(
                self.settings.redis_url.get_secret_value(),
                socket_timeout=10,
                socket_connect_timeout=5,
            )
            stack.push_async_callback(redis.aclose)
            token = self.settings.http_token
            runner = await serve(
                self.settings.http_bind,
                self.metrics.registry,
                lambda: self._readiness(s3, redis),
                token=None if token is None else token.get_secret_value(),
            )
            stack.push_async_callback(runner.cleanup)
            self._startup()
            uploader = Uploader(
                s3,
                multipart_threshold=self.settings.multipart_threshold_bytes,
                part_size=self.settings.multipart_part_bytes,
                rate=RateLimit(self.settings.upload_max_bps),
            )
            delivery = [
                asyncio.create_task(self._deliver_loop(uploader, redis))
                for _ in range(self.settings.upload_concurrency)
            ]
            # One thread per camera, not the default executor's: that one has only
            # min(32, CPUs + 4) threads, so blocking camera loops took all of them (6 on
            # 2 cores) and starved the uploads' and housekeeping's to_thread calls, and the
            # cameras beyond those never started.
            pool = ThreadPoolExecutor(max(1, len(self.workers)), thread_name_prefix="camera")
            stack.callback(pool.shutdown, wait=False)
            cameras = [
                asyncio.create_task(self._camera(pool, w), name=w.cam.id) for w in self.workers
            ]
            systemd.notify("READY=1")
            log.info("agent.started", cameras=len(cameras), device_id=self.settings.device_id)
            await self._main_loop(cameras)
            systemd.notify("STOPPING=1")
            await self._drain(cameras, delivery)
        self.spool.close()
        return 0

    def _startup(self) -> None:
        recovered = self.spool.recover(self._manifest_for)
        for kind in ("lost",):
            if recovered[kind]:
                log.error("spool.chunks_lost", count=recovered[kind])
        backlog = self.spool.unfinished()
        for chunk_id in backlog:
            self._ready.put_nowait(chunk_id)
        log.info("spool.recovered", backlog=len(backlog), **recovered, **self.spool.counts())
        self.workers = [
            CameraWorker(
                cam,
                self.settings,
                self.spool.tmp_dir,
                self._committed,
                self.metrics,
                self.stop_capture,
            )
            for cam in self.settings.cameras
        ]

    @staticmethod
    async def _camera(pool: ThreadPoolExecutor, worker: CameraWorker) -> None:
        """``worker.run`` on its own thread, in a copy of our context (as to_thread does)."""
        context = contextvars.copy_context()
        await asyncio.get_running_loop().run_in_executor(pool, context.run, worker.run)

    async def _main_loop(self, cameras: list[asyncio.Task[None]]) -> None:
        """Housekeeping until asked to stop; the watchdog is pinged only while healthy."""
        ping = systemd.watchdog_interval()
        period = min(HOUSEKEEPING_S, ping) if ping else HOUSEKEEPING_S
        while not self._stopping.is_set():
            await asyncio.to_thread(self._housekeeping)
            if ping and self._healthy(cameras):
                systemd.notify("WATCHDOG=1")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), period)

    def _healthy(self, cameras: list[asyncio.Task[None]]) -> bool:
        """Alive means: no camera thread died unexpectedly and the ledger answers."""
        crashed = [t for t in cameras if t.done() and t.exception() is not None]
        if crashed:
            return False
        try:
            self.spool.counts()
        except Exception:
            return False
        return True

    def _housekeeping(self) -> None:
        for rec in self.spool.enforce_limits():
            self._evicted(rec)
        self.metrics.spool_bytes.set(self.spool.pending_bytes())
        counts = self.spool.counts()
        for state in (WRITTEN, UPLOADED):
            self.metrics.ledger_backlog.labels(state).set(counts.get(state, 0))

    async def _readiness(self, s3: Any, redis: aioredis.Redis) -> dict[str, bool]:
        checks: dict[str, bool] = {}
        try:
            await asyncio.wait_for(s3.head_bucket(Bucket=self.settings.s3_bucket), 3)
            checks["s3"] = True
        except Exception:
            checks["s3"] = False
        try:
            checks["redis"] = bool(await asyncio.wait_for(redis.ping(), 3))
        except Exception:
            checks["redis"] = False
        checks["cameras"] = any(w.breaker.failures == 0 for w in self.workers)
        return checks

    async def _drain(
        self, cameras: list[asyncio.Task[None]], delivery: list[asyncio.Task[None]]
    ) -> None:
        """Stop capture (closing open chunks), then finish uploads and announcements."""
        log.info("agent.draining", backlog=self._ready.qsize())
        deadline = time.monotonic() + self.settings.drain_timeout_s
        self.stop_capture.set()
        if cameras:
            await asyncio.wait(cameras, timeout=self.settings.drain_timeout_s)
        try:
            await asyncio.wait_for(self._ready.join(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            log.warning("agent.drain_timeout", left_in_spool=self._ready.qsize())
        for task in delivery:
            task.cancel()
        await asyncio.gather(*delivery, return_exceptions=True)
        log.info("agent.stopped", **self._totals(), spool=self.spool.counts())

    def _totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, metric in (
            ("chunks_written", self.metrics.written),
            ("chunks_uploaded", self.metrics.uploaded),
            ("chunks_announced", self.metrics.announced),
            ("chunks_evicted", self.metrics.evicted),
        ):
            out[name] = int(
                sum(
                    s.value
                    for m in metric.collect()
                    for s in m.samples
                    if s.name.endswith("_total")
                )
            )
        return out

    # -- camera threads call these ------------------------------------------------

    def _committed(self, chunk: ClosedChunk) -> None:
        manifest, evicted = self.spool.commit(chunk, self._manifest_for)
        self.metrics.written.labels(chunk.camera_id).inc()
        for rec in evicted:
            self._evicted(rec)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._ready.put_nowait, manifest.chunk_id)

    def _evicted(self, rec: Record) -> None:
        m = rec.manifest
        self.metrics.evicted.labels(m.camera_id).inc()
        log.warning(
            "chunk",
            outcome="evicted",
            camera_id=m.camera_id,
            seq=m.seq,
            chunk_id=m.chunk_id,
            bytes=m.size_bytes,
            media_s=round(m.media_duration_s, 3),
            policy=self.settings.spool_eviction,
        )

    def _manifest_for(self, chunk: ClosedChunk, seq: int, prev: Position) -> Manifest:
        return build_manifest(self.settings, chunk, seq, prev)

    # -- delivery (asyncio workers) ---------------------------------------------

    async def _deliver_loop(self, uploader: Uploader, redis: aioredis.Redis) -> None:
        while True:
            chunk_id = await self._ready.get()
            self.spool.claim(chunk_id)
            try:
                await self._deliver(uploader, redis, chunk_id)
            finally:
                self.spool.release(chunk_id)
                self._ready.task_done()

    async def _deliver(self, uploader: Uploader, redis: aioredis.Redis, chunk_id: str) -> None:
        """Upload, then announce; retried with back-off until done (or cancelled at drain)."""
        backoff = Backoff(base=0.5, cap=30.0)
        timings: dict[str, float] = {}
        while True:
            rec = self.spool.get(chunk_id)
            if rec is None or rec.state not in (WRITTEN, UPLOADED):
                return  # announced already, or evicted while waiting
            stage = "upload" if rec.state == WRITTEN else "announce"
            try:
                if stage == "upload":
                    await self._upload(uploader, rec, timings)
                    continue
                await self._announce(redis, rec, timings)
                return
            except RETRYABLE as exc:
                self.metrics.delivery_retries.labels(stage).inc()
                delay = backoff.next()
                log.warning(
                    "chunk.retry",
                    chunk_id=chunk_id,
                    stage=stage,
                    error=repr(exc)[:300],
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)

    async def _upload(self, uploader: Uploader, rec: Record, timings: dict[str, float]) -> None:
        t0 = time.monotonic()
        await uploader.upload(rec.path, rec.manifest)
        elapsed = time.monotonic() - t0
        timings["upload_s"] = round(elapsed, 4)
        self.metrics.upload_seconds.observe(elapsed)
        self.metrics.uploaded.labels(rec.manifest.camera_id).inc()
        self.metrics.bytes_uploaded.labels(rec.manifest.camera_id).inc(rec.manifest.size_bytes)
        self.spool.mark_uploaded(rec.chunk_id)

    async def _announce(
        self, redis: aioredis.Redis, rec: Record, timings: dict[str, float]
    ) -> None:
        m = rec.manifest
        gap, evicted = self.spool.evicted_run_before(m.camera_id, m.seq)
        m = with_evictions(m, gap, evicted)
        t0 = time.monotonic()
        entry_id = await announce(redis, self.s3, self.settings, m)
        timings["announce_s"] = round(time.monotonic() - t0, 4)
        self.spool.mark_announced(rec.chunk_id)
        self.metrics.announced.labels(m.camera_id).inc()
        self._log_chunk(m, entry_id, timings)

    def _log_chunk(self, m: Manifest, entry_id: bytes, timings: dict[str, float]) -> None:
        """The canonical line: one per chunk, everything an operator needs about it."""
        latency = (datetime.now(UTC) - m.end_time).total_seconds()
        log.info(
            "chunk",
            camera_id=m.camera_id,
            seq=m.seq,
            chunk_id=m.chunk_id,
            key=m.key,
            bytes=m.size_bytes,
            frames=m.frame_count,
            keyframes=m.keyframe_count,
            media_start_s=round(m.media_start_s, 3),
            media_s=round(m.media_duration_s, 3),
            discontinuity=m.discontinuity,
            gap_before_s=round(m.gap_before_s, 3),
            evicted_before=m.evicted_before,
            clock_drift_s=m.clock_drift_s,
            start_time=m.start_time.isoformat(),
            end_time=m.end_time.isoformat(),
            entry_id=entry_id.decode(),
            latency_s=round(latency, 3),
            outcome="announced",
            **timings,
        )
