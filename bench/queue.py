"""Benchmark 3, queue: signed manifests through the real consume path, against arq.

**Ours.** A producer process signs manifests (``shared.manifest.sign_fields``, as
``edge_agent.publisher.announce`` does) and XADDs them with ``shared.queue.publish``
from 16 concurrent tasks (four agents' worth of delivery loops; the S3 sidecar of
``announce`` is left out). Two consumer *processes* run the actor's code (not Ray
actors: Ray's start-up would eat the time budget): ``cloud_ingest.consumer.Consumer``'s
own drain loop (``_drain_loop``/``_step``/``_fetch``/``_one``/``_flush_acks``) with
default ``IngestSettings`` (batch 8, the reaper, one log line per entry at INFO, into
a file) over a real ``GroupConsumer``. Processing is a ``ChunkProcessor`` whose
``process`` keeps only the checks without I/O: ``verify_entry`` against the keyring
(size, HMAC over the raw bytes, parse, canonical form, key binding, chunk id), then
bucket/key location and clock. Entries are acknowledged as the actor does
(``XACK`` + ``XDEL`` of the entries it still owns, one Lua script per batch).

**arq** 0.28 at its defaults (``max_jobs=10``, ``poll_delay=0.5``, results kept 1 h):
a producer enqueues ``noop`` jobs carrying the same signed manifest fields from 16
concurrent tasks; two ``arq.worker.Worker`` processes run them, logging each job at
INFO as arq's CLI sets up, into a file. arq uses Redis DB 1, ours DB 0. Note that
arq's defaults bound it by its poll loop (each worker takes at most 100 queued ids
per 0.5 s poll and both race for the same ids), not by the CPU.

Each side is timed twice: **end to end** (producer and consumers released together;
from that instant to the last acknowledgement / the last job's end) and
**consume-only** (the stream or queue pre-filled, then the consumers released).
Every process signals readiness after its imports and connections, so start-up is
not timed. Rates are items/s, medians of ``ctx.repeats`` runs alternating which side
goes first; arq gets fewer items (it is much slower).

**redis-benchmark** on the same server gives raw-command ceilings: XADD of the same
three fields (``-c 50 -P 16``) against our end-to-end rate and, against consume-only,
an approximation of the consumer's per-batch commands with 2 clients and no
pipelining: ``XREADGROUP COUNT 8``, then ``XACK`` and ``XDEL`` of 8 ids (random ids:
redis-benchmark cannot replay the ids it read), combined as
8 / (1/r_read + 1/r_ack + 1/r_del) entries/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from bench.common import ROOT, Context, Figure, median, side_venv, synthetic_manifest

KEY_ID = "bench"
SECRET = b"bench-signing-secret-0123456789"
DEVICE, SITE, CAMERA = "bench-dev", "site1", "cam1"
RAW_BUCKET = "bench-raw"
GROUP = "ingest"
ARQ_REQUIREMENTS = ["arq==0.28.*", "pydantic>=2.7"]  # pydantic: the manifests it enqueues
ARQ_DB = 1  # arq's keys live apart from our stream
# Concurrent publish tasks: the cloud drains many edges at once (4 agents' worth of 4
# delivery loops each), so the producer is not the bottleneck it would be alone.
PRODUCERS = 16
TARGET = 10.0  # ours >= 10x arq


@dataclass(frozen=True)
class Sizes:
    ours: int
    arq: int
    redis_benchmark: int


def sizes(quick: bool) -> Sizes:
    return Sizes(4000, 600, 40000) if quick else Sizes(15000, 1500, 200000)


# -- what travels -----------------------------------------------------------------------


def manifests(n: int) -> Iterator[Any]:
    """``n`` valid manifests of one camera, within the cloud's clock window."""
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    for seq in range(n):
        digest = hashlib.sha256(seq.to_bytes(8, "big")).hexdigest()
        yield synthetic_manifest(
            seq,
            digest,
            base + timedelta(seconds=2 * seq),
            device=DEVICE,
            site=SITE,
            camera=CAMERA,
            bucket=RAW_BUCKET,
            prefix="raw",
            size_bytes=4_000_000,
        )


def signed_fields(manifest: Any) -> dict[str, bytes]:
    from shared.manifest import sign_fields

    return sign_fields(manifest, KEY_ID, SECRET)  # as edge_agent.publisher.announce


# -- child processes: ready, wait for "go", work, write a JSON result -------------------


async def released(result: Path) -> None:
    """Tell the parent we are ready (imports done, connected) and wait for its go."""
    result.with_suffix(".ready").touch()
    await asyncio.to_thread(sys.stdin.readline)


async def until_done(
    client: Any, key: str, total: int, done_here: Callable[[], int], stop: Callable[[], Any]
) -> None:
    """Share our count of finished items through ``key``; stop once all ``total`` are."""
    reported = 0
    while True:
        await asyncio.sleep(0.02)
        now = done_here()
        if now > reported:
            done, reported = int(await client.incrby(key, now - reported)), now
        else:
            done = int(await client.get(key) or 0)
        if done >= total:
            outcome = stop()
            if isinstance(outcome, Awaitable):
                await outcome
            return


async def publish_all(items: list[Any], send: Callable[[dict[str, bytes]], Awaitable[Any]]) -> None:
    """Sign and send every manifest from PRODUCERS tasks sharing one iterator."""
    todo = iter(items)

    async def loop() -> None:
        for manifest in todo:
            await send(signed_fields(manifest))

    await asyncio.gather(*(loop() for _ in range(PRODUCERS)))


async def produce(result: Path, redis_url: str, stream: str, n: str) -> dict[str, float]:
    import redis.asyncio as aioredis

    from shared.queue import publish

    items = list(manifests(int(n)))  # built at commit time in the agent: not timed
    client = aioredis.from_url(redis_url)
    await client.ping()
    await released(result)
    t0, cpu0 = time.time(), time.process_time()
    await publish_all(items, lambda fields: publish(client, stream, fields))
    out = {"start": t0, "end": time.time(), "cpu_s": time.process_time() - cpu0}
    await client.aclose()
    return out


async def consume(
    result: Path, redis_url: str, stream: str, name: str, total: str, done_key: str
) -> dict[str, float]:
    import redis.asyncio as aioredis

    from cloud_ingest.config import IngestSettings
    from cloud_ingest.consumer import Consumer
    from cloud_ingest.failures import EnvProbe
    from cloud_ingest.processor import ChunkProcessor, Outcome
    from shared.manifest import verify_entry
    from shared.queue import Entry, GroupConsumer

    class TimedQueue(GroupConsumer):
        """The real queue, noting when acknowledgements complete."""

        acked, first_ack, last_ack = 0, 0.0, 0.0

        async def ack(self, ids: Any, **kwargs: Any) -> int:
            acked = await super().ack(ids, **kwargs)
            if acked:
                self.last_ack = time.time()
                self.first_ack = self.first_ack or self.last_ack
                self.acked += acked
            return acked

    class NoopProcessor(ChunkProcessor):
        """``process`` without I/O: verification and the no-I/O checks, no media work."""

        async def process(self, entry: Entry, slot: Any) -> Outcome:
            signed, replayed_at = verify_entry(entry.fields, self.keyring)
            self._check_location(signed.manifest)
            self._check_clock(signed.manifest, replayed_at)
            return Outcome("processed", signed.manifest)

    settings = IngestSettings(
        redis_url=redis_url,
        stream=stream,
        group=GROUP,
        output_bucket="bench-out",
        raw_bucket=RAW_BUCKET,
        keyring={KEY_ID: {"secret": SECRET.decode(), "device_id": DEVICE, "site_id": SITE}},
        log_format="json",
    )
    consumer = Consumer(settings, name)
    client = aioredis.from_url(redis_url)  # as Consumer.run connects
    queue = TimedQueue(client, stream, GROUP, name)
    processor = NoopProcessor(settings, None, client, name, consumer.pool)
    probe = EnvProbe(None, client, [], consumer.pool)  # never needed: nothing fails
    await client.ping()
    await released(result)
    cpu0 = time.process_time()
    watcher = asyncio.create_task(
        until_done(client, done_key, int(total), lambda: queue.acked, consumer.stop)
    )
    await consumer._drain_loop(queue, processor, probe)  # the actor's loop, verbatim
    await consumer._finish(queue)
    cpu = time.process_time() - cpu0
    watcher.cancel()
    await client.aclose()
    return {"acked": queue.acked, "first": queue.first_ack, "end": queue.last_ack, "cpu_s": cpu}


async def noop(ctx: dict[str, Any], fields: dict[str, bytes]) -> None:
    """The arq job: nothing."""


def _arq_settings(redis_url: str) -> Any:
    from arq.connections import RedisSettings

    url = urlsplit(redis_url)
    return RedisSettings(host=url.hostname or "127.0.0.1", port=url.port or 6379, database=ARQ_DB)


async def arq_produce(result: Path, redis_url: str, n: str) -> dict[str, float]:
    from arq import create_pool

    items = list(manifests(int(n)))
    pool = await create_pool(_arq_settings(redis_url))
    await released(result)
    t0, cpu0 = time.time(), time.process_time()
    await publish_all(items, lambda fields: pool.enqueue_job("noop", fields))
    out = {"start": t0, "end": time.time(), "cpu_s": time.process_time() - cpu0}
    await pool.aclose()
    return out


async def arq_work(result: Path, redis_url: str, total: str, done_key: str) -> dict[str, float]:
    import logging.config

    from arq import create_pool
    from arq.logs import default_log_config
    from arq.worker import Worker, func

    logging.config.dictConfig(default_log_config(verbose=False))  # as `arq` the CLI does
    stamps = {"acked": 0.0, "first": 0.0, "end": 0.0}

    async def after_job_end(ctx: dict[str, Any]) -> None:  # after the job's result is stored
        stamps["end"] = time.time()
        stamps["first"] = stamps["first"] or stamps["end"]
        stamps["acked"] += 1

    pool = await create_pool(_arq_settings(redis_url))
    worker = Worker(
        functions=[func(noop, name="noop")],
        redis_pool=pool,
        handle_signals=False,
        after_job_end=after_job_end,
    )
    await released(result)
    cpu0 = time.process_time()
    running = asyncio.create_task(worker.async_run())
    await until_done(pool, done_key, int(total), lambda: int(stamps["acked"]), running.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await running
    return {**stamps, "cpu_s": time.process_time() - cpu0}


ROLES: dict[str, Callable[..., Coroutine[Any, Any, dict[str, float]]]] = {
    "produce": produce,
    "consume": consume,
    "arq-produce": arq_produce,
    "arq-work": arq_work,
}


def child(argv: list[str]) -> int:
    role, result, *args = argv
    out = asyncio.run(ROLES[role](Path(result), *args))
    Path(result).write_text(json.dumps(out))
    return 0


# -- the parent: spawn, release, collect -------------------------------------------------


@dataclass
class Child:
    role: str
    proc: subprocess.Popen[bytes]
    result: Path
    log: IO[bytes]

    def tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_bytes()[-1500:].decode(errors="replace")


def spawn(ctx: Context, role: str, tag: str, *args: str) -> Child:
    result = ctx.work / f"queue-{tag}.json"
    log = (ctx.work / f"queue-{tag}.log").open("wb")
    env = ctx.env()
    python: Path | str = sys.executable
    if role.startswith("arq"):  # arq pins redis-py < 6: it runs from a venv of its own
        python = side_venv("arq", ARQ_REQUIREMENTS)
        env["PYTHONPATH"] = str(ROOT)
    argv = [str(python), "-m", "bench.queue", role, str(result), *args]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
    )
    return Child(role, proc, result, log)


def wait_ready(children: list[Child], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for c in children:
        while not c.result.with_suffix(".ready").exists():
            if c.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"queue child not ready ({c.role}): {c.tail()}")
            time.sleep(0.02)


def release(children: list[Child]) -> float:
    t0 = time.time()
    for c in children:
        assert c.proc.stdin is not None
        c.proc.stdin.write(b"go\n")
        c.proc.stdin.flush()
    return t0


def collect(children: list[Child], timeout: float = 300) -> list[dict[str, float]]:
    out = []
    try:
        for c in children:
            if c.proc.wait(timeout) != 0:
                raise RuntimeError(f"queue child failed ({c.role}): {c.tail()}")
            out.append(json.loads(c.result.read_text()))
    finally:
        for c in children:
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()
            c.log.close()
    return out


def run_children(pre: list[Child], timed: list[Child]) -> tuple[float, list[dict[str, float]]]:
    """Start ``pre`` (untimed, e.g. pre-filling) to completion, then release ``timed``
    together; returns the release instant and the timed children's results."""
    try:
        wait_ready(pre + timed)
        if pre:
            release(pre)
            collect(pre)
        t0 = release(timed)
    except BaseException:
        collect_quietly(pre + timed)
        raise
    return t0, collect(timed)


def collect_quietly(children: list[Child]) -> None:
    for c in children:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()
        c.log.close()


# -- one run of each side -----------------------------------------------------------------


@dataclass
class Side:
    e2e: list[float] = field(default_factory=list)  # items/s
    consume: list[float] = field(default_factory=list)
    produce: list[float] = field(default_factory=list)  # items/s of the pre-fill
    cpu_us: list[float] = field(default_factory=list)  # consumers' CPU per item, consume-only
    e2e_cpu_us: list[tuple[float, float]] = field(default_factory=list)  # (producer, consumers)


def _redis(ctx: Context, db: int = 0) -> Any:
    import redis

    return redis.Redis.from_url(ctx.redis_url.rsplit("/", 1)[0] + f"/{db}")


def timed_run(producer: Child, consumers: list[Child], n: int, prefill: bool, side: Side) -> None:
    """Pre-fill then consume, or everything at once; record the rate and CPU per item."""
    if prefill:
        t0, results = run_children([producer], consumers)
        made = json.loads(producer.result.read_text())
    else:
        t0, (made, *results) = run_children([], [producer, *consumers])
    _check_all(results, n)
    rate = n / (max(r["end"] for r in results) - t0)
    consumers_cpu = sum(r["cpu_s"] for r in results) / n * 1e6
    if prefill:
        side.produce.append(n / (made["end"] - made["start"]))
        side.consume.append(rate)
        side.cpu_us.append(consumers_cpu)
    else:
        side.e2e.append(rate)
        side.e2e_cpu_us.append((made["cpu_s"] / n * 1e6, consumers_cpu))


def ours_run(ctx: Context, n: int, tag: str, prefill: bool, side: Side) -> None:
    from shared.keys import dlq_stream

    stream, done_key = f"bench:queue:{tag}", f"bench:queue:done:{tag}"
    client = _redis(ctx)
    client.xgroup_create(stream, GROUP, id="0", mkstream=True)  # as cloud-ingest does at start
    producer = spawn(ctx, "produce", f"{tag}-p", ctx.redis_url, stream, str(n))
    consumers = [
        spawn(ctx, "consume", f"{tag}-c{i}", ctx.redis_url, stream, f"c{i}", str(n), done_key)
        for i in range(2)
    ]
    try:
        timed_run(producer, consumers, n, prefill, side)
        if dead := client.xlen(dlq_stream(stream)):
            raise RuntimeError(f"{dead} manifests dead-lettered: the bench's manifests are bad")
    finally:
        client.delete(stream, dlq_stream(stream), done_key)
        client.close()


def arq_run(ctx: Context, n: int, tag: str, prefill: bool, side: Side) -> None:
    done_key = f"bench:queue:done:{tag}"
    client = _redis(ctx, ARQ_DB)
    client.flushdb()  # arq keeps results: start every run from an empty queue
    producer = spawn(ctx, "arq-produce", f"{tag}-p", ctx.redis_url, str(n))
    workers = [
        spawn(ctx, "arq-work", f"{tag}-w{i}", ctx.redis_url, str(n), done_key) for i in range(2)
    ]
    try:
        timed_run(producer, workers, n, prefill, side)
    finally:
        client.flushdb()
        client.close()


def _check_all(results: list[dict[str, float]], n: int) -> None:
    done = sum(int(r["acked"]) for r in results)
    if done < n:
        raise RuntimeError(f"only {done} of {n} items acknowledged")


# -- redis-benchmark ----------------------------------------------------------------------


def redis_benchmark(ctx: Context, n: int, *command: str, clients: int, pipeline: int) -> float:
    """Requests per second of one command, from ``--csv``."""
    url = urlsplit(ctx.redis_url)
    argv = ["redis-benchmark", "-h", url.hostname or "127.0.0.1", "-p", str(url.port)]
    argv += ["-n", str(n), "-c", str(clients), "-P", str(pipeline), "-r", "1000000", "--csv"]
    out = subprocess.run([*argv, *command], check=True, capture_output=True, timeout=120)
    last = out.stdout.decode().strip().splitlines()[-1]
    return float(last.strip('"').rsplit('","', 7)[1])


def raw_ceilings(ctx: Context, n: int) -> tuple[float, float]:
    """(XADD entries/s, approximate consume entries/s) of redis-benchmark."""
    fields = signed_fields(next(manifests(1)))
    stream = "bench:queue:redis-benchmark"
    args = [arg for k, v in fields.items() for arg in (k, v.decode())]
    client = _redis(ctx)
    try:
        xadd = redis_benchmark(ctx, n, "XADD", stream, "*", *args, clients=50, pipeline=16)
        client.xgroup_create(stream, "g", id="0")
        batches = n // 8
        read = redis_benchmark(
            ctx, batches, "XREADGROUP", "GROUP", "g", "c", "COUNT", "8", "STREAMS", stream, ">",
            clients=2, pipeline=1,
        )  # fmt: skip
        ids = [f"__rand_int__-{i}" for i in range(8)]
        ack = redis_benchmark(ctx, batches, "XACK", stream, "g", *ids, clients=2, pipeline=1)
        dele = redis_benchmark(ctx, batches, "XDEL", stream, *ids, clients=2, pipeline=1)
    finally:
        client.delete(stream)
        client.close()
    return xadd, 8 / (1 / read + 1 / ack + 1 / dele)


# -- figures ------------------------------------------------------------------------------


def _split(side: Side) -> str:
    produce = median([p for p, _ in side.e2e_cpu_us])
    consume = median([c for _, c in side.e2e_cpu_us])
    return f"{produce:.0f}+{consume:.0f}"


def figures(ours: Side, arq: Side, xadd: float, consume_raw: float, s: Sizes) -> list[Figure]:
    how = (
        f"{s.ours} manifests (arq: {s.arq} jobs), 2 consumer processes each; "
        "arq at defaults is bound by its 0.5 s poll loop"
    )
    target = f">= {TARGET:g}x arq"
    e2e, cons = median(ours.e2e), median(ours.consume)
    return [
        Figure(
            bench="queue",
            metric="end-to-end items/s, produce->verify->ack",
            ours=e2e,
            baseline=median(arq.e2e),
            unit="items/s",
            target=target,
            met=e2e >= TARGET * median(arq.e2e),
            note=f"{how}; CPU us/item producer+consumers: ours {_split(ours)}, arq {_split(arq)}",
            runs={"ours": ours.e2e, "arq": arq.e2e},
        ),
        Figure(
            bench="queue",
            metric="consume-only items/s (pre-filled), verify->ack",
            ours=cons,
            baseline=median(arq.consume),
            unit="items/s",
            target=target,
            met=cons >= TARGET * median(arq.consume),
            note=f"{how}; pre-fill (produce-only) rate ours {median(ours.produce):.0f}/s, "
            f"arq {median(arq.produce):.0f}/s",
            runs={"ours": ours.consume, "arq": arq.consume},
        ),
        Figure(
            bench="queue",
            metric="consumers' CPU per item (consume-only)",
            ours=median(ours.cpu_us),
            baseline=median(arq.cpu_us),
            unit="us/item",
            target="reported (no target; lower is better)",
            met=None,
            note="both consumer processes' CPU over the run / items",
            runs={"ours": ours.cpu_us, "arq": arq.cpu_us},
        ),
        Figure(
            bench="queue",
            metric="end-to-end vs redis-benchmark XADD",
            ours=e2e,
            baseline=xadd,
            unit="items/s",
            target="reported (share of the raw XADD rate)",
            met=None,
            note="redis-benchmark -c 50 -P 16: XADD of the same 3 fields",
        ),
        Figure(
            bench="queue",
            metric="consume-only vs redis-benchmark XREADGROUP+XACK+XDEL",
            ours=cons,
            baseline=consume_raw,
            unit="items/s",
            target="reported (share of the raw command rate)",
            met=None,
            note="approximation: -c 2 -P 1, COUNT 8 reads, acks/deletes of 8 random ids",
        ),
    ]


def run(ctx: Context) -> list[Figure]:
    s = sizes(ctx.quick)
    ours, arq = Side(), Side()
    for rep in range(ctx.repeats):
        runs: list[tuple[Callable[..., None], int, Side]] = [
            (ours_run, s.ours, ours),
            (arq_run, s.arq, arq),
        ]
        if rep % 2:  # alternate who goes first
            runs.reverse()
        for prefill in (False, True):
            for runner, n, side in runs:
                mode = "consume" if prefill else "e2e"
                runner(ctx, n, f"{runner.__name__}-{mode}-{rep}", prefill, side)
    xadd, consume_raw = raw_ceilings(ctx, s.redis_benchmark)
    return figures(ours, arq, xadd, consume_raw, s)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ROLES:
        raise SystemExit(f"usage: python -m bench.queue {{{','.join(ROLES)}}} RESULT ARGS...")
    raise SystemExit(child(sys.argv[1:]))
