"""The edge daemon: start-up → main loop → drain, each readable on its own.

Camera threads capture and segment (blocking PyAV work) and hand each closed
chunk to the loop; the committer gives it its ledger row, delivery workers
upload it and only then announce its manifest. Every ledger call runs on the
ledger thread, never on the loop. Every long-lived task is supervised: a crash
is logged with its traceback, counted and the task restarted. The main loop
pings the systemd watchdog only while the agent makes progress (``health``).

Signals: the first SIGTERM/SIGINT drains (cameras close their open chunks,
the backlog is committed, uploaded and announced within
``EDGE_DRAIN_TIMEOUT_S``); a second one skips the graceful waits, as uvicorn
does: what is left stays in the spool for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import signal
import threading
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from typing import Any

import redis.asyncio as aioredis
import structlog

from edge_agent.camera import CameraWorker
from edge_agent.config import EdgeSettings
from edge_agent.delivery import Delivery
from edge_agent.health import Lane, Progress, measure_loop_lag
from edge_agent.ledger import Ledger
from edge_agent.metrics import EdgeMetrics
from edge_agent.publisher import build_manifest
from edge_agent.segmenter import ClosedChunk
from edge_agent.spool import UNFINISHED, Freed, Limits, Position, Recovered, Spool
from edge_agent.uploader import RateLimit, Uploader
from shared import systemd
from shared.http import serve
from shared.manifest import Manifest
from shared.s3 import open_s3
from shared.tasks import Supervisor

log = structlog.get_logger("edge_agent")

HOUSEKEEPING_S = 5.0
PROBE_S = 5.0
PROBE_TIMEOUT_S = 3.0
PRUNE_EVERY_S = 600.0


class EdgeService:
    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self.metrics = EdgeMetrics()
        limits = Limits(
            settings.spool_max_bytes,
            settings.spool_min_free_bytes,
            settings.spool_eviction,
            settings.quarantine_max_bytes,
            settings.quarantine_max_age_s,
        )
        self.spool = Spool(
            settings.spool_dir, limits, busy_timeout_s=settings.ledger_busy_timeout_s
        )
        self.ledger = Ledger(self.spool, self.metrics)
        self.progress = Progress(settings.delivery_stall_s)
        self.stop_capture = threading.Event()
        self._stopping = asyncio.Event()
        self._forced = asyncio.Event()
        self._recovered = False
        self._closed: asyncio.Queue[ClosedChunk] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.workers: list[CameraWorker] = []
        self.cameras: list[asyncio.Task[None]] = []
        self.delivery: Delivery | None = None
        self.tasks = Supervisor(log, lambda name: self.metrics.task_crashes.labels(name).inc())

    @property
    def forced(self) -> bool:
        """True when a second signal cut the drain short (the caller exits at once)."""
        return self._forced.is_set()

    def request_stop(self) -> None:
        if self._stopping.is_set():
            log.warning("agent.force_stop", hint="second signal: skipping the graceful waits")
            self._forced.set()
        self._stopping.set()

    # -- start-up -----------------------------------------------------------------

    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        # aiohttp reads upload bodies in the default executor, and a bandwidth cap makes
        # those reads sleep: give it a thread per upload besides the checksum passes.
        loop.set_default_executor(
            ThreadPoolExecutor(self.settings.upload_concurrency + 4, thread_name_prefix="io")
        )
        async with AsyncExitStack() as stack:
            stack.push_async_callback(self._close_ledger)
            s3, redis = await self._clients(stack)
            await self._serve_http(stack, s3, redis)
            stack.push_async_callback(self.tasks.stop)  # first out: before the clients close
            self.tasks.start("loop_lag", lambda: measure_loop_lag(self.metrics.loop_lag))
            self.tasks.start("probe", lambda: self._probe_loop(s3, redis))
            backlog = await self._recover()
            self._start_delivery(s3, redis, backlog)
            self._start_cameras()
            self.tasks.start("housekeeping", self._housekeeping)
            systemd.notify("READY=1")
            log.info("agent.started", cameras=len(self.cameras), device_id=self.settings.device_id)
            await self._main_loop()
            systemd.notify("STOPPING=1")
            await self._drain()
        return 0

    async def _close_ledger(self) -> None:
        if not self.forced:  # forced: the process exits now; a write may be stuck on a lock
            await self.ledger.close()

    async def _clients(self, stack: AsyncExitStack) -> tuple[Any, aioredis.Redis]:
        s3 = await open_s3(stack, self.settings.s3_endpoint_url, self.settings.s3_region)
        redis = aioredis.from_url(
            self.settings.redis_url.get_secret_value(), socket_timeout=10, socket_connect_timeout=5
        )
        stack.push_async_callback(redis.aclose)
        return s3, redis

    async def _serve_http(self, stack: AsyncExitStack, s3: Any, redis: aioredis.Redis) -> None:
        """Up before recovery: /healthz answers while a long salvage runs (off the loop)."""
        token = self.settings.http_token
        runner = await serve(
            self.settings.http_bind,
            self.metrics.registry,
            lambda: self._readiness(s3, redis),
            token=None if token is None else token.get_secret_value(),
        )
        stack.push_async_callback(runner.cleanup)

    async def _recover(self) -> list[str]:
        """Crash recovery on the ledger thread, finished before READY=1; systemd's start
        timeout is extended while it runs (its watchdog starts with READY=1)."""
        keepalive = asyncio.create_task(self._while_starting())
        try:
            found = await self.ledger.retry("recover", self.spool.recover, self._manifest_for)
            pruned = await self.ledger.retry("prune_quarantine", self.spool.prune_quarantine)
            backlog = await self.ledger.retry("unfinished", self.spool.unfinished)
            counts = await self.ledger.retry("counts", self.spool.counts)
        finally:
            keepalive.cancel()
        self._account(found)
        self._freed(Freed(found.freed.evicted, found.freed.pruned + pruned))
        self._recovered = True
        # The ledger's counts go in a field of their own: a state name ("lost") is also one
        # of recovery's counts (spreading both crashed the start-up once a chunk was lost).
        log.info("spool.recovered", backlog=len(backlog), ledger=counts, **found.as_dict())
        return backlog

    @staticmethod
    async def _while_starting() -> None:
        while True:
            systemd.notify(f"EXTEND_TIMEOUT_USEC={int(4 * PROBE_S * 1_000_000)}")
            await asyncio.sleep(PROBE_S)

    def _account(self, found: Recovered) -> None:
        for name, error in found.errors:
            log.error("spool.salvage_failed", file=name, error=error, outcome="quarantined")
        for rec in found.lost:
            m = rec.manifest
            self.metrics.lost.labels(m.camera_id).inc()
            log.error(
                "chunk", outcome="lost", camera_id=m.camera_id, seq=m.seq, chunk_id=m.chunk_id
            )
        if found.quarantined:
            self.metrics.quarantined.labels("unsalvageable").inc(found.quarantined)
        if found.orphaned:
            self.metrics.quarantined.labels("orphaned").inc(found.orphaned)

    def _start_delivery(self, s3: Any, redis: aioredis.Redis, backlog: list[str]) -> None:
        uploader = Uploader(
            s3,
            multipart_threshold=self.settings.multipart_threshold_bytes,
            part_size=self.settings.multipart_part_bytes,
            rate=RateLimit(self.settings.upload_max_bps),
            on_read=lambda: self.progress.moved("delivery"),
        )
        delivery = self.delivery = Delivery(
            self.settings, self.metrics, self.ledger, self.progress, uploader, redis, s3
        )
        for chunk_id in backlog:
            delivery.ready.put_nowait(chunk_id)
        for i in range(self.settings.upload_concurrency):
            self.tasks.start(f"delivery-{i}", delivery.worker)
        self.tasks.start("commit", self._commit_loop)

    def _start_cameras(self) -> None:
        self.workers = [
            CameraWorker(
                cam,
                self.settings,
                self.spool.tmp_dir,
                self._chunk_closed,
                self.metrics,
                self.stop_capture,
            )
            for cam in self.settings.cameras
        ]
        # One thread per camera, not the default executor's: blocking camera loops would
        # take all of its threads and starve everything else that runs there.
        pool = ThreadPoolExecutor(max(1, len(self.workers)), thread_name_prefix="camera")
        self.cameras = [
            self.tasks.start(f"camera-{w.cam.id}", functools.partial(self._camera, pool, w))
            for w in self.workers
        ]

    @staticmethod
    async def _camera(pool: ThreadPoolExecutor, worker: CameraWorker) -> None:
        """``worker.run`` on its own thread, in a copy of our context (as to_thread does)."""
        context = contextvars.copy_context()
        await asyncio.get_running_loop().run_in_executor(pool, context.run, worker.run)

    # -- main loop ------------------------------------------------------------------

    async def _main_loop(self) -> None:
        """Until asked to stop: the watchdog is pinged only while the agent is healthy."""
        ping = systemd.watchdog_interval()
        period = min(HOUSEKEEPING_S, ping) if ping else HOUSEKEEPING_S
        while not self._stopping.is_set():
            stalled = self._stalled()
            self.metrics.delivery_stalled.set(int(bool(stalled)))
            if ping and not stalled:
                systemd.notify("WATCHDOG=1")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), period)

    def _stalled(self) -> list[str]:
        """The lanes that are wedged (``health``); empty while all is well."""
        if self.delivery is None:  # still recovering
            return []
        lanes: list[tuple[Lane, int]] = [
            ("commit", self._closed.qsize()),
            ("delivery", self.delivery.waiting()),
        ]
        return [lane for lane, n in lanes if self.progress.stalled(lane, n)]

    async def _probe_loop(self, s3: Any, redis: aioredis.Redis) -> None:
        while True:
            await self._probe(s3, redis)
            await asyncio.sleep(PROBE_S)

    async def _probe(self, s3: Any, redis: aioredis.Redis) -> dict[str, bool]:
        """Do S3 and Redis answer? Feeds the stall check's clock and /readyz."""
        ok = {"s3": True, "redis": True}
        try:
            await asyncio.wait_for(s3.head_bucket(Bucket=self.settings.s3_bucket), PROBE_TIMEOUT_S)
        except Exception:
            ok["s3"] = False
        try:
            ok["redis"] = bool(await asyncio.wait_for(redis.ping(), PROBE_TIMEOUT_S))
        except Exception:
            ok["redis"] = False
        self.progress.deps_seen(ok["s3"], ok["redis"])
        return ok

    async def _readiness(self, s3: Any, redis: aioredis.Redis) -> dict[str, bool]:
        checks = await self._probe(s3, redis)
        checks["recovered"] = self._recovered
        checks["cameras"] = any(w.up for w in self.workers)  # delivering packets now
        checks["delivery"] = self._recovered and not self._stalled()
        return checks

    async def _housekeeping(self) -> None:
        """Limits, quarantine and ledger pruning, gauges: every few seconds."""
        pruned_at = 0.0
        while True:
            freed = await self.ledger.retry("enforce_limits", self.spool.enforce_limits)
            pruned = await self.ledger.retry("prune_quarantine", self.spool.prune_quarantine)
            self._freed(Freed(freed.evicted, freed.pruned + pruned))
            if time.monotonic() - pruned_at >= PRUNE_EVERY_S:
                cutoff = time.time() - self.settings.ledger_retention_s
                rows = await self.ledger.retry("prune", self.spool.prune, cutoff)
                pruned_at = time.monotonic()
                if rows:
                    log.info("ledger.pruned", rows=rows)
            await self._gauges()
            await asyncio.sleep(HOUSEKEEPING_S)

    async def _gauges(self) -> None:
        def read() -> tuple[int, int, dict[str, int], float | None]:
            counts, oldest = self.spool.backlog()
            return self.spool.pending_bytes(), self.spool.quarantine_bytes(), counts, oldest

        pending, quarantined, counts, oldest = await self.ledger.retry("gauges", read)
        self.metrics.spool_bytes.set(pending)
        self.metrics.quarantine_bytes.set(quarantined)
        for state in UNFINISHED:
            self.metrics.ledger_backlog.labels(state).set(counts[state])
        self.metrics.oldest_unannounced.set(0 if oldest is None else time.time() - oldest)

    # -- drain ----------------------------------------------------------------------

    async def _drain(self) -> None:
        """Stop capture (closing open chunks), then commit, upload and announce what is
        left, within EDGE_DRAIN_TIMEOUT_S, or until a second signal."""
        assert self.delivery is not None
        log.info("agent.draining", backlog=self.delivery.waiting(), closing=self._closed.qsize())
        deadline = time.monotonic() + self.settings.drain_timeout_s
        self.stop_capture.set()
        if self.cameras:
            await self._until(asyncio.wait(self.cameras), deadline)
        await self._until(self._closed.join(), deadline)
        if not await self._until(self.delivery.ready.join(), deadline):
            log.warning(
                "agent.drain_incomplete",
                forced=self.forced,
                left_to_commit=self._closed.qsize(),
                left_to_deliver=self.delivery.waiting(),
            )
        await self.tasks.stop()
        counts = {} if self.forced else await self.ledger.retry("counts", self.spool.counts)
        log.info("agent.stopped", **self._totals(), spool=counts, forced=self.forced)

    async def _until(self, work: Awaitable[Any], deadline: float) -> bool:
        """Wait for ``work`` until the deadline or a second signal; True if it finished."""
        job = asyncio.ensure_future(work)
        force = asyncio.ensure_future(self._forced.wait())
        timeout = max(0.1, deadline - time.monotonic())
        await asyncio.wait({job, force}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        force.cancel()
        if not job.done():
            job.cancel()
            return False
        return True

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

    # -- commit (closed chunks → ledger) ------------------------------------------------

    def _chunk_closed(self, chunk: ClosedChunk) -> None:
        """Called on a camera thread: hand the chunk to the loop, never wait for SQLite."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._closed.put_nowait, chunk)

    async def _commit_loop(self) -> None:
        while True:
            chunk = await self._closed.get()
            try:
                await self._commit(chunk)
            except BaseException:
                self._closed.put_nowait(chunk)  # never dropped; its file is still in tmp/
                raise
            finally:
                self._closed.task_done()

    async def _commit(self, chunk: ClosedChunk) -> None:
        """Row, final name, limits: each step retried until the ledger and disk allow it
        (a failed row transaction leaves nothing behind, so retrying it is safe)."""
        manifest = await self.ledger.retry("record", self.spool.record, chunk, self._manifest_for)
        await self.ledger.retry("place", self.spool.place, chunk, manifest)
        self.metrics.written.labels(chunk.camera_id).inc()
        self.progress.moved("commit")
        assert self.delivery is not None
        self.delivery.ready.put_nowait(manifest.chunk_id)
        freed = await self.ledger.retry(
            "enforce_limits", self.spool.enforce_limits, manifest.chunk_id
        )
        self._freed(freed)

    def _freed(self, freed: Freed) -> None:
        for rec in freed.evicted:
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
        for p in freed.pruned:
            self.metrics.quarantine_pruned.labels(p.reason).inc()
            log.warning("quarantine.pruned", file=p.name, bytes=p.size_bytes, reason=p.reason)

    def _manifest_for(self, chunk: ClosedChunk, seq: int, prev: Position) -> Manifest:
        return build_manifest(self.settings, chunk, seq, prev)
