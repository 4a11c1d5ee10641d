"""The edge daemon: start-up → main loop → drain, each readable on its own.

Camera threads capture and segment (blocking PyAV work) and hand each closed
chunk to the loop; the committer gives it its ledger row, delivery workers
upload it and only then announce its manifest. Every ledger call runs on the
ledger thread, never on the loop. Every long-lived task is supervised: a crash
is logged with its traceback, counted and the task restarted. The main loop
pings the systemd watchdog only while the agent makes progress (``health``).

Start-up: health and metrics first, then capture (into tmp/, so a ledger held
by another process does not stop recording), then crash recovery of what the
last run left in tmp/, then commit and delivery, then ``READY=1``.

Signals: the first SIGTERM/SIGINT drains (cameras close their open chunks,
the backlog is committed, uploaded and announced within
``EDGE_DRAIN_TIMEOUT_S``); a second one exits at once, as uvicorn does: what
is left stays in the spool for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import structlog

from edge_agent.camera import CameraWorker
from edge_agent.committer import Committer
from edge_agent.config import EdgeSettings
from edge_agent.delivery import Delivery
from edge_agent.health import Lane, Progress, measure_loop_lag
from edge_agent.ledger import Ledger
from edge_agent.metrics import EdgeMetrics
from edge_agent.spool import UNFINISHED, Freed, Limits, Pruned, Recovered, Spool
from shared import logs, systemd
from shared.http import serve
from shared.manifest import wall_span
from shared.queue import connect
from shared.s3 import open_s3
from shared.tasks import Supervisor
from shared.uploader import RateLimit, Uploader

log = structlog.get_logger("edge_agent")

HOUSEKEEPING_S = 5.0
PROBE_S = 5.0
PROBE_TIMEOUT_S = 3.0
PRUNE_EVERY_S = 600.0
# systemd's start timeout is extended while recovery runs, up to this long; past it
# systemd gives up on the start (and restarts the agent: capture goes on into tmp/).
RECOVERY_EXTEND_MAX_S = 900.0
FINAL_COUNTS_TIMEOUT_S = 5.0


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
        self.committer = Committer(settings, self.metrics, self.ledger, self.progress, self._freed)
        self.stop_capture = threading.Event()
        self._stopping = asyncio.Event()
        self._recovered = False
        self.workers: list[CameraWorker] = []
        self.cameras: list[asyncio.Task[None]] = []
        self.delivery: Delivery | None = None
        self.tasks = Supervisor(log, lambda name: self.metrics.task_crashes.labels(name).inc())

    def request_stop(self) -> None:
        """First signal: drain. Second: exit now, skipping every graceful wait (uploads,
        a ledger write stuck on a lock, camera threads); the spool is crash-safe."""
        if self._stopping.is_set():
            log.warning("agent.force_stop", hint="second signal: exiting without draining")
            sys.stdout.flush()
            os._exit(0)
        self._stopping.set()

    # -- start-up -----------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.committer.bind(loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        # aiohttp reads upload bodies in the default executor, and a bandwidth cap makes
        # those reads sleep: give it a thread per upload besides the checksum passes.
        loop.set_default_executor(
            ThreadPoolExecutor(self.settings.upload_concurrency + 4, thread_name_prefix="io")
        )
        async with AsyncExitStack() as stack:
            stack.push_async_callback(self.ledger.close)
            s3, redis = await self._clients(stack)
            await self._serve_http(stack, s3, redis)
            stack.push_async_callback(self.tasks.stop)  # first out: before the clients close
            self.tasks.start("loop_lag", lambda: measure_loop_lag(self.metrics.loop_lag))
            self.tasks.start("probe", lambda: self._probe_loop(s3, redis))
            crashed = await self.ledger.retry("partials", self.spool.partials)
            self._start_cameras()  # before recovery: capture never waits for the ledger
            backlog = await self._recover(crashed)
            if backlog is not None:
                self._start_delivery(s3, redis, backlog)
                self.tasks.start("housekeeping", self._housekeeping)
                systemd.notify("READY=1")
                log.info("agent.started", cameras=len(self.cameras), backlog=len(backlog))
                await self._main_loop()
            systemd.notify("STOPPING=1")
            await self._drain()
        return 0

    async def _clients(self, stack: AsyncExitStack) -> tuple[Any, aioredis.Redis]:
        s3 = await open_s3(
            stack,
            self.settings.s3_endpoint_url,
            self.settings.s3_region,
            # Every upload holds a connection for as long as it streams: leave room for
            # the probe's HeadBucket and the sidecars.
            max_connections=self.settings.upload_concurrency + 4,
        )
        redis = connect(self.settings, self.settings.redis_timeout_s)
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

    async def _recover(self, crashed: list[Path]) -> list[str] | None:
        """Crash recovery of the partials the last run left (``crashed``, listed before
        capture started), on the ledger thread; the backlog to deliver, or None when a stop
        was asked for first. Findings are reported even if an attempt failed halfway."""
        found = Recovered()
        pruned: list[Pruned] = []
        work = asyncio.ensure_future(self._recovery(crashed, found, pruned))
        keepalive = asyncio.create_task(self._while_starting())
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            keepalive.cancel()
            stop.cancel()
            self._account(found)
            self._freed(Freed(found.freed.evicted, found.freed.pruned + pruned))
        if not work.done():
            work.cancel()
            log.warning("agent.stopped_during_recovery")
            return None
        backlog, counts = work.result()
        self._recovered = True
        # The ledger's counts go in a field of their own: a state name ("lost") is also one
        # of recovery's counts (spreading both crashed the start-up once a chunk was lost).
        log.info("spool.recovered", backlog=len(backlog), ledger=counts, **found.as_dict())
        return backlog

    async def _recovery(
        self, crashed: list[Path], found: Recovered, pruned: list[Pruned]
    ) -> tuple[list[str], dict[str, int]]:
        spool = self.spool
        await self.ledger.retry("recover", spool.recover, self.committer.manifest, found, crashed)
        await self.ledger.retry("prune_quarantine", spool.prune_quarantine, None, pruned)
        backlog = await self.ledger.retry("unfinished", spool.unfinished)
        return backlog, await self.ledger.retry("counts", spool.counts)

    async def _while_starting(self) -> None:
        """Extend systemd's start timeout while recovery runs, for a bounded time."""
        started = time.monotonic()
        while time.monotonic() - started < RECOVERY_EXTEND_MAX_S:
            systemd.notify(f"EXTEND_TIMEOUT_USEC={int(4 * PROBE_S * 1_000_000)}")
            await asyncio.sleep(PROBE_S)

    def _account(self, found: Recovered) -> None:
        for name, error in found.errors:
            log.error("spool.salvage_failed", file=name, error=error, outcome="quarantined")
        for rec in found.lost:
            self.metrics.lost.labels(rec.manifest.camera_id).inc()
            logs.chunk_line(log.error, "lost", rec.manifest, reason="file gone at start")
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
            on_read=self.progress.streamed,
        )
        delivery = self.delivery = Delivery(
            self.settings, self.metrics, self.ledger, self.progress, uploader, redis, s3
        )
        for chunk_id in backlog:
            delivery.ready.put_nowait(chunk_id)
        self.progress.restart()  # however long recovery took, the clocks start now
        for i in range(self.settings.upload_concurrency):
            self.tasks.start(f"delivery-{i}", delivery.worker)
        self.tasks.start("commit", lambda: self.committer.run(delivery.ready))

    def _start_cameras(self) -> None:
        self.workers = [
            CameraWorker(
                cam,
                self.settings,
                self.spool.tmp_dir,
                self.committer.chunk_closed,
                self.metrics,
                self.stop_capture,
                self.spool.has_room,
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
            ("commit", self.committer.waiting()),
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
        prune_at = 0.0
        while True:
            freed = Freed()
            try:
                await self.ledger.retry("enforce_limits", self.spool.enforce_limits, None, freed)
                await self.ledger.retry(
                    "prune_quarantine", self.spool.prune_quarantine, None, freed.pruned
                )
            finally:
                self._freed(freed)
            if time.monotonic() >= prune_at:
                cutoff = time.time() - self.settings.ledger_retention_s
                rows, more = await self.ledger.retry("prune", self.spool.prune, cutoff)
                prune_at = time.monotonic() + (0 if more else PRUNE_EVERY_S)
                if rows:
                    log.info("ledger.pruned", rows=rows, more=more)
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
        left, within EDGE_DRAIN_TIMEOUT_S."""
        delivery = self.delivery
        log.info(
            "agent.draining",
            to_commit=self.committer.waiting(),
            to_deliver=0 if delivery is None else delivery.waiting(),
        )
        deadline = time.monotonic() + self.settings.drain_timeout_s
        self.stop_capture.set()
        if self.cameras:
            await self._until(asyncio.wait(self.cameras), deadline)
        if delivery is not None:  # else recovery never finished: tmp/ keeps the chunks
            await self._until(self.committer.closed.join(), deadline)
            if not await self._until(delivery.ready.join(), deadline):
                log.warning(
                    "agent.drain_incomplete",
                    left_to_commit=self.committer.waiting(),
                    left_to_deliver=delivery.waiting(),
                )
        await self.tasks.stop()
        counts: dict[str, int] = {}
        with contextlib.suppress(Exception):  # a ledger held elsewhere must not stall the exit
            counts = await asyncio.wait_for(
                self.ledger.call(self.spool.counts), FINAL_COUNTS_TIMEOUT_S
            )
        log.info("agent.stopped", **self._totals(), spool=counts)

    @staticmethod
    async def _until(work: Awaitable[Any], deadline: float) -> bool:
        """Wait for ``work`` until the deadline; True if it finished."""
        try:
            await asyncio.wait_for(work, max(0.1, deadline - time.monotonic()))
        except TimeoutError:
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

    # -- accounting ---------------------------------------------------------------------

    def _freed(self, freed: Freed) -> None:
        """Every eviction and pruned quarantine file: a canonical line and a metric."""
        for rec in freed.evicted:
            m = rec.manifest
            self.metrics.evicted.labels(m.camera_id).inc()
            self.metrics.gap_seconds.labels(m.camera_id, "eviction").inc(wall_span(m))
            logs.chunk_line(
                log.warning,
                "evicted",
                m,
                media_s=round(m.media_duration_s, 3),
                policy=self.settings.spool_eviction,
            )
        for p in freed.pruned:
            self.metrics.quarantine_pruned.labels(p.reason).inc()
            log.warning("quarantine.pruned", file=p.name, bytes=p.size_bytes, reason=p.reason)
