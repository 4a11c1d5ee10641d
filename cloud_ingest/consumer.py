"""The consumer: a long-lived async Ray actor draining the stream.

``run()`` is the drain loop; ``stop()``, ``stats()`` and ``pid()`` are answered
concurrently (async actor). The consumer name is stable (``consumer-{i}``), so a
replacement actor resumes its predecessor's pending entries first. Retries belong
to the queue, not to Ray: a failed attempt leaves the entry pending and it comes
back through the reaper until ``INGEST_MAX_DELIVERIES``, then goes to the DLQ with
the reason of its last failure (``cloud_ingest.failures``). When the consumer's own
environment is broken (a probe says so) it pauses instead, and gives its entries
back to the others without counting the attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from cloud_ingest.config import IngestSettings
from cloud_ingest.failures import EnvProbe, Failure, classify, error_type
from cloud_ingest.handoff import Handoff, close_expired
from cloud_ingest.media_pool import MediaPool, WorkerError
from cloud_ingest.processor import ChunkProcessor, Outcome
from cloud_ingest.totals import Tally, write_increments
from shared import logs
from shared.backoff import Backoff
from shared.manifest import Rejected
from shared.queue import Entry, GroupConsumer, ReapCursor
from shared.s3 import open_s3
from shared.settings import secret_values
from shared.tasks import Supervisor

log = structlog.get_logger("cloud_ingest")

CLOSE_GRACE_S = 5.0  # how long a drained consumer waits for its loops and cancelled work


class Consumer:
    # The per-chunk work; a subclass may use another (the tests plant bugs this way).
    processor_class: type[ChunkProcessor] = ChunkProcessor

    def __init__(self, settings: IngestSettings, name: str) -> None:
        logs.configure(settings.log_level, settings.log_format, secret_values(settings))
        self.settings = settings
        self.name = name
        self.tally = Tally()
        self.paused: str | None = None  # why, while the environment probe fails
        self.abandoned: list[str] = []  # entries whose work the drain cut off
        self.pool = MediaPool(settings.actor_concurrency, settings.process_timeout_s)
        self._stop = asyncio.Event()  # stop taking work (drain)
        self._closing = asyncio.Event()  # drained: the long-lived loops return
        self._in_flight: dict[bytes, asyncio.Task[None]] = {}
        self._working: set[bytes] = set()  # in flight and past the wait for a slot
        self._acks: list[bytes] = []
        self._unreleased: list[Entry] = []  # to give back once Redis answers again
        self._reap = ReapCursor()
        self._slots = asyncio.Semaphore(settings.actor_concurrency)
        self._pause_backoff = Backoff(base=1.0, cap=30.0)

    def pid(self) -> int:
        return os.getpid()

    def media_pids(self) -> list[int]:
        return self.pool.pids()

    async def stop(self) -> None:
        self._stop.set()

    async def stats(self) -> dict[str, float]:
        return {
            **self.tally.run,
            "in_flight": len(self._in_flight),
            "working": len(self._working),
            "media_workers": self.pool.size,
            "media_busy": self.pool.busy,
            "media_waiting": self.pool.waiting,
            "paused": float(self.paused is not None),
        }

    async def run(self) -> dict[str, int]:
        structlog.contextvars.bind_contextvars(consumer=self.name)
        self.tally.run.clear()  # run() returns this run's counts (the supervisor sums them)
        self.abandoned = []
        self._closing.clear()
        async with AsyncExitStack() as stack:
            s3 = await open_s3(stack, self.settings.s3_endpoint_url, self.settings.s3_region)
            redis = aioredis.from_url(self.settings.redis_url.get_secret_value())
            stack.push_async_callback(redis.aclose)
            queue = GroupConsumer(redis, self.settings.stream, self.settings.group, self.name)
            stack.push_async_callback(self.pool.close)
            await self.pool.start()
            processor = self.processor_class(self.settings, s3, redis, self.name, self.pool)
            buckets = [self.settings.raw_bucket, self.settings.output_bucket]
            probe = EnvProbe(s3, redis, buckets, self.pool)
            handoff = Handoff(self.settings, redis, self.name, self.tally)
            stack.push_async_callback(handoff.close)
            tasks = Supervisor(log, lambda _name: self.tally.inc("task_crashes"))
            stack.push_async_callback(self._close_tasks, tasks)
            tasks.start("leases", lambda: self._renew_leases(queue, processor))
            tasks.start("windows", lambda: self._windows(redis, handoff))
            log.info("consumer.started", pid=os.getpid(), media_workers=self.pool.pids())
            try:
                await self._drain_loop(queue, processor, probe)
            finally:
                await self._finish(queue)
        log.info("consumer.stopped", **self.tally.run)
        return {**self.tally.run, "abandoned": len(self.abandoned)}

    # -- the loop ----------------------------------------------------------------------

    async def _drain_loop(
        self, queue: GroupConsumer, processor: ChunkProcessor, probe: EnvProbe
    ) -> None:
        backoff = Backoff(base=0.2, cap=5.0)
        while not self._stop.is_set():
            try:
                if self.paused is None:
                    await self._step(queue, processor, probe)
                else:
                    await self._while_paused(queue, probe)
                backoff.reset()
            except RedisError as exc:  # Redis restarting or unreachable: wait, keep our work
                self.tally.inc("redis_errors")
                delay = backoff.next()
                log.warning("queue.unavailable", error=repr(exc)[:200], retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)

    async def _step(self, queue: GroupConsumer, processor: ChunkProcessor, probe: EnvProbe) -> None:
        free = self.settings.batch_size - len(self._in_flight)
        if free > 0:
            for entry in await self._fetch(queue, free):
                if entry.id in self._in_flight:  # our own, reclaimed: already working on it
                    continue
                task = asyncio.create_task(self._one(queue, processor, probe, entry))
                task.add_done_callback(self._watch)
                self._in_flight[entry.id] = task
        else:
            await asyncio.wait(self._in_flight.values(), return_when=asyncio.FIRST_COMPLETED)
        await self._flush_acks(queue)

    async def _fetch(self, queue: GroupConsumer, count: int) -> list[Entry]:
        """Stale entries of dead consumers (reaper) when due, else own pending, else new."""
        vis = self.settings.visibility_timeout_s
        if time.monotonic() - self._reap.last_run >= max(1.0, vis / 2):
            claimed = await queue.claim_stale(self._reap, int(vis * 1000), count)
            if claimed:
                self.tally.inc("reclaimed", len(claimed))
                return claimed
        block_ms = 100 if self._in_flight else 1000
        return await queue.read(count, block_ms)

    def _watch(self, task: asyncio.Task[None]) -> None:
        """_one handles every failure itself; anything escaping it is logged, never lost."""
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("chunk.task_crashed", exc_info=exc)

    # -- one entry -----------------------------------------------------------------------

    async def _one(
        self, queue: GroupConsumer, processor: ChunkProcessor, probe: EnvProbe, entry: Entry
    ) -> None:
        try:
            await self._handle(processor, entry)
        except Rejected as exc:
            await self._dead_letter(queue, entry, exc)
        except asyncio.CancelledError:  # drain, or a lease we lost: not the chunk's failure
            await self._release(queue, [entry])
            raise
        except Exception as exc:
            await self._failed(queue, probe, entry, exc)
        finally:
            self._in_flight.pop(entry.id, None)
            self._working.discard(entry.id)

    async def _handle(self, processor: ChunkProcessor, entry: Entry) -> None:
        limit = self.settings.max_deliveries
        if entry.deliveries > limit:  # consumers died on it (or were killed) that often
            raise Rejected("max_deliveries", f"delivered {entry.deliveries} times, limit {limit}")
        if not entry.fields:  # deleted while pending: nothing to do but forget it
            self._acks.append(entry.id)
            return
        outcome = await processor.process(entry, self._slot(entry.id))
        self._count(outcome)
        self._acks.append(entry.id)
        logs.chunk_line(
            log.info,
            outcome.status,
            outcome.manifest,
            verdict=outcome.verdict,
            deliveries=entry.deliveries,
            waited_for_lock=outcome.waited,
            **{k: round(v, 4) for k, v in outcome.timings.items()},
        )

    @contextlib.asynccontextmanager
    async def _slot(self, entry_id: bytes) -> AsyncIterator[None]:
        """One of INGEST_ACTOR_CONCURRENCY chunks at work; the drain waits for these."""
        async with self._slots:
            self._working.add(entry_id)
            yield

    def _count(self, outcome: Outcome) -> None:
        self.tally.inc(outcome.status)
        if outcome.waited:
            self.tally.inc("lock_waits")
        if outcome.status == "processed":
            self.tally.inc(f"verdict_{outcome.verdict}")
            for stage, spent in outcome.timings.items():
                self.tally.spent(stage.removesuffix("_s"), spent)

    async def _failed(
        self, queue: GroupConsumer, probe: EnvProbe, entry: Entry, exc: Exception
    ) -> None:
        kind = classify(exc)
        if kind is Failure.SUSPECT:
            problem = await probe.check()
            if problem is not None:  # our environment, not the chunk: pause, give it back
                self._pause(problem)
                await self._release(queue, [entry])
                return
            kind = Failure.TRANSIENT  # we can reach everything: this chunk's own failure
        self.tally.inc("failed_attempts")
        self._log_failure(kind, entry, exc)
        if entry.deliveries >= self.settings.max_deliveries:  # that was the last try
            await self._dead_letter(queue, entry, self._last_failure(kind, entry, exc))

    def _log_failure(self, kind: Failure, entry: Entry, exc: Exception) -> None:
        where = {"entry_id": entry.id.decode(), "deliveries": entry.deliveries}
        if kind is Failure.INTERNAL:
            self.tally.inc("internal_errors")
            trace = exc.trace if isinstance(exc, WorkerError) else None
            log.error(
                "chunk.internal_error",
                **where,
                error_type=error_type(exc),
                exc_info=exc,
                worker_traceback=trace,
            )
        elif kind is Failure.TIMEOUT:
            self.tally.inc("process_timeouts")
            log.warning("chunk.process_timeout", **where, error=str(exc))
        else:
            log.warning("chunk.retry_later", **where, error=repr(exc)[:300])

    def _last_failure(self, kind: Failure, entry: Entry, exc: Exception) -> Rejected:
        n, limit = entry.deliveries, self.settings.max_deliveries
        if kind is Failure.TIMEOUT:
            return Rejected("process_timeout", f"{exc} (delivery {n} of {limit})")
        if kind is Failure.INTERNAL:
            return Rejected("internal_error", f"{error_type(exc)}: {exc}"[:1000])
        return Rejected("max_deliveries", f"failed {n} deliveries, last: {exc!r}"[:1000])

    async def _dead_letter(self, queue: GroupConsumer, entry: Entry, exc: Rejected) -> None:
        try:
            moved = await queue.dead_letter(entry, exc.reason, exc.detail)
        except RedisError as err:  # stays pending; the next delivery rejects it again
            log.warning(
                "chunk.dead_letter_failed", entry_id=entry.id.decode(), error=repr(err)[:200]
            )
            return
        if not moved:  # the reaper gave it to another consumer meanwhile: theirs now
            log.warning("chunk.dead_letter_skipped", entry_id=entry.id.decode(), reason=exc.reason)
            return
        self.tally.inc("dead_lettered")
        self.tally.inc(f"rejected_{exc.reason}")
        log.warning(
            "chunk",
            outcome="dead_lettered",
            reason=exc.reason,
            detail=exc.detail[:300],
            entry_id=entry.id.decode(),
            deliveries=entry.deliveries,
        )

    # -- pausing on a broken environment ---------------------------------------------------

    def _pause(self, problem: str) -> None:
        if self.paused is None:
            self.paused = problem
            self.tally.inc("pauses")
            log.error("consumer.paused", reason=problem, note="entries go back to the others")

    async def _while_paused(self, queue: GroupConsumer, probe: EnvProbe) -> None:
        """No fetching; back off, probe again, resume once everything answers."""
        await self._flush_acks(queue)
        if await _wait(self._stop, self._pause_backoff.next()):
            return
        problem = await probe.check(fresh=True)
        if problem is not None:
            log.warning("consumer.still_paused", reason=problem)
            return
        idle = [e for e in self._unreleased if e.id not in self._in_flight]
        self._unreleased = []
        await self._release(queue, idle)
        log.warning("consumer.resumed", was=self.paused)
        self.paused = None
        self._pause_backoff.reset()

    async def _release(self, queue: GroupConsumer, entries: list[Entry]) -> None:
        """Entries back to the group uncounted (see GroupConsumer.release); never raises."""
        if not entries:
            return
        try:
            released = await queue.release(entries)
        except RedisError as exc:
            self._unreleased.extend(entries)
            log.warning("chunk.release_failed", entries=len(entries), error=repr(exc)[:200])
            return
        if released:
            self.tally.inc("released", released)

    # -- acknowledgements, drain ------------------------------------------------------------

    async def _flush_acks(self, queue: GroupConsumer) -> None:
        """Acknowledgements and the totals' increments, in one transaction: a chunk counts
        as processed exactly when it is acknowledged (see cloud_ingest.totals)."""
        acks, self._acks = self._acks, []
        taken = self.tally.take()
        group = self.settings.group
        try:
            await queue.ack(acks, also=lambda pipe: write_increments(pipe, group, self.name, taken))
        except RedisError:
            self._acks.extend(acks)  # not lost: retried with the next flush
            self.tally.give_back(taken)
            raise

    async def _finish(self, queue: GroupConsumer) -> None:
        """Drain: entries not yet at work go back at once; work in progress gets
        INGEST_DRAIN_TIMEOUT_S, then is cancelled (its media worker killed) and its entry
        left pending for the next consumer, noted in ``abandoned``."""
        await _cancel([t for i, t in self._in_flight.items() if i not in self._working])
        working = dict(self._in_flight)
        if working:
            _, late = await asyncio.wait(working.values(), timeout=self.settings.drain_timeout_s)
            if late:
                self.abandoned = [i.decode() for i, t in working.items() if t in late]
                await _cancel(list(late))
                log.error(
                    "consumer.drain_incomplete",
                    abandoned=self.abandoned,
                    drain_timeout_s=self.settings.drain_timeout_s,
                    note="left pending: the next consumer takes them up",
                )
        with contextlib.suppress(RedisError):
            await self._flush_acks(queue)

    # -- long-lived tasks (supervised) --------------------------------------------------------

    async def _renew_leases(self, queue: GroupConsumer, processor: ChunkProcessor) -> None:
        """Keep long work from being reclaimed: reset the idle time of the entries we still
        own, and their chunk locks, well before the timeout. An entry the reaper gave to
        another consumer is not taken back: its work here is cancelled."""
        period = self.settings.visibility_timeout_s / 3
        ttl = self.settings.lock_ttl_ms()
        while not await _wait(self._closing, period):
            ids = list(self._in_flight)
            locks = dict(processor.locks[i] for i in ids if i in processor.locks)
            try:
                lost = await queue.renew(ids, locks, ttl)
            except RedisError as exc:
                log.warning("lease.renew_failed", error=repr(exc)[:200])
                continue
            for entry_id in lost:
                task = self._in_flight.get(entry_id)
                if task is not None:  # else finished meanwhile
                    self.tally.inc("leases_lost")
                    log.warning("lease.lost", entry_id=entry_id.decode())
                    task.cancel()

    async def _windows(self, redis: aioredis.Redis, handoff: Handoff) -> None:
        """Close windows past their timeout and hand off closed ones, until the drain."""
        pause, ready = 0.0, False
        while not self._stop.is_set() and not await _wait(self._closing, pause):
            try:
                if not ready:  # the group, once (and again after a failure)
                    await handoff.setup()
                    ready = True
                await close_expired(redis, self.settings)
                pause = 0.0
                if not await handoff.step():
                    await handoff.track_jobs()
                    pause = 1.0
            except Exception as exc:  # a sink or Redis failed: the window stays pending
                self.tally.inc("handoff_retries")
                log.warning("handoff.retry", error=repr(exc)[:300], exc_info=exc)
                pause, ready = 2.0, False

    async def _close_tasks(self, tasks: Supervisor) -> None:
        """The long-lived loops return at their next turn; cancel any that does not (a
        cancelled Redis command can take a while to unwind), never waiting for ever."""
        self._closing.set()
        running = list(tasks.tasks.values())
        late: set[asyncio.Task[None]] = set()
        if running:
            _, late = await asyncio.wait(running, timeout=CLOSE_GRACE_S)
        if late:
            try:
                await asyncio.wait_for(tasks.stop(), CLOSE_GRACE_S)
            except TimeoutError:
                log.error("consumer.tasks_stuck", tasks=sorted(t.get_name() for t in late))


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        _, stuck = await asyncio.wait(tasks, timeout=CLOSE_GRACE_S)
        if stuck:
            log.error("consumer.tasks_stuck", tasks=len(stuck))


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``event`` is set first; True if it is set."""
    if not event.is_set() and seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()
