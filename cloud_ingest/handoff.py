"""The hand-off of closed scene windows to reconstruction, labeling and downstream.

Closed window revisions (``cloud_ingest.windows``) wait on ``{stream}:windows``, a
stream with its own consumer group, so the hand-off inherits the queue's at-least-once
delivery. For each revision the hand-off first writes its MCAP (``scene_mcap``), then
runs every configured sink. Each step is idempotent and remembered per revision id once
done: a Ray job with a deterministic ``submission_id``, a signed webhook with an
``Idempotency-Key``, a downstream stream entry. A revision whose hand-off keeps failing
is dead-lettered to ``{stream}:windows:dlq``: after ``INGEST_MAX_DELIVERIES`` failed
attempts (a busy sink, an outage, a drain do not count), at once when its MCAP can never
be written (a raw chunk gone), or once it has kept failing for ``INGEST_HANDOFF_GIVE_UP_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import aiohttp
import redis.asyncio as aioredis
import structlog
from botocore.exceptions import BotoCoreError, ClientError
from redis.exceptions import RedisError

from cloud_ingest.config import IngestSettings
from cloud_ingest.processor import UNLOCK_SCRIPT
from cloud_ingest.scene_mcap import SceneError, publish_mcap
from cloud_ingest.totals import Tally
from shared.keys import ACTIVE_JOBS, JOB_SUBMIT_LOCK, JOBS, handoff_done_key, handoff_stream
from shared.queue import Entry, GroupConsumer, ReapCursor, ensure_group, publish

log = structlog.get_logger("cloud_ingest")
T = TypeVar("T")
DONE_TTL_S = 30 * 86400


class LeaseLost(Exception):
    """Another consumer took the revision over (ours looked idle): it hands it off."""


class PeerUnavailable(Exception):
    """A sink's service is overloaded or down (HTTP 429, 5xx): retried, not counted."""


class SinkBusy(Exception):
    """A sink cannot take the window now (e.g. the concurrent-job limit); retry later."""


# Failures of what the hand-off depends on, not of the window: retried without counting
# towards INGEST_MAX_DELIVERIES (as a busy sink), so a short outage dead-letters nothing;
# one that lasts INGEST_HANDOFF_GIVE_UP_S does (`handoff_stalled`).
ENVIRONMENT = (
    PeerUnavailable,
    BotoCoreError,
    ClientError,
    RedisError,
    OSError,
    TimeoutError,
    aiohttp.ClientConnectionError,
)
HANDOFF_GROUP = "handoff"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
JOB_SWEEP_PERIOD_S = 60.0  # how often finished jobs are looked for when none is running
JOB_SWEEP_MAX = 100  # job records deleted per look (each one a request to the head)


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


# -- sinks ---------------------------------------------------------------------


class Handoff:
    """Runs the configured sinks for closed windows; one per consumer actor."""

    def __init__(
        self, settings: IngestSettings, client: aioredis.Redis, s3: Any, name: str, tally: Tally
    ) -> None:
        self.settings = settings
        self.client = client
        self.s3 = s3
        self.name = name
        self.queue = GroupConsumer(client, handoff_stream(settings.stream), HANDOFF_GROUP, name)
        self.http: aiohttp.ClientSession | None = None
        self.tally = tally
        self.reap = ReapCursor()
        self._stale_first = False
        self.jobs = TimeLimitedThread(settings.job_api_timeout_s)
        self._swept_at = 0.0  # when finished jobs were last looked for
        # A hung sweep holds only its own thread, never the submissions' or status checks'.
        self.sweeper = TimeLimitedThread(settings.job_api_timeout_s)

    async def setup(self) -> None:
        await ensure_group(self.client, handoff_stream(self.settings.stream), HANDOFF_GROUP)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()

    async def track_jobs(self) -> dict[str, str]:
        """Follow submitted reconstruction jobs to a terminal state (``ingest:jobs``), and
        delete finished ones from Ray's job table once INGEST_JOB_KEEP_S has passed."""
        if "ray_job" not in self.settings.handoff_sinks:
            return {}
        active: Any = await self.client.smembers(ACTIVE_JOBS)
        await self._sweep_jobs()
        if not active:
            return {}
        statuses = await self.jobs.call(self._statuses, {a.decode() for a in active})
        async with self.client.pipeline(transaction=False) as pipe:
            for submission, state in statuses.items():
                pipe.hset(JOBS, submission, state)
                if state in TERMINAL:
                    pipe.srem(ACTIVE_JOBS, submission)
            await pipe.execute()
        return statuses

    def _statuses(self, wanted: set[str]) -> dict[str, str]:
        from ray.job_submission import JobSubmissionClient

        jobs = JobSubmissionClient(self.settings.job_address).list_jobs()
        return {j.submission_id: str(j.status.value) for j in jobs if j.submission_id in wanted}

    async def _sweep_jobs(self) -> None:
        """Thousands of windows a day add a job record each to the head's job table: the
        hand-off's own jobs, finished more than INGEST_JOB_KEEP_S ago and recorded as
        finished in ``ingest:jobs``, are deleted, a bounded few per look. Best effort: a
        failure is logged and looked at again next period, never the hand-off's."""
        period = min(JOB_SWEEP_PERIOD_S, self.settings.job_keep_s)
        if time.monotonic() - self._swept_at < period:
            return
        self._swept_at = time.monotonic()
        try:
            old = await self.sweeper.call(
                self._finished_before, time.time() - self.settings.job_keep_s
            )
            if not old:
                return
            states: list[Any] = await self.client.hmget(JOBS, old)
            recorded = [
                j for j, st in zip(old, states, strict=True) if st and st.decode() in TERMINAL
            ]
            if recorded:
                await self.sweeper.call(self._delete_jobs, recorded[:JOB_SWEEP_MAX])
                log.info(
                    "handoff.jobs_deleted", count=len(recorded[:JOB_SWEEP_MAX]), left=len(recorded)
                )
        except Exception as exc:
            log.warning("handoff.jobs_sweep_failed", error=repr(exc)[:300])

    def _finished_before(self, cutoff_s: float) -> list[str]:
        from ray.job_submission import JobSubmissionClient

        return [
            j.submission_id or ""
            for j in JobSubmissionClient(self.settings.job_address).list_jobs()
            if (j.submission_id or "").startswith("window-")
            and str(j.status.value) in TERMINAL
            and j.end_time is not None
            and j.end_time < cutoff_s * 1000
        ]

    def _delete_jobs(self, submission_ids: list[str]) -> None:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.settings.job_address)
        for submission_id in submission_ids:
            with contextlib.suppress(Exception):  # gone meanwhile (another consumer)
                client.delete_job(submission_id)

    async def step(self) -> int:
        """Hand off one window waiting for us: ours first, then, turn about, a stale one
        or a new one (so stale ones that keep failing cannot starve new windows). One
        at a time, so none waits idle behind another's MCAP until it looks abandoned. A
        failed attempt is this revision's alone: logged, counted, retried after
        INGEST_HANDOFF_CLAIM_S."""
        stale_ms = int(self.settings.handoff_claim_s * 1000)
        self._stale_first = not self._stale_first
        if self._stale_first:
            entries = await self.queue.claim_stale(self.reap, stale_ms, 1)
            entries = entries or await self.queue.read(1, None)
        else:
            entries = await self.queue.read(1, None)
            entries = entries or await self.queue.claim_stale(self.reap, stale_ms, 1)
        for entry in entries:
            try:
                await self._hand_off(entry)
            except Exception as exc:
                self.tally.inc("handoff_retries")
                log.warning(
                    "handoff.retry", entry_id=entry.id.decode(), error=repr(exc)[:300], exc_info=exc
                )
        return len(entries)

    async def _hand_off(self, entry: Entry) -> None:
        if not entry.fields:  # deleted from the stream meanwhile: nothing to hand off
            await self.queue.ack([entry.id])
            return
        doc = _document(entry)
        if doc is None:
            await self._dead_letter(entry, "?", "malformed_window", "not a closed-window document")
            return
        done_key = handoff_done_key(doc["revision_id"])
        done: Any = await self.client.hgetall(done_key)
        if await self._given_up(entry, doc, done):
            return
        lost = asyncio.Event()
        keep = asyncio.create_task(self._keep_claimed(entry.id, lost))
        try:
            summary = await self._steps(doc, done, lost)
        except LeaseLost:  # its new owner hands it off; we neither ack nor count
            log.warning("handoff.taken_over", revision_id=doc["revision_id"])
            return
        except SinkBusy:
            await self._not_an_attempt(done_key, None)
            return  # stays pending; tried again later
        except SceneError as exc:  # a raw chunk gone or changed: no retry brings it back
            await self._dead_letter(entry, doc["revision_id"], "mcap_failed", str(exc))
            return
        except ENVIRONMENT as exc:  # S3, Redis, a peer unreachable: theirs, not the window's
            await self._not_an_attempt(done_key, exc)
            raise
        except asyncio.CancelledError:  # a drain: not this revision's failure either
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._not_an_attempt(done_key, None)), 2)
            raise
        except Exception as exc:
            await self._failed(done_key, exc)
            raise
        finally:
            keep.cancel()
            await asyncio.wait([keep])
        await self.client.expire(done_key, DONE_TTL_S)
        await self.queue.ack([entry.id])
        log.info(
            "window.handed_off",
            revision_id=doc["revision_id"],
            sinks=list(self.settings.handoff_sinks),
            mcap_bytes=summary["bytes"],
            mcap_write_s=summary["write_s"],
        )

    async def _steps(
        self, doc: dict[str, Any], done: dict[bytes, bytes], lost: asyncio.Event
    ) -> dict[str, Any]:
        """The MCAP, then each sink not done yet; LeaseLost once another consumer has it."""
        done_key = handoff_done_key(doc["revision_id"])
        summary = await self._mcap(doc, done)
        full = {**doc, "mcap": summary}
        for sink in self.settings.handoff_sinks:
            if lost.is_set():
                raise LeaseLost
            if await self.client.hexists(done_key, sink):  # now: another may have run it
                continue
            result = await getattr(self, f"_sink_{sink}")(full)
            await self.client.hset(done_key, sink, result)
            self.tally.inc(f"handoff_{sink}")
        if lost.is_set():
            raise LeaseLost
        return summary

    async def _given_up(self, entry: Entry, doc: dict[str, Any], done: dict[bytes, bytes]) -> bool:
        """Dead-letter a revision that failed INGEST_MAX_DELIVERIES attempts (busy sinks
        and outages do not count), or that has kept failing, whatever the cause, for
        INGEST_HANDOFF_GIVE_UP_S."""
        attempts = entry.deliveries - int(done.get(b"busy", 0))
        since = float(done.get(b"first_failed_at", time.time()))
        detail = done.get(b"error", b"").decode()
        if attempts > self.settings.max_deliveries:
            await self._dead_letter(entry, doc["revision_id"], "handoff_failed", detail)
        elif time.time() - since > self.settings.handoff_give_up_s:
            await self._dead_letter(entry, doc["revision_id"], "handoff_stalled", detail)
        else:
            return False
        return True

    async def _failed(
        self, done_key: str, exc: BaseException | None, *, counted: bool = True
    ) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            if not counted:
                pipe.hincrby(done_key, "busy", 1)
            if exc is not None:
                pipe.hset(done_key, "error", repr(exc)[:1000])
                pipe.hsetnx(done_key, "first_failed_at", repr(time.time()))
            pipe.expire(done_key, DONE_TTL_S)
            await pipe.execute()

    async def _not_an_attempt(self, done_key: str, exc: BaseException | None) -> None:
        """A busy sink, an unreachable dependency, a drain: tried again, and only
        dead-lettered once it has kept failing for INGEST_HANDOFF_GIVE_UP_S."""
        await self._failed(done_key, exc, counted=False)

    async def _keep_claimed(self, entry_id: bytes, lost: asyncio.Event) -> None:
        """While this revision is handed off (an MCAP can take a while), keep its entry
        from looking idle (the owner-checked lease renewal of the chunk queue); set
        ``lost`` once another consumer has it."""
        period = self.settings.handoff_claim_s / 3
        while True:
            await asyncio.sleep(period)
            try:
                gone = await self.queue.renew([entry_id])
            except Exception as exc:  # a missed renewal; the next may pass
                log.warning("handoff.renew_failed", error=repr(exc)[:200])
                continue
            if gone:
                lost.set()
                return

    async def _mcap(self, doc: dict[str, Any], done: dict[bytes, bytes]) -> dict[str, Any]:
        """The revision's MCAP, written once (its summary kept with the done record)."""
        if b"mcap" in done:
            summary: dict[str, Any] = json.loads(done[b"mcap"])
            return summary
        summary = await publish_mcap(self.s3, self.settings, doc)
        await self.client.hset(
            handoff_done_key(doc["revision_id"]), "mcap", json.dumps(summary, sort_keys=True)
        )
        self.tally.inc("handoff_mcap")
        log.info(
            "window.mcap",
            revision_id=doc["revision_id"],
            key=summary["key"],
            bytes=summary["bytes"],
            write_s=summary["write_s"],
            upload_s=summary["upload_s"],
            messages={c: v["messages"] for c, v in summary["channels"].items()},
        )
        return summary

    async def _dead_letter(self, entry: Entry, revision: str, reason: str, detail: str) -> None:
        if await self.queue.dead_letter(entry, reason, detail):
            self.tally.note("windows_dead_lettered")
            log.error(
                "window.dead_lettered",
                revision_id=revision,
                reason=reason,
                deliveries=entry.deliveries,
                error=detail[:300],
            )

    async def _sink_stream(self, doc: dict[str, Any]) -> str:
        entry_id = await publish(
            self.client,
            self.settings.handoff_stream,
            {
                "window_id": doc["window_id"].encode(),
                "revision_id": doc["revision_id"].encode(),
                "window": json.dumps(doc, sort_keys=True, allow_nan=False).encode(),
            },
        )
        return entry_id.decode()

    async def _sink_webhook(self, doc: dict[str, Any]) -> str:
        if not self.settings.webhook_url or self.settings.webhook_secret is None:
            raise RuntimeError("INGEST_WEBHOOK_URL and INGEST_WEBHOOK_SECRET are required")
        payload = {**doc, "urls": await self._presigned(doc)}
        body = json.dumps(payload, sort_keys=True, allow_nan=False).encode()
        mac = hmac.new(
            self.settings.webhook_secret.get_secret_value().encode(), body, hashlib.sha256
        ).hexdigest()
        self.http = self.http or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        async with self.http.post(
            self.settings.webhook_url,
            data=body,
            headers={
                "Content-Type": "application/json",
                "Idempotency-Key": doc["revision_id"],
                "X-Signature": f"sha256={mac}",
            },
        ) as resp:
            if resp.status == 429 or resp.status >= 500:  # overloaded or down: not the window's
                raise PeerUnavailable(f"webhook answered {resp.status}")
            if resp.status >= 300:
                raise RuntimeError(f"webhook answered {resp.status}")
            return str(resp.status)

    async def _presigned(self, doc: dict[str, Any]) -> dict[str, Any]:
        """GET URLs for the MCAP and every raw chunk, expiring after
        INGEST_WEBHOOK_URL_EXPIRY_S (signed locally: no request to S3)."""
        expiry = self.settings.webhook_url_expiry_s

        async def url(bucket: str, key: str) -> str:
            params = {"Bucket": bucket, "Key": key}
            signed: str = await self.s3.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=expiry
            )
            return signed

        chunks = {
            camera: {n["chunk_id"]: await url(self.settings.raw_bucket, n["key"]) for n in notes}
            for camera, notes in doc["chunks"].items()
        }
        return {
            "expires_in_s": expiry,
            "mcap": await url(self.settings.output_bucket, doc["mcap_key"]),
            "chunks": chunks,
        }

    async def _sink_ray_job(self, doc: dict[str, Any]) -> str:
        # Every consumer hands windows off: without one lock around "count the running
        # jobs, then submit", two of them both see a free slot and both submit.
        holder = f"{self.name}/{time.time_ns()}"
        ttl_ms = int((self.settings.job_api_timeout_s + 5) * 1000)
        if not await self.client.set(JOB_SUBMIT_LOCK, holder, nx=True, px=ttl_ms):
            raise SinkBusy("another consumer is submitting a reconstruction job")
        try:
            submission = await self.jobs.call(self._submit, doc)
        except TimeoutError:
            # The thread may still be counting or submitting: the lock stays until it
            # expires, so nobody else submits beside it meanwhile.
            raise
        except BaseException:
            await self._unlock_submit(holder)
            raise
        await self._unlock_submit(holder)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hsetnx(JOBS, submission, "PENDING")
            pipe.sadd(ACTIVE_JOBS, submission)
            await pipe.execute()
        return submission

    async def _unlock_submit(self, holder: str) -> None:
        with contextlib.suppress(RedisError):  # it expires on its own
            await self.client.eval(UNLOCK_SCRIPT, 1, JOB_SUBMIT_LOCK, holder)

    def _submit(self, doc: dict[str, Any]) -> str:
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.settings.job_address)
        submission_id = f"window-{doc['revision_id']}"
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
            revision=doc["revision"],
            revision_id=doc["revision_id"],
            mcap_key=doc["mcap_key"],
            site=doc["site_id"],
            start=doc["start"],
            end=doc["end"],
            chunk_ids=chunk_ids,
        )
        try:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                entrypoint_num_cpus=self.settings.job_entrypoint_num_cpus,
                metadata={"window_id": doc["window_id"], "revision_id": doc["revision_id"]},
            )
        except RuntimeError as exc:
            if "already exists" not in str(exc):
                raise
        return submission_id


def _document(entry: Entry) -> dict[str, Any] | None:
    """The closed window's document, or None for an entry that is not one (written by an
    older release, or by hand): it is dead-lettered at once."""
    try:
        doc = json.loads(entry.fields[b"window"])
    except (KeyError, ValueError):
        return None
    needed = ("window_id", "revision_id", "revision", "mcap_key", "chunks", "site_id")
    if not isinstance(doc, dict) or not all(k in doc for k in needed):
        return None
    return doc
