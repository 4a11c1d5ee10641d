"""Scene windows and their hand-off to reconstruction, labeling and downstream consumers.

Accepted chunks are grouped per site into fixed windows of ``INGEST_WINDOW_S``
(multi-view reconstruction needs every view of the same moment). A window
closes when every expected camera of the site (``INGEST_SITE_CAMERAS``) has
covered its end, or ``INGEST_WINDOW_TIMEOUT_S`` after its end. Closing is
atomic (``ZREM`` of the open-window index decides who closes) and puts the
window on ``{stream}:windows``, a stream with its own consumer group, so the
hand-off inherits the queue's at-least-once delivery. Each sink is idempotent
and remembered per window once done: a Ray job with a deterministic
``submission_id``, a signed webhook with an idempotency key, a downstream stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import aiohttp
import redis.asyncio as aioredis

from cloud_ingest.config import IngestSettings
from cloud_ingest.totals import Tally
from shared.keys import (
    ACTIVE_JOBS,
    JOBS,
    OPEN_WINDOWS,
    handoff_done_key,
    handoff_stream,
    window_key,
)
from shared.manifest import Manifest
from shared.queue import Entry, GroupConsumer, ReapCursor, ensure_group, publish

T = TypeVar("T")
HANDOFF_GROUP = "handoff"
# KEYS: the open-window index, the windows stream. ARGV: window key, its document.
CLOSE_SCRIPT = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'window', ARGV[2])
return 1
"""


class SinkBusy(Exception):
    """A sink cannot take the window now (e.g. the concurrent-job limit); retry later."""


class TimeLimitedThread:
    """Blocking calls (the Job Submission client: ``requests`` without a timeout) in a
    daemon thread of their own, given up after ``timeout_s``. A call that hangs keeps its
    thread; until it returns, further calls fail at once instead of adding threads."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._thread: threading.Thread | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._thread is not None and self._thread.is_alive():
            raise TimeoutError(f"an earlier call is still hanging after {self.timeout_s:g}s")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if done.done():  # given up already
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        def work() -> None:
            try:
                result, error = fn(*args), None
            except BaseException as exc:
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle, result, error)

        self._thread = threading.Thread(target=work, name="job-api", daemon=True)
        self._thread.start()
        try:
            return await asyncio.wait_for(done, self.timeout_s)
        except TimeoutError:
            raise TimeoutError(f"Job API call exceeded {self.timeout_s:g}s") from None


# -- windows -------------------------------------------------------------------


def window_start(m: Manifest, size_s: int) -> int:
    return int(math.floor(m.start_time.timestamp() / size_s) * size_s)


async def note_processed(
    client: aioredis.Redis, settings: IngestSettings, m: Manifest, shard_key: str | None
) -> None:
    """Count a processed chunk's time towards its window (accepted ones also join the
    hand-off with their shard); close the window once every expected view covers it."""
    start = window_start(m, settings.window_s)
    key = window_key(m.site_id, start)
    end = start + settings.window_s
    chunk_start = m.start_time.timestamp()
    overlap = max(0.0, min(end, chunk_start + m.media_duration_s) - max(start, chunk_start))
    async with client.pipeline(transaction=True) as pipe:
        if shard_key is not None:
            pipe.hset(key, f"chunk:{m.camera_id}:{m.chunk_id}", shard_key)
        pipe.hset(key, f"seen:{m.camera_id}:{m.chunk_id}", str(overlap))  # idempotent on redo
        pipe.hset(key, "site", m.site_id)
        pipe.hset(key, "start", str(start))
        # Timeout counted from the window's end, or from its first chunk for backfilled footage.
        pipe.zadd(OPEN_WINDOWS, {key: max(end, time.time()) + settings.window_timeout_s}, nx=True)
        pipe.expire(key, 7 * 86400)
        await pipe.execute()
    expected = settings.site_cameras.get(m.site_id)
    if expected and _covered(await client.hgetall(key), settings.window_s) >= set(expected):
        await close(client, settings, key, "complete")


def _covered(fields: Any, window_s: int) -> set[str]:
    """Cameras whose processed chunks cover the whole window (to half a second)."""
    seconds: dict[str, float] = {}
    for name, value in fields.items():
        if name.startswith(b"seen:"):
            camera = name.decode().split(":", 2)[1]
            seconds[camera] = seconds.get(camera, 0.0) + float(value)
    return {c for c, s in seconds.items() if s >= window_s - 0.5}


async def close_expired(client: aioredis.Redis, settings: IngestSettings) -> int:
    due: Any = await client.zrangebyscore(OPEN_WINDOWS, "-inf", time.time(), start=0, num=20)
    closed = 0
    for key in due:
        closed += int(await close(client, settings, key.decode(), "timeout"))
    return closed


async def close(client: aioredis.Redis, settings: IngestSettings, key: str, why: str) -> bool:
    """Close a window once: whoever removes it from the open index hands it off, in the same
    script (a consumer dying between the two would otherwise lose the window)."""
    fields: Any = await client.hgetall(key)
    if not fields:
        await client.zrem(OPEN_WINDOWS, key)  # expired or never written: nothing to hand off
        return False
    doc = _window_doc(fields, settings, why)
    body = json.dumps(doc, allow_nan=False).encode()
    closed: Any = await client.eval(
        CLOSE_SCRIPT, 2, OPEN_WINDOWS, handoff_stream(settings.stream), key, body
    )
    return bool(closed)


def _window_doc(fields: dict[bytes, bytes], settings: IngestSettings, why: str) -> dict[str, Any]:
    site = fields[b"site"].decode()
    start = int(fields[b"start"])
    chunks: dict[str, list[dict[str, str]]] = {}
    for name, value in fields.items():
        if name.startswith(b"chunk:"):
            _, camera, chunk_id = name.decode().split(":", 2)
            chunks.setdefault(camera, []).append({"chunk_id": chunk_id, "shard": value.decode()})
    for items in chunks.values():
        items.sort(key=lambda c: c["chunk_id"])
    expected = settings.site_cameras.get(site, [])
    return {
        "window_id": f"{site}-{start}",
        "site_id": site,
        "start": start,
        "end": start + settings.window_s,
        "closed_because": why,
        "cameras": sorted(chunks),
        "missing_cameras": sorted(set(expected) - set(chunks)),
        "chunks": {c: chunks[c] for c in sorted(chunks)},
    }


# -- sinks ---------------------------------------------------------------------


class Handoff:
    """Runs the configured sinks for closed windows; one per consumer actor."""

    def __init__(
        self, settings: IngestSettings, client: aioredis.Redis, name: str, tally: Tally
    ) -> None:
        self.settings = settings
        self.client = client
        self.queue = GroupConsumer(client, handoff_stream(settings.stream), HANDOFF_GROUP, name)
        self.http: aiohttp.ClientSession | None = None
        self.tally = tally
        self.reap = ReapCursor()
        self.jobs = TimeLimitedThread(settings.job_api_timeout_s)

    async def setup(self) -> None:
        await ensure_group(self.client, handoff_stream(self.settings.stream), HANDOFF_GROUP)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()

    async def track_jobs(self) -> dict[str, str]:
        """Follow submitted reconstruction jobs to a terminal state (``ingest:jobs``)."""
        active: Any = await self.client.smembers(ACTIVE_JOBS)
        if not active or "ray_job" not in self.settings.handoff_sinks:
            return {}
        statuses = await self.jobs.call(self._statuses, {a.decode() for a in active})
        async with self.client.pipeline(transaction=False) as pipe:
            for submission, state in statuses.items():
                pipe.hset(JOBS, submission, state)
                if state in ("SUCCEEDED", "FAILED", "STOPPED"):
                    pipe.srem(ACTIVE_JOBS, submission)
            await pipe.execute()
        return statuses

    def _statuses(self, wanted: set[str]) -> dict[str, str]:
        from ray.job_submission import JobSubmissionClient

        jobs = JobSubmissionClient(self.settings.job_address).list_jobs()
        return {j.submission_id: str(j.status.value) for j in jobs if j.submission_id in wanted}

    async def step(self) -> int:
        """Hand off the windows waiting for us (ours first, then stale ones, then new)."""
        entries = await self.queue.claim_stale(self.reap, 30_000, 4)
        entries = entries or await self.queue.read(4, None)
        for entry in entries:
            await self._one(entry)
        return len(entries)

    async def _one(self, entry: Entry) -> None:
        doc = json.loads(entry.fields[b"window"])
        done_key = handoff_done_key(doc["window_id"])
        try:
            for sink in self.settings.handoff_sinks:
                if await self.client.hexists(done_key, sink):
                    continue
                result = await getattr(self, f"_sink_{sink}")(doc)
                await self.client.hset(done_key, sink, result)
                self.tally.inc(f"handoff_{sink}")
        except SinkBusy:
            return  # stays pending; tried again later
        await self.client.expire(done_key, 30 * 86400)
        await self.queue.ack([entry.id])

    async def _sink_stream(self, doc: dict[str, Any]) -> str:
        entry_id = await publish(
            self.client,
            self.settings.handoff_stream,
            {
                "window_id": doc["window_id"].encode(),
                "window": json.dumps(doc, sort_keys=True, allow_nan=False).encode(),
            },
        )
        return entry_id.decode()

    async def _sink_webhook(self, doc: dict[str, Any]) -> str:
        if not self.settings.webhook_url or self.settings.webhook_secret is None:
            raise RuntimeError("INGEST_WEBHOOK_URL and INGEST_WEBHOOK_SECRET are required")
        body = json.dumps(doc, sort_keys=True, allow_nan=False).encode()
        mac = hmac.new(
            self.settings.webhook_secret.get_secret_value().encode(), body, hashlib.sha256
        ).hexdigest()
        self.http = self.http or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        async with self.http.post(
            self.settings.webhook_url,
            data=body,
            headers={
                "Content-Type": "application/json",
                "Idempotency-Key": doc["window_id"],
                "X-Signature": f"sha256={mac}",
            },
        ) as resp:
            if resp.status >= 300:
                raise RuntimeError(f"webhook answered {resp.status}")
            return str(resp.status)

    async def _sink_ray_job(self, doc: dict[str, Any]) -> str:
        submission = await self.jobs.call(self._submit, doc)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hsetnx(JOBS, submission, "PENDING")
            pipe.sadd(ACTIVE_JOBS, submission)
            await pipe.execute()
        return submission

    def _submit(self, doc: dict[str, Any]) -> str:
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.settings.job_address)
        submission_id = f"window-{doc['window_id']}"
        chunk_ids = ",".join(c["chunk_id"] for items in doc["chunks"].values() for c in items)
        active = [
            j
            for j in client.list_jobs()
            if (j.submission_id or "").startswith("window-")
            and j.status in (JobStatus.PENDING, JobStatus.RUNNING)
        ]
        if submission_id in {j.submission_id for j in active}:
            return submission_id
        if len(active) >= self.settings.job_max_concurrent:
            raise SinkBusy(f"{len(active)} reconstruction jobs running")
        entrypoint = self.settings.job_entrypoint.format(
            bucket=self.settings.output_bucket,
            prefix=self.settings.output_prefix,
            window_id=doc["window_id"],
            site=doc["site_id"],
            start=doc["start"],
            end=doc["end"],
            chunk_ids=chunk_ids,
        )
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=submission_id)
        except RuntimeError as exc:
            if "already exists" not in str(exc):
                raise
        return submission_id
