"""``cloud-ingest run``: connect to Ray, start the consumer actors, keep them alive, drain.

Ray restarts a dead actor (``max_restarts=-1``; the constructor reruns) and the
supervisor calls ``run()`` on it again; with the same consumer name it drains
its predecessor's pending entries first. Task retries stay off
(``max_task_retries=0``) so the queue alone decides what is redelivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections import Counter
from typing import Any

import ray
import redis.asyncio as aioredis
import structlog
from ray.exceptions import RayActorError

from cloud_ingest.config import IngestSettings
from cloud_ingest.consumer import Consumer
from cloud_ingest.metrics import IngestMetrics
from shared.backoff import Backoff
from shared.http import serve
from shared.queue import ensure_group, status

log = structlog.get_logger("cloud_ingest")


async def prepare_queue(settings: IngestSettings) -> None:
    client = aioredis.from_url(settings.redis_url.get_secret_value())
    try:
        await ensure_group(client, settings.stream, settings.group)
    finally:
        await client.aclose()


class Supervisor:
    def __init__(self, settings: IngestSettings) -> None:
        self.settings = settings
        self.actors: dict[int, Any] = {}
        self.runs: dict[Any, int] = {}
        self.restarts = 0
        self.totals: Counter[str] = Counter()
        self.stopping = threading.Event()
        self.backoff: dict[int, Backoff] = {}

    def consumer_name(self, index: int) -> str:
        return f"consumer-{index}"

    def start(self, index: int) -> None:
        actor_cls = ray.remote(Consumer)
        actor: Any = actor_cls.options(
            name=f"{self.settings.group}-{self.consumer_name(index)}",
            namespace="cloud_ingest",
            num_cpus=self.settings.actor_cpus,
            max_restarts=-1,
            max_task_retries=0,
            max_concurrency=64,
        ).remote(self.settings, self.consumer_name(index))
        self.actors[index] = actor
        self.runs[actor.run.remote()] = index

    def serve(self) -> int:
        for i in range(self.settings.consumers):
            self.start(i)
        unbound = sorted(k for k, e in self.settings.keyring.items() if e.device_id is None)
        if unbound:  # allowed (development, migration) but any such key speaks for any device
            log.warning("keyring.unbound_keys", key_ids=unbound)
        log.info("deployment.started", consumers=self.settings.consumers)
        while not self.stopping.is_set():
            done, _ = ray.wait(list(self.runs), num_returns=1, timeout=1.0)
            for ref in done:
                self._reap(ref)
        return self.drain()

    def _reap(self, ref: Any) -> None:
        index = self.runs.pop(ref)
        try:
            self.totals.update(ray.get(ref))
            log.warning("consumer.exited", consumer=self.consumer_name(index))
        except RayActorError as exc:
            log.warning("consumer.died", consumer=self.consumer_name(index), error=str(exc)[:300])
        except Exception as exc:  # run() raised: a bug or a dependency; log and run it again
            log.error("consumer.failed", consumer=self.consumer_name(index), error=str(exc)[:1000])
            time.sleep(self.backoff.setdefault(index, Backoff(1.0, 30.0)).next())
        self.restarts += 1
        self.runs[self.actors[index].run.remote()] = index

    def drain(self) -> int:
        log.info("deployment.draining")
        for actor in self.actors.values():
            actor.stop.remote()
        deadline = time.monotonic() + self.settings.drain_timeout_s + 5
        while self.runs and time.monotonic() < deadline:
            done, _ = ray.wait(list(self.runs), num_returns=1, timeout=1.0)
            for ref in done:
                self.runs.pop(ref)
                try:
                    self.totals.update(ray.get(ref))
                except RayActorError as exc:
                    log.warning("consumer.died_during_drain", error=str(exc)[:300])
        log.info(
            "deployment.stopped", restarts=self.restarts, unfinished=len(self.runs), **self.totals
        )
        return 0


class Observer:
    """Health and metrics from a thread of their own (the supervisor loop is synchronous):
    every few seconds it reads the queue and every actor's ``stats()``."""

    PERIOD_S = 5.0

    def __init__(self, settings: IngestSettings, supervisor: Supervisor) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self.metrics = IngestMetrics()
        self.ready = {"redis": False, "consumers": False}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._thread, name="observer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def _thread(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.loop.run_forever()

    async def _start(self) -> None:
        async def ready() -> dict[str, bool]:
            return dict(self.ready)

        token = self.settings.http_token
        self.runner = await serve(
            self.settings.http_bind,
            self.metrics.registry,
            ready,
            token=None if token is None else token.get_secret_value(),
        )
        self.redis = aioredis.from_url(
            self.settings.redis_url.get_secret_value(), socket_timeout=3, socket_connect_timeout=3
        )
        self.task = asyncio.create_task(self._observe())

    async def _observe(self) -> None:
        while True:
            queue = None
            try:
                queue = await status(self.redis, self.settings.stream, self.settings.group)
                self.ready["redis"] = True
            except Exception:
                self.ready["redis"] = False
            stats = []
            for actor in list(self.supervisor.actors.values()):
                with contextlib.suppress(Exception):  # restarting or dead: not counted alive
                    stats.append(await asyncio.wait_for(actor.stats.remote(), 2))
            self.ready["consumers"] = bool(stats)
            self.metrics.update(queue, stats, self.supervisor.restarts)
            await asyncio.sleep(self.PERIOD_S)


def run(settings: IngestSettings) -> int:
    asyncio.run(prepare_queue(settings))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # one canonical line per chunk, never folded
    ray.init(
        address=os.environ.get("RAY_ADDRESS") or None, namespace="cloud_ingest", log_to_driver=True
    )
    supervisor = Supervisor(settings)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("deployment.signal", signal=signal.Signals(signum).name)
        supervisor.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    observer = Observer(settings, supervisor)
    observer.start()
    try:
        return supervisor.serve()
    finally:
        observer.stop()
        ray.shutdown()
