"""The consumer: a long-lived async Ray actor draining the stream.

``run()`` is the drain loop; ``stop()``, ``stats()`` and ``pid()`` are answered
concurrently (async actor). The consumer name is stable (``consumer-{i}``), so a
replacement actor resumes its predecessor's pending entries first. Retries belong
to the queue, not to Ray: a failed chunk stays pending and comes back through the
reaper until ``INGEST_MAX_DELIVERIES``, then goes to the DLQ.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from contextlib import AsyncExitStack

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from cloud_ingest.config import IngestSettings
from cloud_ingest.handoff import Handoff, close_expired
from cloud_ingest.processor import ChunkProcessor
from shared import logs
from shared.backoff import Backoff
from shared.manifest import Rejected
from shared.queue import Entry, GroupConsumer, ReapCursor
from shared.s3 import open_s3
from shared.settings import secret_values

log = structlog.get_logger("cloud_ingest")


class Consumer:
    def __init__(self, settings: IngestSettings, name: str) -> None:
        logs.configure(settings.log_level, settings.log_format, secret_values(settings))
        self.settings = settings
        self.name = name
        self.counts: Counter[str] = Counter()
        self.seconds: dict[str, float] = {}  # stage latencies, summed (seconds_download...)
        self._stop = asyncio.Event()
        self._in_flight: dict[bytes, asyncio.Task[None]] = {}
        self._acks: list[bytes] = []
        self._reap = ReapCursor()
        self._slots = asyncio.Semaphore(settings.actor_concurrency)

    def pid(self) -> int:
        return os.getpid()

    async def stop(self) -> None:
        self._stop.set()

    async def stats(self) -> dict[str, float]:
        return {**self.counts, **self.seconds, "in_flight": len(self._in_flight)}

    async def run(self) -> dict[str, int]:
        structlog.contextvars.bind_contextvars(consumer=self.name)
        async with AsyncExitStack() as stack:
            s3 = await open_s3(stack, self.settings.s3_endpoint_url, self.settings.s3_region)
            redis = aioredis.from_url(self.settings.redis_url.get_secret_value())
            stack.push_async_callback(redis.aclose)
            queue = GroupConsumer(redis, self.settings.stream, self.settings.group, self.name)
            processor = ChunkProcessor(self.settings, s3, redis, self.name)
            renewer = asyncio.create_task(self._renew_leases(queue))
            handoff = Handoff(self.settings, redis, self.name)
            stack.push_async_callback(handoff.close)
            windows = asyncio.create_task(self._windows(redis, handoff))
            log.info("consumer.started", pid=os.getpid())
            try:
                await self._drain_loop(queue, processor)
                await self._finish(queue)
            finally:
                renewer.cancel()
                windows.cancel()
        log.info("consumer.stopped", **self.counts)
        return dict(self.counts)

    async def _drain_loop(self, queue: GroupConsumer, processor: ChunkProcessor) -> None:
        backoff = Backoff(base=0.2, cap=5.0)
        while not self._stop.is_set():
            try:
                await self._step(queue, processor)
                backoff.reset()
            except RedisError as exc:  # Redis restarting or unreachable: wait, keep our work
                self.counts["redis_errors"] += 1
                delay = backoff.next()
                log.warning("queue.unavailable", error=repr(exc)[:200], retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)

    async def _step(self, queue: GroupConsumer, processor: ChunkProcessor) -> None:
        free = self.settings.batch_size - len(self._in_flight)
        if free > 0:
            for entry in await self._fetch(queue, free):
                if entry.id in self._in_flight:  # our own, reclaimed: already working on it
                    continue
                self._in_flight[entry.id] = asyncio.create_task(self._one(queue, processor, entry))
        else:
            await asyncio.wait(self._in_flight.values(), return_when=asyncio.FIRST_COMPLETED)
        await self._flush_acks(queue)

    async def _fetch(self, queue: GroupConsumer, count: int) -> list[Entry]:
        """Stale entries of dead consumers (reaper) when due, else own pending, else new."""
        vis = self.settings.visibility_timeout_s
        if time.monotonic() - self._reap.last_run >= max(1.0, vis / 2):
            claimed = await queue.claim_stale(self._reap, int(vis * 1000), count)
            if claimed:
                self.counts["reclaimed"] += len(claimed)
                return claimed
        block_ms = 100 if self._in_flight else 1000
        return await queue.read(count, block_ms)

    async def _one(self, queue: GroupConsumer, processor: ChunkProcessor, entry: Entry) -> None:
        try:
            if entry.deliveries > self.settings.max_deliveries:
                await self._dead_letter(
                    queue,
                    entry,
                    Rejected(
                        "max_deliveries",
                        f"delivered {entry.deliveries} times, limit {self.settings.max_deliveries}",
                    ),
                )
                return
            if not entry.fields:  # deleted while pending: nothing to do but forget it
                self._acks.append(entry.id)
                return
            async with self._slots:
                outcome = await processor.process(entry)
            self.counts[outcome.status] += 1
            if outcome.status == "busy":
                return  # stays pending; redelivered once the other copy is done
            if outcome.status == "processed":
                self.counts[f"verdict_{outcome.verdict}"] += 1
                for stage, spent in outcome.timings.items():
                    key = f"seconds_{stage.removesuffix('_s')}"
                    self.seconds[key] = self.seconds.get(key, 0.0) + spent
            self._acks.append(entry.id)
            m = outcome.manifest
            log.info(
                "chunk",
                outcome=outcome.status,
                verdict=outcome.verdict,
                chunk_id=m.chunk_id,
                camera_id=m.camera_id,
                seq=m.seq,
                bytes=m.size_bytes,
                deliveries=entry.deliveries,
                **{k: round(v, 4) for k, v in outcome.timings.items()},
            )
        except Rejected as exc:
            await self._dead_letter(queue, entry, exc)
        except Exception as exc:  # transient: stays pending, the reaper brings it back
            self.counts["failed_attempts"] += 1
            log.warning(
                "chunk.retry_later",
                entry_id=entry.id.decode(),
                deliveries=entry.deliveries,
                error=repr(exc)[:300],
            )
            if entry.deliveries >= self.settings.max_deliveries:  # that was the last try
                await self._dead_letter(
                    queue,
                    entry,
                    Rejected(
                        "max_deliveries",
                        f"failed {entry.deliveries} deliveries, last: {exc!r}"[:500],
                    ),
                )
        finally:
            self._in_flight.pop(entry.id, None)

    async def _dead_letter(self, queue: GroupConsumer, entry: Entry, exc: Rejected) -> None:
        try:
            await queue.dead_letter(entry, exc.reason, exc.detail)
        except RedisError as err:  # stays pending; the next delivery rejects it again
            log.warning(
                "chunk.dead_letter_failed", entry_id=entry.id.decode(), error=repr(err)[:200]
            )
            return
        self.counts["dead_lettered"] += 1
        self.counts[f"rejected_{exc.reason}"] += 1
        log.warning(
            "chunk",
            outcome="dead_lettered",
            reason=exc.reason,
            detail=exc.detail[:300],
            entry_id=entry.id.decode(),
            deliveries=entry.deliveries,
        )

    async def _flush_acks(self, queue: GroupConsumer) -> None:
        acks, self._acks = self._acks, []
        try:
            await queue.ack(acks)
        except RedisError:
            self._acks.extend(acks)  # not lost: retried with the next flush
            raise

    async def _finish(self, queue: GroupConsumer) -> None:
        """Drain: finish what is in flight (bounded), acknowledge it, then return."""
        if self._in_flight:
            await asyncio.wait(self._in_flight.values(), timeout=self.settings.drain_timeout_s)
        await self._flush_acks(queue)

    async def _windows(self, redis: aioredis.Redis, handoff: Handoff) -> None:
        """Close windows past their timeout and hand off closed ones, forever (cancelled)."""
        while True:
            try:
                await handoff.setup()
                while True:
                    await close_expired(redis, self.settings)
                    if not await handoff.step():
                        await handoff.track_jobs()
                        await asyncio.sleep(1.0)
                    for key, value in handoff.counts.items():
                        self.counts[key] = value
            except Exception as exc:  # a sink or Redis failed: the window stays pending
                log.warning("handoff.retry", error=repr(exc)[:300])
                await asyncio.sleep(2.0)

    async def _renew_leases(self, queue: GroupConsumer) -> None:
        """Keep long work from being reclaimed: reset idle time well before the timeout."""
        period = self.settings.visibility_timeout_s / 3
        while True:
            await asyncio.sleep(period)
            try:
                await queue.renew(list(self._in_flight))
            except Exception as exc:
                log.warning("lease.renew_failed", error=repr(exc)[:200])
