"""Delivery: upload each committed chunk, then announce its manifest, oldest first.

``EDGE_UPLOAD_CONCURRENCY`` workers drain one queue of chunk ids. A worker claims
its chunk in the ledger (atomic with eviction), uploads it, records that, signs
and announces the manifest, records that. Failures of S3, Redis, the network or
the ledger are retried with back-off until the chunk is done, for as long as the
agent runs; each completed step is recorded before the next, so a retry never
repeats a finished one. Anything else is a bug: the chunk goes back on the queue
and the exception ends the worker, which its supervisor logs, counts and restarts.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
import structlog
from botocore.exceptions import BotoCoreError, ClientError
from redis.exceptions import RedisError

from edge_agent.config import EdgeSettings
from edge_agent.health import Progress
from edge_agent.ledger import LEDGER_ERRORS, Ledger
from edge_agent.metrics import EdgeMetrics
from edge_agent.publisher import announce, with_evictions
from edge_agent.spool import UNFINISHED, WRITTEN, Record
from shared import logs
from shared.backoff import Backoff
from shared.manifest import Manifest
from shared.uploader import Uploader

log = structlog.get_logger("edge_agent")

DEPENDENCY_ERRORS = (BotoCoreError, ClientError, RedisError)  # S3 or Redis said no
RETRYABLE = (*DEPENDENCY_ERRORS, *LEDGER_ERRORS)


class Delivery:
    def __init__(
        self,
        settings: EdgeSettings,
        metrics: EdgeMetrics,
        ledger: Ledger,
        progress: Progress,
        uploader: Uploader,
        redis: aioredis.Redis,
        s3: Any,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.ledger = ledger
        self.spool = ledger.spool
        self.progress = progress
        self.uploader = uploader
        self.redis = redis
        self.s3 = s3
        self.ready: asyncio.Queue[str] = asyncio.Queue()
        self.in_flight: set[str] = set()

    def waiting(self) -> int:
        return self.ready.qsize() + len(self.in_flight)

    async def worker(self) -> None:
        while True:
            chunk_id = await self.ready.get()
            try:
                await self._deliver(chunk_id)
            except BaseException:
                self.ready.put_nowait(chunk_id)  # never dropped: tried again, by any worker
                raise
            finally:
                self.ready.task_done()

    async def _deliver(self, chunk_id: str) -> None:
        rec = await self.ledger.retry("claim", self.spool.claim, chunk_id)
        if rec is None:
            return  # announced already, evicted, or another worker holds it
        self.in_flight.add(chunk_id)
        try:
            await self._until_done(rec)
        finally:
            self.in_flight.discard(chunk_id)
            # On the ledger thread too: the busy lock may be held there by an eviction
            # waiting on a locked database, and the loop must never wait for that.
            await self.ledger.call(self.spool.release, chunk_id)

    async def _until_done(self, rec: Record) -> None:
        """Upload, then announce; each retried with back-off until it is done."""
        backoff = Backoff(base=0.5, cap=30.0)
        timings: dict[str, float] = {}
        while rec.state in UNFINISHED:
            stage = "upload" if rec.state == WRITTEN else "announce"
            try:
                rec = await (self._upload if stage == "upload" else self._announce)(rec, timings)
            except RETRYABLE as exc:
                if isinstance(exc, DEPENDENCY_ERRORS):
                    self.progress.dep_failed()  # not a stall: S3 or Redis refuses the work
                self.metrics.delivery_retries.labels(stage).inc()
                delay = backoff.next()
                log.warning(
                    "chunk.retry",
                    chunk_id=rec.chunk_id,
                    stage=stage,
                    error=repr(exc)[:300],
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)

    async def _upload(self, rec: Record, timings: dict[str, float]) -> Record:
        m = rec.manifest
        if not self._intact(rec):
            return await self._lost(rec)
        t0 = time.monotonic()
        self.progress.streaming += 1
        try:
            await self.uploader.upload(rec.path, m)
        finally:
            self.progress.streaming -= 1
        elapsed = time.monotonic() - t0
        timings["upload_s"] = round(elapsed, 4)
        self.metrics.upload_seconds.observe(elapsed)
        self.metrics.uploaded.labels(m.camera_id).inc()
        self.metrics.bytes_uploaded.labels(m.camera_id).inc(m.size_bytes)
        self.progress.moved("delivery")
        # Retried here, not by the caller: a ledger that refuses the write must not cost
        # another upload of a chunk that is in S3 already.
        await self.ledger.retry("mark_uploaded", self.spool.mark_uploaded, rec.chunk_id)
        return Record(rec.chunk_id, rec.path, "uploaded", m)

    @staticmethod
    def _intact(rec: Record) -> bool:
        """The chunk's file is still the one committed (a size check; the cloud checks the
        sha256): a file that vanished or changed is lost, never retried for ever."""
        try:
            return rec.path.stat().st_size == rec.manifest.size_bytes
        except FileNotFoundError:
            return False

    async def _lost(self, rec: Record) -> Record:
        m = rec.manifest
        if await self.ledger.retry("mark_lost", self.spool.mark_lost, rec.chunk_id) is not None:
            self.metrics.lost.labels(m.camera_id).inc()
            logs.chunk_line(log.error, "lost", m, reason="file missing or changed in the spool")
        return Record(rec.chunk_id, rec.path, "lost", m)

    async def _announce(self, rec: Record, timings: dict[str, float]) -> Record:
        m = await self.ledger.retry("finalize", self.spool.finalize, rec.chunk_id, with_evictions)
        if m is None:  # not uploaded any more: announced meanwhile (cannot happen: claimed)
            return Record(rec.chunk_id, rec.path, "announced", rec.manifest)
        t0 = time.monotonic()
        entry_id = await announce(self.redis, self.s3, self.settings, m)
        timings["announce_s"] = round(time.monotonic() - t0, 4)
        self.metrics.announced.labels(m.camera_id).inc()
        self.progress.moved("delivery")
        # As above: a second XADD of the same manifest would be a duplicate announcement.
        await self.ledger.retry("mark_announced", self.spool.mark_announced, rec.chunk_id)
        self._log_chunk(m, entry_id, timings)
        return Record(rec.chunk_id, rec.path, "announced", m)

    def _log_chunk(self, m: Manifest, entry_id: bytes, timings: dict[str, float]) -> None:
        """The canonical line: one per chunk, everything an operator needs about it."""
        latency = (datetime.now(UTC) - m.end_time).total_seconds()
        logs.chunk_line(
            log.info,
            "announced",
            m,
            key=m.key,
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
            **timings,
        )
