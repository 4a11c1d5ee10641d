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
import itertools
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError, ResponseError

from cloud_ingest.config import IngestSettings
from cloud_ingest.coverage import Index
from cloud_ingest.failures import (
    Canary,
    EnvProbe,
    Failure,
    RawReadFailed,
    classify,
    describe,
    error_type,
)
from cloud_ingest.handoff import Handoff
from cloud_ingest.media_pool import MediaPool, WorkerError
from cloud_ingest.placement import WHEREABOUTS_PERIOD_S, whereabouts
from cloud_ingest.processor import ChunkProcessor, Outcome
from cloud_ingest.totals import MEDIA_MS, Tally
from cloud_ingest.windows import Windows
from shared import logs
from shared.backoff import Backoff
from shared.keys import consumer_totals_key, redis_probe_key, s3_probe_key, whereabouts_key
from shared.manifest import Rejected, wall_span
from shared.queue import (
    Acks,
    Entry,
    GroupConsumer,
    ReapCursor,
    connect,
    ensure_group,
    is_lost_group,
)
from shared.s3 import open_s3
from shared.settings import secret_values
from shared.tasks import Supervisor

log = structlog.get_logger("cloud_ingest")


def refused(exc: ResponseError) -> bool:
    """Redis's answer to a command (a script) that fails however often it is sent: a
    script error (``ERR``: redis-py keeps the code aside), a key of the wrong type. Not
    BUSY, LOADING, OOM, READONLY, NOGROUP: those pass, or the consumer pauses or creates
    the group again. (Redis 7 keeps those codes for errors inside a script; Redis 6
    wrapped them in ERR.)"""
    return getattr(exc, "status_code", None) == "ERR" or str(exc).startswith("WRONGTYPE")


def drain_stages(settings: IngestSettings) -> dict[str, float]:
    """How long each stage of an actor's shutdown may take, from ``stop()`` to ``run()``'s
    return. The actor holds each stage to its share (``Consumer._until_stopped``,
    ``_finish``, ``_close_tasks``, ``_within``) and the supervisor waits for the sum, so
    its deadline covers the actor's by construction."""
    grace = settings.close_grace_s
    call = 2 * settings.redis_timeout_s  # a Redis call at worst: a connect, then a reply
    return {
        "notice": call + 1.0,  # the drain loop's turn ends (else its Redis call is cut)
        "loop_cancel": grace,  # else it is cancelled
        "release": grace,  # entries not yet at work: cancelled, given back
        "work": settings.drain_timeout_s,  # work in progress finishes
        "cancel": grace,  # work past the drain timeout: cancelled
        "acks": 2 * call,  # the last acknowledgements: a batch re-sent, then the rest
        "tasks_return": grace,  # the long-lived loops return at their next turn
        "tasks_cancel": grace,  # else they are cancelled
        "close_handoff": grace,  # the hand-off's HTTP session
        "close_redis": grace,  # the Redis client
    }


def drain_budget_s(settings: IngestSettings) -> float:
    """The longest an actor takes to return from ``run()`` once ``stop()`` is called."""
    return sum(drain_stages(settings).values())


class Consumer:
    # The per-chunk work; a subclass may use another (the tests plant bugs this way).
    processor_class: type[ChunkProcessor] = ChunkProcessor

    def __init__(self, settings: IngestSettings, name: str, built_from: str = "") -> None:
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
        self._acks: dict[bytes, tuple[str, ...]] = {}  # entry id -> the counts it brings
        self._unsent: Acks | None = None  # a flush whose reply never came: sent again as is
        self._flushes = itertools.count()
        self._run_id = ""
        self._unreleased: list[Entry] = []  # to give back once Redis answers again
        self._reap = ReapCursor()
        self._slots = asyncio.Semaphore(settings.actor_concurrency)
        self._pause_backoff = Backoff(base=1.0, cap=settings.pause_max_s)
        self._stages = drain_stages(settings)
        self._current: asyncio.Future[dict[str, int]] | None = None  # the run in progress
        self._built_from = built_from  # the creating driver's fingerprint
        self._retired = False

    def pid(self) -> int:
        return os.getpid()

    def media_pids(self) -> list[int]:
        return self.pool.pids()

    async def stop(self) -> None:
        self._stop.set()

    async def retire(self) -> dict[str, int]:
        """Stop and wait for the run in progress (a driver replacing this actor)."""
        self._retired = True  # for good: a run() after this one (another driver) refuses
        self._stop.set()
        if self._current is None or self._current.done():
            return {}
        return await asyncio.shield(self._current)

    def fingerprint(self) -> str:
        """What this actor was built from (``placement.fingerprint``, by its driver): a new
        driver adopts it only if it would have built the very same one."""
        return self._built_from

    def where(self) -> dict[str, str]:
        return whereabouts()

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
        """Consume until stopped. A call while a run is in progress joins it: a driver that
        was killed and started again adopts this detached actor and calls ``run()`` once
        more, which must never start a second drain loop beside the first."""
        if self._retired:
            raise RuntimeError(f"{self.name} was retired; its replacement takes over")
        if self._current is None or self._current.done():
            self._stop.clear()
            self._current = asyncio.ensure_future(self._run_once())
        # Shielded: the run outlives a caller that goes away (the old driver).
        return await asyncio.shield(self._current)

    async def _run_once(self) -> dict[str, int]:
        structlog.contextvars.bind_contextvars(consumer=self.name)
        self.tally.run.clear()  # run() returns this run's counts (the supervisor sums them)
        self.abandoned = []
        self._closing.clear()
        self._run_id = uuid.uuid4().hex[:12]  # names this run's flushes (their tokens)
        settings = self.settings
        async with AsyncExitStack() as stack:
            s3 = await open_s3(stack, settings.s3_endpoint_url, settings.s3_region)
            redis = connect(settings, settings.redis_timeout_s)
            stack.push_async_callback(self._within, "close_redis", redis.aclose)
            queue = GroupConsumer(redis, settings.stream, settings.group, self.name)
            stack.push_async_callback(self.pool.close)
            await self.pool.start()
            processor = self.processor_class(
                settings, s3, redis, self.name, self.pool, tally=self.tally
            )
            canary = Canary(
                settings.output_bucket,
                s3_probe_key(settings.output_prefix, self.name),
                redis_probe_key(self.name),
                consumer_totals_key(settings.group, self.name),
            )
            buckets = [settings.raw_bucket, settings.output_bucket]
            probe = EnvProbe(s3, redis, buckets, self.pool, canary=canary)
            handoff = Handoff(settings, redis, s3, self.name, self.tally)
            stack.push_async_callback(self._within, "close_handoff", handoff.close)
            tasks = Supervisor(log, lambda _name: self.tally.inc("task_crashes"))
            stack.push_async_callback(self._close_tasks, tasks)
            tasks.start("leases", lambda: self._renew_leases(queue, processor))
            tasks.start("windows", lambda: self._windows(processor.windows, handoff))
            tasks.start("whereabouts", lambda: self._report_whereabouts(redis))
            tasks.start("coverage", lambda: self._coverage(processor.coverage))
            log.info("consumer.started", pid=os.getpid(), media_workers=self.pool.pids())
            loop = asyncio.create_task(self._drain_loop(queue, processor, probe), name="drain")
            try:
                await self._until_stopped(loop)
            finally:
                await self._finish(queue)
        log.info("consumer.stopped", **self.tally.run)
        return {**self.tally.run, "abandoned": len(self.abandoned)}

    async def _until_stopped(self, loop: asyncio.Task[None]) -> None:
        """Wait for the drain loop. Once ``stop()`` is called it has the "notice" stage to
        return (it looks at the stop flag every turn: within a second, unless a Redis call
        hangs), then it is cancelled. Re-raises what the loop raised."""
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([loop, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not loop.done():
                await asyncio.wait([loop], timeout=self._stages["notice"])
        finally:
            stopping.cancel()
            if not loop.done():
                log.warning("consumer.loop_cancelled", note="its turn outlasted the stop")
                loop.cancel()
                await asyncio.wait([loop], timeout=self._stages["loop_cancel"])
        if loop.done() and not loop.cancelled():
            loop.result()

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
                    await self._while_paused(queue, processor, probe)
                backoff.reset()
            except RedisError as exc:  # Redis restarting, unreachable, refusing: keep our work
                await self._queue_failed(queue, exc, backoff)

    async def _queue_failed(self, queue: GroupConsumer, exc: RedisError, backoff: Backoff) -> None:
        """A fetch or a flush failed. A lost consumer group is created again; a Redis that
        refuses what every chunk needs pauses the consumer; then wait and try again."""
        self.tally.inc("redis_errors")
        if is_lost_group(exc) and await self._recreate_group(queue):
            return
        if classify(exc) is Failure.ENVIRONMENT:
            self._pause(f"redis: {describe(exc)}")
        delay = backoff.next()
        log.warning("queue.unavailable", error=repr(exc)[:200], retry_in_s=round(delay, 2))
        await _wait(self._stop, delay)

    async def _recreate_group(self, queue: GroupConsumer) -> bool:
        """NOGROUP: Redis lost the stream or its group (restarted without persistence,
        FLUSHALL, XGROUP DESTROY). Create it again, from the stream's start, so entries
        added since are delivered; the bucket can rebuild what was lost (reconcile)."""
        try:
            created = await ensure_group(queue.client, queue.stream, queue.group)
        except RedisError as exc:
            log.warning("queue.group_recreate_failed", error=repr(exc)[:200])
            return False
        self._reap = ReapCursor()
        if created:  # else another consumer was first
            self.tally.inc("groups_recreated")
            log.error(
                "queue.group_recreated",
                stream=queue.stream,
                group=queue.group,
                note="Redis lost the consumer group; entries lost with it: cloud-ingest reconcile",
            )
        return True

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
            await self._until_a_chunk_ends()
        await self._flush_acks(queue)

    async def _until_a_chunk_ends(self) -> None:
        """The batch is full: wait for one of its chunks, or for a stop (the drain must not
        wait for slow chunks in every slot to finish first)."""
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait(
                [*self._in_flight.values(), stopping], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopping.cancel()

    async def _fetch(self, queue: GroupConsumer, count: int) -> list[Entry]:
        """Stale entries of dead consumers (reaper) when due, else own pending, else new."""
        vis = self.settings.visibility_timeout_s
        if time.monotonic() - self._reap.last_run >= max(1.0, vis / 2):
            claimed = await queue.claim_stale(self._reap, int(vis * 1000), count)
            if claimed:
                self.tally.inc("reclaimed", len(claimed))
                return claimed
        block_ms = 100 if self._in_flight else 1000
        return await queue.read(count, block_ms, working=self._holding())

    def _holding(self) -> set[bytes]:
        """Our pending entries we know of: at work, or done and not yet acknowledged."""
        unsent = self._unsent.entries if self._unsent is not None else {}
        return {*self._in_flight, *self._acks, *unsent}

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
            await self._dead_letter(queue, processor, entry, exc)
        except asyncio.CancelledError:  # drain, or a lease we lost: not the chunk's failure
            await self._release(queue, [entry])
            raise
        except Exception as exc:
            await self._failed(queue, processor, probe, entry, exc)
        finally:
            self._in_flight.pop(entry.id, None)
            self._working.discard(entry.id)

    async def _handle(self, processor: ChunkProcessor, entry: Entry) -> None:
        limit = self.settings.max_deliveries
        if entry.deliveries > limit:  # consumers died on it (or were killed) that often
            raise Rejected("max_deliveries", f"delivered {entry.deliveries} times, limit {limit}")
        if not entry.fields:  # deleted while pending: nothing to do but forget it
            self._acks[entry.id] = ()
            return
        outcome = await processor.process(entry, self._slot(entry.id))
        self._acks[entry.id] = self._count(outcome)
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

    def _count(self, outcome: Outcome) -> tuple[str, ...]:
        """The counts this chunk's acknowledgement brings (written only if the entry is
        still ours when it is acknowledged); its stage seconds are counted in any case."""
        names = [outcome.status]
        if outcome.waited:
            names.append("lock_waits")
        if outcome.status == "processed":
            names.append(f"verdict_{outcome.verdict}")
            # Its seconds of footage by verdict (in ms: the script adds integers).
            names.append(f"{MEDIA_MS}{outcome.verdict}={round(wall_span(outcome.manifest) * 1000)}")
            for stage, spent in outcome.timings.items():
                self.tally.spent(stage.removesuffix("_s"), spent)
        return tuple(names)

    async def _failed(
        self,
        queue: GroupConsumer,
        processor: ChunkProcessor,
        probe: EnvProbe,
        entry: Entry,
        exc: Exception,
    ) -> None:
        kind = classify(exc)
        problem = None
        if kind is Failure.ENVIRONMENT:  # Redis refusing what every chunk needs
            problem = f"redis: {describe(exc)}"
        elif kind is Failure.SUSPECT:
            problem = await probe.check()
            if problem is None and isinstance(exc, RawReadFailed):
                problem = await self._reads_fail(processor, probe, entry, exc)
            kind = Failure.TRANSIENT  # we can reach everything: this chunk's own failure
        if problem is not None:  # our environment, not the chunk: pause, give it back
            self._pause(problem)
            await self._release(queue, [entry])
            return
        self.tally.inc("failed_attempts")
        self._log_failure(kind, entry, exc)
        if entry.deliveries >= self.settings.max_deliveries:  # that was the last try
            await self._dead_letter(queue, processor, entry, self._last_failure(kind, entry, exc))

    async def _reads_fail(
        self, processor: ChunkProcessor, probe: EnvProbe, entry: Entry, exc: RawReadFailed
    ) -> str | None:
        """A raw read failed while the probe passed: that chunk's, unless chunks in a row
        fail alike. Then the probe reads, until it can, an object known to read fine
        (this consumer's or the group's last), else, knowing none, one that failed."""
        if not processor.reads.failed(entry.id, exc):
            return None
        probe.raw_canary = await processor.readable_object() or (exc.bucket, exc.key)
        n = processor.reads.threshold
        return f"s3 GetObject fails with {exc.code} for {n} chunks in a row (last {exc})"

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

    async def _dead_letter(
        self, queue: GroupConsumer, processor: ChunkProcessor, entry: Entry, exc: Rejected
    ) -> None:
        try:
            moved = await queue.dead_letter(entry, exc.reason, exc.detail)
        except RedisError as err:  # stays pending; the next delivery rejects it again
            log.warning(
                "chunk.dead_letter_failed", entry_id=entry.id.decode(), error=repr(err)[:200]
            )
            if classify(err) is Failure.ENVIRONMENT:
                # Back with the delivery count it had before this attempt: its next
                # consumer makes the last attempt again and letters it with its reason.
                self._pause(f"redis: {describe(err)}")
                await self._release(queue, [entry])
            return
        if not moved:  # the reaper gave it to another consumer meanwhile: theirs now
            log.warning("chunk.dead_letter_skipped", entry_id=entry.id.decode(), reason=exc.reason)
            return
        self.tally.note("dead_lettered")  # the script counted it in Redis
        self.tally.note(f"rejected_{exc.reason}")
        await processor.dead_lettered(entry, exc.reason)
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

    async def _while_paused(
        self, queue: GroupConsumer, processor: ChunkProcessor, probe: EnvProbe
    ) -> None:
        """No fetching; back off, probe again, resume once everything answers. The back-off
        grows across pauses until a chunk is acknowledged again (a fault the probe cannot see
        pauses the consumer again at once, and not ever faster)."""
        if await _wait(self._stop, self._pause_backoff.next()):
            return
        await self._flush_acks(queue)
        problem = await probe.check(fresh=True)
        if problem is not None:
            log.warning("consumer.still_paused", reason=problem)
            return
        idle = [e for e in self._unreleased if e.id not in self._in_flight]
        self._unreleased = []
        await self._release(queue, idle)
        log.warning("consumer.resumed", was=self.paused)
        self.paused = None
        probe.raw_canary = None
        processor.reads.reset()  # a fresh count after resuming

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
        """Acknowledgements and the totals' increments, in one script (see
        cloud_ingest.totals): a chunk counts as processed exactly when it is acknowledged,
        and only by the consumer whose entry it still was. A flush whose reply never came
        is kept and sent again as it is: its token makes a second application a no-op; then
        what was acknowledged meanwhile follows in a batch of its own."""
        while True:
            batch = self._unsent
            if batch is None:
                counts, seconds = self.tally.take()
                token = f"{self._run_id}:{next(self._flushes)}"
                batch, self._acks = Acks(self._acks, dict(counts), seconds, token), {}
                if not batch:
                    return
                self._unsent = batch
            try:
                await queue.ack(batch)  # raises: kept in _unsent, sent again as it is
            except ResponseError as exc:
                if refused(exc):  # sending it again cannot change that
                    self._refused(batch, exc)
                raise
            self._unsent = None
            self._settle(batch)

    def _refused(self, batch: Acks, exc: ResponseError) -> None:
        """Redis refused the flush itself (a script error, a totals key of another type):
        the batch is dropped, not sent for ever ahead of every later flush, and the
        consumer pauses (its probe looks at the totals hash too). Entries the script had
        acknowledged before the error are done but uncounted; the rest stay pending and
        are redone as duplicates; the batch's counts are lost, and said so."""
        self._unsent = None
        self.tally.inc("acks_refused", len(batch.entries))
        self._pause(f"redis refused the acknowledgements: {describe(exc)}")
        log.error(
            "consumer.acks_refused",
            entries=len(batch.entries),
            counts=dict(batch.counts),
            error=describe(exc),
            note="left pending: redone as duplicates",
        )

    def _settle(self, batch: Acks) -> None:
        # (A batch applied before, by a send whose reply was lost: its entries were
        # acknowledged then, those that were ours; this run's tally counts them all.)
        acked = set(batch.entries) if batch.applied_before else set(batch.acked)
        if acked:
            self._pause_backoff.reset()  # the environment works: a later pause starts afresh
        lost = []
        for entry_id, names in batch.entries.items():
            if entry_id in acked:
                for item in names:
                    name, _, by = item.partition("=")  # "name=N" counts N (the script's rule)
                    self.tally.note(name, int(by) if by else 1)
            elif names:
                lost.append(entry_id.decode())
        if lost:  # the reaper gave them to another consumer: theirs to count
            self.tally.inc("leases_lost", len(lost))
            log.warning("lease.lost", at="ack", entry_ids=lost[:20], entries=len(lost))

    async def _finish(self, queue: GroupConsumer) -> None:
        """Drain: entries not yet at work go back at once; work in progress gets
        INGEST_DRAIN_TIMEOUT_S, then is cancelled (its media worker killed) and its entry
        left pending for the next consumer, noted in ``abandoned``; then the last
        acknowledgements. Each stage is held to its share of ``drain_stages``."""
        stages = self._stages
        await _cancel(
            [t for i, t in self._in_flight.items() if i not in self._working], stages["release"]
        )
        working = dict(self._in_flight)
        if working:
            _, late = await asyncio.wait(working.values(), timeout=stages["work"])
            if late:
                self.abandoned = [i.decode() for i, t in working.items() if t in late]
                await _cancel(list(late), stages["cancel"])
                log.error(
                    "consumer.drain_incomplete",
                    abandoned=self.abandoned,
                    drain_timeout_s=self.settings.drain_timeout_s,
                    note="left pending: the next consumer takes them up",
                )
        try:
            await asyncio.wait_for(self._flush_acks(queue), stages["acks"])
        except (RedisError, TimeoutError) as exc:
            log.warning(
                "consumer.acks_unflushed",
                entries=len(self._unsent.entries) if self._unsent else 0,
                error=repr(exc)[:200],
                note="left pending: redone as duplicates",
            )

    # -- long-lived tasks (supervised) --------------------------------------------------------

    async def _report_whereabouts(self, redis: aioredis.Redis) -> None:
        """Which node and process this consumer runs on, for ``cloud-ingest status``."""
        here = {**whereabouts(), "since": str(int(time.time()))}
        while True:
            here["seen"] = str(int(time.time()))
            try:
                await redis.hset(whereabouts_key(self.settings.group), self.name, json.dumps(here))
            except RedisError as exc:
                log.debug("whereabouts.failed", error=repr(exc)[:200])
            if await _wait(self._closing, WHEREABOUTS_PERIOD_S):
                return

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

    async def _windows(self, windows: Windows, handoff: Handoff) -> None:
        """Close windows past their timeout and hand off closed ones, until the drain."""
        pause, ready = 0.0, False
        while not self._stop.is_set() and not await _wait(self._closing, pause):
            try:
                if not ready:  # the group, once (and again after a failure)
                    await handoff.setup()
                    ready = True
                await windows.close_due()
                pause = 0.0
                if not await handoff.step():
                    await handoff.track_jobs()
                    pause = 1.0
            except Exception as exc:  # a sink or Redis failed: the window stays pending
                self.tally.inc("handoff_retries")
                log.warning("handoff.retry", error=repr(exc)[:300], exc_info=exc)
                pause, ready = 2.0, False

    async def _coverage(self, index: Index) -> None:
        """Merge quiet camera-hours of the coverage index into S3, until the drain."""
        pause = min(5.0, max(0.2, self.settings.coverage_flush_s / 4))
        while not await _wait(self._closing, pause):
            try:
                _, failed = await index.flush()
                if failed:
                    self.tally.inc("coverage_flush_failures", failed)
            except Exception as exc:  # Redis: the hours stay dirty, merged next time
                self.tally.inc("coverage_flush_failures")
                log.warning("coverage.flush_failed", error=repr(exc)[:300])

    async def _close_tasks(self, tasks: Supervisor) -> None:
        """The long-lived loops return at their next turn; cancel any that does not (a
        cancelled Redis command can take a while to unwind), never waiting for ever."""
        self._closing.set()
        running = list(tasks.tasks.values())
        late: set[asyncio.Task[None]] = set()
        if running:
            _, late = await asyncio.wait(running, timeout=self._stages["tasks_return"])
        if late:
            try:
                await asyncio.wait_for(tasks.stop(), self._stages["tasks_cancel"])
            except TimeoutError:
                log.error("consumer.tasks_stuck", tasks=sorted(t.get_name() for t in late))

    async def _within(self, stage: str, close: Callable[[], Awaitable[None]]) -> None:
        """Close something within its drain stage's share (a peer gone silent)."""
        try:
            await asyncio.wait_for(close(), self._stages[stage])
        except TimeoutError:
            log.error("consumer.close_stuck", stage=stage)


async def _cancel(tasks: list[asyncio.Task[None]], grace: float) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        _, stuck = await asyncio.wait(tasks, timeout=grace)
        if stuck:
            log.error("consumer.tasks_stuck", tasks=len(stuck))


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``event`` is set first; True if it is set."""
    if not event.is_set() and seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()
