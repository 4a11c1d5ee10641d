"""The edge daemon: start-up → main loop → drain, each readable on its own.

Camera threads capture and segment (blocking PyAV work) and commit chunks to
the spool; asyncio workers upload each committed chunk and only then announce
its manifest. The ledger makes every step resumable after a restart.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
import structlog
from botocore.exceptions import BotoCoreError, ClientError
from redis.exceptions import RedisError

from edge_agent.capture import CameraError, Source
from edge_agent.config import Camera, EdgeSettings
from edge_agent.publisher import announce, build_manifest
from edge_agent.segmenter import ClosedChunk, Segmenter
from edge_agent.spool import ANNOUNCED, UPLOADED, WRITTEN, Position, Spool
from edge_agent.uploader import upload
from shared.backoff import Backoff
from shared.manifest import Manifest
from shared.s3 import open_s3

log = structlog.get_logger("edge_agent")

RETRYABLE = (BotoCoreError, ClientError, RedisError, OSError)


class EdgeService:
    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self.spool = Spool(settings.spool_dir)
        self.stats: Counter[str] = Counter()
        self.stop_capture = threading.Event()
        self._stopping = asyncio.Event()
        self._ready: asyncio.Queue[str] = asyncio.Queue()

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        async with AsyncExitStack() as stack:
            s3 = await open_s3(stack, self.settings.s3_endpoint_url, self.settings.s3_region)
            redis = aioredis.from_url(self.settings.redis_url.get_secret_value())
            stack.push_async_callback(redis.aclose)
            self._startup()
            workers = [
                asyncio.create_task(self._worker(s3, redis), name=f"uploader-{i}")
                for i in range(self.settings.upload_concurrency)
            ]
            cameras = [
                asyncio.create_task(asyncio.to_thread(self._camera_loop, cam, loop), name=cam.id)
                for cam in self.settings.cameras
            ]
            log.info("agent.started", cameras=len(cameras), device_id=self.settings.device_id)
            await self._stopping.wait()
            await self._drain(cameras, workers)
        self.spool.close()
        return 0

    def _startup(self) -> None:
        recovered, quarantined = self.spool.recover()
        backlog = self.spool.unfinished()
        for chunk_id in backlog:
            self._ready.put_nowait(chunk_id)
        log.info(
            "spool.recovered",
            recovered=recovered,
            quarantined=quarantined,
            backlog=len(backlog),
            **self.spool.counts(),
        )

    async def _drain(
        self, cameras: list[asyncio.Task[None]], workers: list[asyncio.Task[None]]
    ) -> None:
        """Stop capture (closing open chunks), then finish uploads and announcements."""
        log.info("agent.draining", backlog=self._ready.qsize())
        deadline = time.monotonic() + self.settings.drain_timeout_s
        self.stop_capture.set()
        await asyncio.wait(cameras, timeout=self.settings.drain_timeout_s)
        try:
            await asyncio.wait_for(self._ready.join(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            log.warning("agent.drain_timeout", left_in_spool=self._ready.qsize())
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        log.info("agent.stopped", **self.stats, spool=self.spool.counts())

    # -- capture (one thread per camera) ----------------------------------------

    def _camera_loop(self, cam: Camera, loop: asyncio.AbstractEventLoop) -> None:
        structlog.contextvars.bind_contextvars(camera_id=cam.id)
        backoff = Backoff(base=1.0, cap=30.0)
        while not self.stop_capture.is_set():
            started = time.monotonic()
            try:
                finished = self._capture(cam, loop)
            except CameraError as exc:
                self.stats["camera_errors"] += 1
                log.warning("camera.error", error=str(exc))
                finished = False
            if finished:
                log.info("camera.finished")
                return
            if time.monotonic() - started > 60:
                backoff.reset()
            self.stop_capture.wait(backoff.next())

    def _capture(self, cam: Camera, loop: asyncio.AbstractEventLoop) -> bool:
        """One connection's worth of capture. True when a non-looping replay ended."""
        source = Source(cam.url, self.settings.camera_timeout_s, self.stop_capture)
        log.info(
            "camera.connected",
            codec=source.stream.codec_context.name,
            width=source.stream.codec_context.width,
            height=source.stream.codec_context.height,
        )

        def committed(chunk: ClosedChunk) -> None:
            manifest = self.spool.commit(chunk, self._manifest_for)
            self.stats["chunks_written"] += 1
            loop.call_soon_threadsafe(self._ready.put_nowait, manifest.chunk_id)

        segmenter = Segmenter(
            cam.id, source.stream, self.spool.tmp_dir, self.settings.segment_seconds, committed
        )
        try:
            for pkt in source.packets():
                segmenter.feed(pkt)
        finally:
            # Keep what was captured before a stop, an EOF or a read error.
            segmenter.flush()
            source.close()
        return source.spec.realtime and not source.spec.loop

    def _manifest_for(self, chunk: ClosedChunk, seq: int, prev: Position) -> Manifest:
        return build_manifest(self.settings, chunk, seq, prev)

    # -- delivery (asyncio workers) ---------------------------------------------

    async def _worker(self, s3: Any, redis: aioredis.Redis) -> None:
        while True:
            chunk_id = await self._ready.get()
            try:
                await self._deliver(s3, redis, chunk_id)
            finally:
                self._ready.task_done()

    async def _deliver(self, s3: Any, redis: aioredis.Redis, chunk_id: str) -> None:
        """Upload, then announce; retried with back-off until done (or cancelled at drain)."""
        backoff = Backoff(base=0.5, cap=30.0)
        timings: dict[str, float] = {}
        while True:
            rec = self.spool.get(chunk_id)
            if rec is None or rec.state not in (WRITTEN, UPLOADED):
                return
            try:
                if rec.state == WRITTEN:
                    t0 = time.monotonic()
                    await upload(s3, rec.path, rec.manifest)
                    timings["upload_s"] = round(time.monotonic() - t0, 4)
                    self.spool.mark(chunk_id, UPLOADED)
                    self.stats["chunks_uploaded"] += 1
                t0 = time.monotonic()
                entry_id = await announce(redis, self.settings, rec.manifest)
                timings["announce_s"] = round(time.monotonic() - t0, 4)
                self.spool.mark(chunk_id, ANNOUNCED)
                self.stats["chunks_announced"] += 1
                self._log_chunk(rec.manifest, entry_id, timings)
                return
            except RETRYABLE as exc:
                self.stats["delivery_retries"] += 1
                log.warning("chunk.retry", chunk_id=chunk_id, error=repr(exc)[:300])
                await asyncio.sleep(backoff.next())

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
            media_s=round(m.media_duration_s, 3),
            discontinuity=m.discontinuity,
            gap_before_s=round(m.gap_before_s, 3),
            entry_id=entry_id.decode(),
            latency_s=round(latency, 3),
            outcome="announced",
            **timings,
        )
