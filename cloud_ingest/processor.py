"""One chunk, end to end: verify → idempotency check → lock → download → hash → media work
(integrity, content filters, preprocess of accepted chunks: one call in a media worker
process, under INGEST_PROCESS_TIMEOUT_S) → done record."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
import structlog
from botocore.exceptions import ClientError
from redis.exceptions import RedisError

from cloud_ingest.config import IngestSettings
from cloud_ingest.coverage import Index
from cloud_ingest.failures import RawReadFailed, ReadBreaker
from cloud_ingest.filters import Analysis
from cloud_ingest.media_pool import MediaPool
from cloud_ingest.objects import SizeError, get_bounded, get_json
from cloud_ingest.preprocess import media_work
from cloud_ingest.totals import Tally
from cloud_ingest.windows import Windows
from shared.keys import (
    camera_owner_key,
    check_location,
    chunk_lock_key,
    readable_object_key,
    recent_hashes_key,
    record_key,
    shard_key,
)
from shared.manifest import Manifest, Rejected, SignedManifest, verify_entry
from shared.queue import Entry
from shared.s3 import error_code, is_not_found

log = structlog.get_logger("cloud_ingest")

# A lock's holder is "{entry id}/{consumer}". Take it when free or when it is held for this
# very entry (by a consumer that died, or lost the entry to the reaper): the reaper gave
# the entry to us.
LOCK_SCRIPT = """
local held = redis.call('GET', KEYS[1])
if not held or string.sub(held, 1, #ARGV[2]) == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return 1
end
return 0
"""
# Delete the lock only if we still hold it.
UNLOCK_SCRIPT = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)
LOCK_POLL_S = 0.5  # how often a copy waiting for the lock looks again
MAX_RECORD_BYTES = 1 << 20  # our own done records are a few kB
SHARE_READABLE_S = 30.0  # how often a consumer names a raw object that read fine
# Dead letters whose manifest, authentic as it is, says nothing true of its camera's time.
NOT_EVIDENCE = frozenset({"camera_claimed", "replay"})
PROBE_S = 10.0  # a dead letter's look for its done record (the letter has moved already)


@dataclass(slots=True)
class Outcome:
    # "processed" (accepted or rejected by a filter) or "duplicate" (done before: ack)
    status: str
    manifest: Manifest
    verdict: str = "accepted"  # or the filter's reason
    timings: dict[str, float] = field(default_factory=dict)
    waited: bool = False  # another copy held the chunk's lock first


class ChunkProcessor:
    def __init__(
        self,
        settings: IngestSettings,
        s3: Any,
        redis: aioredis.Redis,
        consumer: str,
        pool: MediaPool,
        *,
        tally: Tally | None = None,
    ) -> None:
        self.settings = settings
        self.windows = Windows(settings, redis, s3, tally)
        self.coverage = Index(settings, redis, s3)
        self.s3 = s3
        self.redis = redis
        self.consumer = consumer
        self.pool = pool
        self.keyring = settings.signing_keys()
        self.replay_key = settings.replay_secret()
        self.reads = ReadBreaker(settings.raw_failures_to_pause)
        self._shared_at = -SHARE_READABLE_S
        self.thresholds = settings.thresholds()
        self.options = settings.preprocess()
        self.locks: dict[bytes, tuple[str, str]] = {}  # entry id -> (lock key, holder)

    async def process(self, entry: Entry, slot: AbstractAsyncContextManager[Any]) -> Outcome:
        """Raises Rejected for what can never succeed; other errors fail this attempt.
        The work itself runs inside ``slot`` (the consumer's bound on chunks at once)."""
        signed, replayed_at = verify_entry(entry.fields, self.keyring, self.replay_key)
        m = signed.manifest
        self._check_location(m)
        self._check_clock(m, replayed_at)
        rkey = record_key(self.settings.output_prefix, m)
        if await self._done_before(signed, rkey):
            return Outcome("duplicate", m)
        await self._check_camera_owner(m)
        waited = await self._lock(m, entry)
        try:
            if waited and await self._done_before(signed, rkey):
                return Outcome("duplicate", m, waited=True)
            async with slot:
                outcome = await self._process(entry, signed, rkey)
            outcome.waited = waited
            return outcome
        finally:
            await self._unlock(entry)

    def _check_location(self, m: Manifest) -> None:
        check_location(m, self.settings.raw_bucket, self.settings.raw_prefix)

    def _check_clock(self, m: Manifest, replayed_at: float | None) -> None:
        """A manifest from the future or from too long ago is a replay or a broken clock.
        A replay tag (reconcile, dlq requeue: minted with INGEST_REPLAY_KEY, or the
        manifest's own key without one) stands in for the age check, if the tag itself is
        fresh."""
        now = datetime.now(UTC)
        ahead = (m.end_time - now).total_seconds()
        if m.end_time < m.start_time:
            raise Rejected("clock_skew", "end_time is before start_time")
        if ahead > self.settings.max_clock_skew_s:
            raise Rejected("clock_skew", f"ends {ahead:.0f}s in the future")
        if replayed_at is None:
            age, what = (now - m.start_time).total_seconds(), "started"
        else:
            age, what = now.timestamp() - replayed_at, "replayed"
        if age > self.settings.max_manifest_age_s:
            raise Rejected("clock_skew", f"{what} {age:.0f}s ago (INGEST_MAX_MANIFEST_AGE_S)")
        if -age > self.settings.max_clock_skew_s:
            raise Rejected("clock_skew", f"{what} {-age:.0f}s in the future")

    async def _done_before(self, signed: SignedManifest, rkey: str) -> bool:
        """True for a redelivery of a processed chunk. The same chunk id with different
        content is a replay: refused, and the existing outputs stay as they are. Only a
        missing record means "not done": a missing bucket or a refusal is raised (the
        probe decides whose it is)."""
        record = await get_json(self.s3, self.settings.output_bucket, rkey, MAX_RECORD_BYTES)
        if record is None:
            return False
        if record.get("manifest") != signed.manifest.model_dump(mode="json"):
            raise Rejected(
                "replay",
                f"chunk {signed.manifest.chunk_id} was processed with a different manifest",
            )
        return True

    async def _check_camera_owner(self, m: Manifest) -> None:
        key = camera_owner_key(m.site_id, m.camera_id)
        owner: Any = await self.redis.set(key, m.device_id, nx=True, get=True)
        if owner is not None and owner.decode() != m.device_id:
            raise Rejected(
                "camera_claimed",
                f"camera {m.site_id}/{m.camera_id} belongs to device {owner.decode()!r}, "
                f"not {m.device_id!r}",
            )

    async def _lock(self, m: Manifest, entry: Entry) -> bool:
        """Hold the chunk's lock for this entry, waiting while another entry of the same
        chunk (a copy announced twice) holds it; the consumer keeps renewing our lease
        meanwhile. True if it had to wait."""
        key = chunk_lock_key(m.chunk_id)
        mine = entry.id.decode() + "/"
        holder = mine + self.consumer
        ttl = str(self.settings.lock_ttl_ms())
        waited = False
        while not await self.redis.eval(LOCK_SCRIPT, 1, key, holder, mine, ttl):
            waited = True
            await asyncio.sleep(LOCK_POLL_S)
        self.locks[entry.id] = (key, holder)
        return waited

    async def _unlock(self, entry: Entry) -> None:
        held = self.locks.pop(entry.id, None)
        if held is None:
            return
        try:
            await self.redis.eval(UNLOCK_SCRIPT, 1, *held)
        except RedisError as exc:  # it expires on its own
            log.warning("lock.release_failed", lock=held[0], error=repr(exc)[:200])

    async def _process(self, entry: Entry, signed: SignedManifest, rkey: str) -> Outcome:
        m = signed.manifest
        t0 = time.monotonic()
        data = await self._download(m)
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        if digest != m.sha256:
            raise Rejected("sha256_mismatch", f"object {m.key} hashes to {digest}")
        timings = {"download_s": time.monotonic() - t0}
        recent = await self._recent(m)
        media = await self.pool.run(media_work, data, m, self.thresholds, recent, self.options)
        timings.update(media.timings)
        analysis = media.analysis
        await self._remember(m, analysis.dhash)
        shard = None
        if media.shard is not None:
            t0 = time.monotonic()
            shard = await self._store_shard(m, media.shard, media.frames)
            timings["preprocess_s"] += time.monotonic() - t0
        shard_key = None if shard is None else str(shard["key"])
        verdict = analysis.reason or "accepted"
        await self.windows.note(m, verdict, shard_key, analysis.scores)  # before the record
        kind = "accepted" if analysis.reason is None else "rejected"
        await self.coverage.note(m, kind, analysis.reason)
        record = self._record(signed, entry, analysis, shard)
        await self.s3.put_object(
            Bucket=self.settings.output_bucket,
            Key=rkey,
            Body=record,
            ContentType="application/json",
        )
        return Outcome("processed", m, verdict, timings)

    async def dead_lettered(self, entry: Entry, reason: str) -> None:
        """Index a dead-lettered chunk's time as such, if its manifest is authentic, names
        a chunk where chunks may be, and speaks for its own camera (a forged or claimed
        one is no evidence of anything). Over an earlier verdict only if the chunk has no
        done record (its verdict was noted, its record never written)."""
        if reason in NOT_EVIDENCE:
            return
        try:
            signed, _ = verify_entry(entry.fields, self.keyring, self.replay_key)
            self._check_location(signed.manifest)
        except Rejected:
            return
        m = signed.manifest
        force = False
        try:
            async with asyncio.timeout(PROBE_S):
                rkey = record_key(self.settings.output_prefix, m)
                record = await get_json(
                    self.s3, self.settings.output_bucket, rkey, MAX_RECORD_BYTES
                )
            force = record is None
        except Exception as exc:  # the letter has moved: only the index entry is at stake
            log.warning("coverage.record_check_failed", chunk_id=m.chunk_id, error=repr(exc)[:300])
        try:
            await self.coverage.note(m, "dead_lettered", reason, force=force)
        except Exception as exc:  # the audit then reads its manifest (and calls it pending)
            log.warning("coverage.note_failed", chunk_id=m.chunk_id, error=repr(exc)[:300])

    async def _download(self, m: Manifest) -> bytes:
        """The chunk's bytes, exactly ``size_bytes`` of them: a bigger object is refused from
        its Content-Length, and never read past one byte more than declared. Only "no such
        key" is the chunk's own (``object_missing``); any other S3 error (a missing bucket,
        a redirect, a refusal) is a failed read that the probe, and the read breaker, judge."""
        if m.size_bytes > self.settings.max_chunk_bytes:
            raise Rejected(
                "oversized_chunk", f"{m.size_bytes} bytes > {self.settings.max_chunk_bytes}"
            )
        try:
            data = await get_bounded(self.s3, m.bucket, m.key, m.size_bytes, exact=True)
        except ClientError as exc:
            if is_not_found(exc):
                raise Rejected("object_missing", f"s3://{m.bucket}/{m.key}") from None
            raise RawReadFailed(error_code(exc), m.bucket, m.key) from exc
        except SizeError as exc:
            raise Rejected("size_mismatch", f"s3://{m.bucket}/{m.key}: {exc}") from None
        self.reads.succeeded(m.bucket, m.key)
        await self._share_readable(m)
        return data

    async def _share_readable(self, m: Manifest) -> None:
        """Now and then, tell the group which raw object reads fine (see ReadBreaker)."""
        now = time.monotonic()
        if now - self._shared_at < SHARE_READABLE_S:
            return
        self._shared_at = now
        with contextlib.suppress(RedisError):  # a hint: never the chunk's failure
            value = f"{m.bucket}\0{m.key}"
            await self.redis.set(readable_object_key(self.settings.group), value, ex=86400)

    async def readable_object(self) -> tuple[str, str] | None:
        """A raw object known to read fine: this consumer's last, else the group's."""
        if self.reads.last_read is not None:
            return self.reads.last_read
        try:
            raw: Any = await self.redis.get(readable_object_key(self.settings.group))
        except RedisError:
            return None
        if not raw or b"\0" not in raw:
            return None
        bucket, key = bytes(raw).decode().split("\0", 1)
        return bucket, key

    async def _recent(self, m: Manifest) -> list[str]:
        """Hashes of this camera's recent chunks, other than this very chunk (a redelivery)."""
        if self.settings.filter_recent_chunks == 0:
            return []
        raw: Any = await self.redis.lrange(recent_hashes_key(m.site_id, m.camera_id), 0, -1)
        out = []
        for item in raw:
            chunk_id, _, digest = item.decode().partition(":")
            if chunk_id != m.chunk_id:
                out.append(digest)
        return out

    async def _remember(self, m: Manifest, digest: str) -> None:
        n = self.settings.filter_recent_chunks
        if n == 0:
            return
        key = recent_hashes_key(m.site_id, m.camera_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.lpush(key, f"{m.chunk_id}:{digest}")
            pipe.ltrim(key, 0, n - 1)
            pipe.expire(key, 7 * 86400)
            await pipe.execute()

    async def _store_shard(self, m: Manifest, body: bytes, frames: int) -> dict[str, Any]:
        key = shard_key(self.settings.output_prefix, m)
        await self.s3.put_object(
            Bucket=self.settings.output_bucket,
            Key=key,
            Body=body,
            ContentType="application/vnd.apache.parquet",
        )
        digest = await asyncio.to_thread(lambda: hashlib.sha256(body).hexdigest())
        return {"key": key, "frames": frames, "bytes": len(body), "sha256": digest}

    def _record(
        self, signed: SignedManifest, entry: Entry, analysis: Analysis, shard: dict[str, Any] | None
    ) -> bytes:
        doc = {
            "chunk_id": signed.manifest.chunk_id,
            "status": "accepted" if analysis.reason is None else "rejected",
            "reason": analysis.reason,
            "scores": analysis.scores,
            "score_notes": analysis.score_notes,
            "manifest": signed.manifest.model_dump(mode="json"),
            "signature": signed.signature.model_dump(mode="json"),
            "integrity": {
                k: v
                for k, v in analysis.as_dict().items()
                if k not in ("scores", "score_notes", "reason")
            },
            "shard": shard,
            "stream_entry_id": entry.id.decode(),
            "deliveries": entry.deliveries,
            "consumer": self.consumer,
            "processed_at": datetime.now(UTC).isoformat(),
        }
        return json.dumps(doc, sort_keys=True, allow_nan=False).encode()
