"""``cloud-ingest run``: connect to Ray, start the consumer actors, keep them alive, drain.

Ray restarts a dead actor (``max_restarts=-1``; the constructor reruns) and the
supervisor calls ``run()`` on it again; with the same consumer name it drains
its predecessor's pending entries first. Task retries stay off
(``max_task_retries=0``) so the queue alone decides what is redelivered. The actors are
detached and spread over the nodes; a driver started again adopts the ones it finds
(``cloud_ingest.placement``).
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
from ray.exceptions import ActorAlreadyExistsError, RayActorError
from redis.exceptions import RedisError

from cloud_ingest.config import IngestSettings
from cloud_ingest.consumer import Consumer, drain_budget_s
from cloud_ingest.metrics import IngestMetrics
from cloud_ingest.placement import NAMESPACE, actor_name, fingerprint, our_actors
from cloud_ingest.totals import read_totals
from shared.backoff import Backoff
from shared.http import serve
from shared.queue import connect, ensure_group, status
from shared.tasks import Supervisor as TaskSupervisor

log = structlog.get_logger("cloud_ingest")


async def prepare_queue(settings: IngestSettings) -> None:
    client = connect(settings, settings.redis_timeout_s)
    try:
        await ensure_group(client, settings.stream, settings.group)
    finally:
        await client.aclose()


class Supervisor:
    """Starts the actors, calls ``run()`` on each and again whenever it ends, and drains.

    The control loop never sleeps on one actor's behalf: a failed run's back-off is a
    restart *scheduled* for later, while the loop keeps watching the others and the stop
    flag."""

    WAIT_S = 1.0  # longest the loop waits before looking at the stop flag again
    HEALTHY_RUN_S = 30.0  # a run this long before it ended restarts its back-off
    RAY_LATENCY_S = 5.0  # on top of the actors' own drain: stop() and run()'s reply via Ray
    ADOPT_TIMEOUT_S = 30.0  # an actor left running that does not answer in this is replaced
    NAME_RELEASE_S = 30.0  # a killed actor's name is free again within this

    def __init__(self, settings: IngestSettings, consumer_class: type[Consumer] = Consumer) -> None:
        self.settings = settings
        self.consumer_class = consumer_class
        self.actors: dict[int, Any] = {}
        self.runs: dict[Any, tuple[int, float]] = {}  # run ref -> (index, started)
        self.restart_at: dict[int, float] = {}  # index -> when its next run starts
        self.restarts = 0
        self.adopted = 0
        self.fingerprint = fingerprint(consumer_class, settings)
        self.gone: set[int] = set()  # actors whose handle may be dead for good
        self.totals: Counter[str] = Counter()
        self.stopping = threading.Event()
        self.backoff: dict[int, Backoff] = {}

    def consumer_name(self, index: int) -> str:
        return f"consumer-{index}"

    def start(self, index: int) -> None:
        self.actors[index] = self._adopt(index) or self._create(index)
        self._run(index)

    def _adopt(self, index: int) -> Any | None:
        """The detached actor a previous driver left running under this name, if it was
        built from the same code and settings; any other is retired first."""
        name = actor_name(self.settings.group, index)
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return None
        try:
            theirs: Any = ray.get(actor.fingerprint.remote(), timeout=self.ADOPT_TIMEOUT_S)
        except Exception as exc:  # dead, wedged, or from a release without fingerprints
            log.warning("consumer.unadoptable", consumer=name, error=str(exc)[:300])
            ray.kill(actor, no_restart=True)
            return None
        if theirs == self.fingerprint:
            log.info("consumer.adopted", consumer=name)
            self.adopted += 1
            return actor
        log.info("consumer.replacing", consumer=name, reason="other code or settings")
        self._retire(actor, name)
        return None

    def _retire(self, actor: Any, name: str) -> None:
        """Stop an actor, wait for its drain (bounded), then kill it: its entries are
        acknowledged or left pending for whoever takes its name."""
        budget = drain_budget_s(self.settings) + self.RAY_LATENCY_S
        try:
            self.totals.update(ray.get(actor.retire.remote(), timeout=budget))
        except Exception as exc:  # dead, or the drain overran: its entries stay pending
            log.warning("consumer.retire_incomplete", consumer=name, error=str(exc)[:300])
        ray.kill(actor, no_restart=True)
        log.info("consumer.retired", consumer=name)

    def _create(self, index: int) -> Any:
        actor_cls = ray.remote(self.consumer_class)
        name = actor_name(self.settings.group, index)
        deadline = time.monotonic() + self.NAME_RELEASE_S
        while True:
            try:
                return actor_cls.options(
                    name=name,
                    namespace=NAMESPACE,
                    lifetime="detached",  # outlives this driver: a new one adopts it
                    scheduling_strategy="SPREAD",
                    num_cpus=self.settings.actor_cpus,
                    max_restarts=-1,
                    max_task_retries=0,
                    max_concurrency=64,
                ).remote(self.settings, self.consumer_name(index), self.fingerprint)
            except ActorAlreadyExistsError:  # a killed actor's name is released asynchronously
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def retire_extra(self) -> None:
        """Actors a previous deployment ran beyond INGEST_CONSUMERS (a scale-down)."""
        for index, name in sorted(our_actors(self.settings.group).items()):
            if index >= self.settings.consumers:
                with contextlib.suppress(ValueError):
                    self._retire(ray.get_actor(name, namespace=NAMESPACE), name)

    def _run(self, index: int) -> None:
        self.runs[self.actors[index].run.remote()] = (index, time.monotonic())

    def serve(self) -> int:
        self.retire_extra()
        for i in range(self.settings.consumers):
            if self.stopping.is_set():  # SIGTERM while adopting or replacing
                break
            self.start(i)
        unbound = sorted(k for k, e in self.settings.keyring.items() if e.device_id is None)
        if unbound:  # allowed (development, migration) but any such key speaks for any device
            log.warning("keyring.unbound_keys", key_ids=unbound)
        log.info("deployment.started", consumers=self.settings.consumers, adopted=self.adopted)
        while not self.stopping.is_set():
            self._restart_due()
            wait = self._wait_s()
            if self.runs:
                done, _ = ray.wait(list(self.runs), num_returns=1, timeout=wait)
                for ref in done:
                    self._reap(ref)
            else:
                self.stopping.wait(wait)
        return self.drain()

    def _wait_s(self) -> float:
        due = [at - time.monotonic() for at in self.restart_at.values()]
        return max(0.0, min([self.WAIT_S, *due]))

    def _restart_due(self) -> None:
        now = time.monotonic()
        for index, at in list(self.restart_at.items()):
            if at <= now:
                del self.restart_at[index]
                self.restarts += 1
                if index in self.gone:
                    self._look_up(index)
                self._run(index)

    def _look_up(self, index: int) -> None:
        """After an actor died: Ray restarts it under the same handle, but one killed for
        good (``ray.kill``, its restarts spent) is gone and its name free: create it again."""
        self.gone.discard(index)
        try:
            self.actors[index] = ray.get_actor(
                actor_name(self.settings.group, index), namespace=NAMESPACE
            )
        except ValueError:
            log.warning("consumer.recreated", consumer=self.consumer_name(index))
            self.actors[index] = self._create(index)

    def _reap(self, ref: Any) -> None:
        """A run ended: schedule the next one, after a back-off unless it ran for a while
        (an actor that died for good fails every call at once: no spinning on it)."""
        index, started = self.runs.pop(ref)
        name = self.consumer_name(index)
        backoff = self.backoff.setdefault(index, Backoff(1.0, 30.0))
        if time.monotonic() - started >= self.HEALTHY_RUN_S:
            backoff.reset()
        delay = backoff.next()
        try:
            self.totals.update(ray.get(ref))
            log.warning("consumer.exited", consumer=name, restart_in_s=round(delay, 2))
        except RayActorError as exc:
            self.gone.add(index)
            log.warning(
                "consumer.died", consumer=name, error=str(exc)[:300], restart_in_s=round(delay, 2)
            )
        except Exception as exc:  # run() raised: a bug or a dependency; log, run it again later
            log.error(
                "consumer.failed",
                consumer=name,
                error=str(exc)[:1000],
                restart_in_s=round(delay, 2),
            )
        self.restart_at[index] = time.monotonic() + delay

    def drain(self) -> int:
        """Stop every actor and wait for its run (bounded). Non-zero when the drain was
        incomplete: a run that did not return or failed, or work an actor had to cut off
        (those entries stay pending for the next deployment, nothing is lost)."""
        log.info("deployment.draining")
        for actor in self.actors.values():
            actor.stop.remote()
        # The actors' own drain, stage by stage as they hold themselves to it, and Ray's part.
        deadline = time.monotonic() + drain_budget_s(self.settings) + self.RAY_LATENCY_S
        failed: list[str] = []
        while self.runs and time.monotonic() < deadline:
            done, _ = ray.wait(list(self.runs), num_returns=1, timeout=1.0)
            for ref in done:
                index, _started = self.runs.pop(ref)
                try:
                    self.totals.update(ray.get(ref))
                except Exception as exc:  # died or failed while draining
                    failed.append(self.consumer_name(index))
                    log.warning("consumer.died_during_drain", error=str(exc)[:300])
        unfinished = sorted(self.consumer_name(i) for i, _ in self.runs.values())
        for actor in self.actors.values():  # detached: they would outlive a clean stop
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        log.info(
            "deployment.stopped", restarts=self.restarts, unfinished=len(unfinished), **self.totals
        )
        if unfinished or failed or self.totals["abandoned"]:
            log.error(
                "deployment.drain_incomplete",
                unfinished_runs=unfinished,
                failed_runs=failed,
                abandoned_entries=self.totals["abandoned"],
                note="their entries stay pending: the next deployment resumes them",
            )
            return 1
        return 0


class Observer:
    """Health and metrics from a thread of their own (the supervisor loop is synchronous):
    every second it reads the queue, every actor's ``stats()`` and the consumers' totals.
    Readiness: Redis answers, at least one actor answers and is not paused, and the last
    refresh is recent (a wedged observer is not ready)."""

    PERIOD_S = 1.0
    STALE_S = 15.0

    def __init__(self, settings: IngestSettings, supervisor: Supervisor) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self.metrics = IngestMetrics()
        self.ready = {"redis": False, "consumers": False}
        self.refreshed = 0.0
        self.started = threading.Event()
        self.failed: str | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._thread, name="observer", daemon=True)

    def start(self) -> None:
        """Serve /healthz, /readyz and /metrics; raises if that is impossible (the bind
        address taken, say): a deployment without them must not run as if all were well."""
        self.thread.start()
        if not self.started.wait(30) or self.failed is not None:
            raise RuntimeError(f"health and metrics on {self.settings.http_bind}: {self.failed}")

    def stop(self) -> None:
        if self.loop.is_running():
            done = asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
            with contextlib.suppress(Exception):
                done.result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _shutdown(self) -> None:
        if hasattr(self, "tasks"):
            await self.tasks.stop()
            await self.redis.aclose()
            await self.runner.cleanup()

    def _thread(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except Exception as exc:
            self.failed = repr(exc)
            return
        finally:
            self.started.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        async def ready() -> dict[str, bool]:
            fresh = time.monotonic() - self.refreshed < self.STALE_S
            return {
                "redis": self.ready["redis"] and fresh,
                "consumers": self.ready["consumers"] and fresh,
            }

        token = self.settings.http_token
        self.runner = await serve(
            self.settings.http_bind,
            self.metrics.registry,
            ready,
            token=None if token is None else token.get_secret_value(),
        )
        self.redis: aioredis.Redis = connect(self.settings, 3.0)
        self.tasks = TaskSupervisor(log)
        self.tasks.start("observer", self._observe)

    async def _observe(self) -> None:
        while True:
            await self._refresh()
            await asyncio.sleep(self.PERIOD_S)

    async def _refresh(self) -> None:
        queue = None
        try:
            queue = await status(self.redis, self.settings.stream, self.settings.group)
            self.metrics.update_totals(*await read_totals(self.redis, self.settings.group))
            self.ready["redis"] = True
        except RedisError:
            self.ready["redis"] = False  # counters keep their last values
        actors = list(self.supervisor.actors.items())  # the supervisor thread changes it
        answers = await asyncio.gather(
            *(asyncio.wait_for(a.stats.remote(), 2) for _, a in actors),
            return_exceptions=True,
        )
        stats = [s for s in answers if isinstance(s, dict)]  # others: restarting or dead
        places = await asyncio.gather(
            *(asyncio.wait_for(a.where.remote(), 2) for _, a in actors),
            return_exceptions=True,
        )
        names = [self.supervisor.consumer_name(i) for i, _ in actors]
        self.metrics.placed(
            {n: p for n, p in zip(names, places, strict=True) if isinstance(p, dict)}
        )
        self.ready["consumers"] = any(not s.get("paused") for s in stats)
        self.metrics.update(queue, stats, self.supervisor.restarts)
        self.refreshed = time.monotonic()


RAY_CONNECT_S = 120.0  # a cluster not reachable for this long: exit non-zero (restarted)


def connect_ray(address: str | None) -> None:
    """Join the cluster. Through Ray Client a connection right after another client died
    can be refused once ("Starting Ray client server failed"); a head restarting refuses
    for a while: retried with back-off, bounded."""
    backoff = Backoff(1.0, 10.0)
    deadline = time.monotonic() + RAY_CONNECT_S
    while True:
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)
            return
        except ConnectionError as exc:
            if time.monotonic() >= deadline:
                raise
            delay = backoff.next()
            log.warning("ray.connect_failed", error=str(exc)[:500], retry_in_s=round(delay, 2))
            ray.shutdown()
            time.sleep(delay)


def run(settings: IngestSettings) -> int:
    asyncio.run(prepare_queue(settings))
    connect_ray(os.environ.get("RAY_ADDRESS") or None)
    supervisor = Supervisor(settings)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("deployment.signal", signal=signal.Signals(signum).name)
        supervisor.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    observer = Observer(settings, supervisor)
    try:
        observer.start()
        return supervisor.serve()
    finally:
        observer.stop()
        ray.shutdown()
