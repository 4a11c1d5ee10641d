"""One chunk, end to end: verify → idempotency check → download → hash → integrity →
content filters → preprocess (accepted only) → done record."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis.asyncio as aioredis
from botocore.exceptions import ClientError

from cloud_ingest.config import IngestSettings
from cloud_ingest.filters import Analysis, analyse, verdict
from cloud_ingest.handoff import note_processed
from cloud_ingest.preprocess import frames_to_shard
from shared.keys import (
    camera_owner_key,
    chunk_key,
    chunk_lock_key,
    recent_hashes_key,
    record_key,
    shard_key,
)
from shared.manifest import Manifest, Rejected, SignedManifest, verify_fields
from shared.queue import Entry
from shared.s3 import is_not_found

T = TypeVar("T")

# Delete the lock only if we still hold it.
UNLOCK_SCRIPT = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)


@dataclass(slots=True)
class Outcome:
    # "processed" (accepted or rejected by a filter), "duplicate" (done before: ack),
    # "busy" (another copy in progress: leave pending)
    status: str
    manifest: Manifest
    verdict: str = "accepted"  # or the filter's reason
    timings: dict[str, float] = field(default_factory=dict)


class ChunkProcessor:
    def __init__(
        self, settings: IngestSettings, s3: Any, redis: aioredis.Redis, consumer: str
    ) -> None:
        self.settings = settings
        self.s3 = s3
        self.redis = redis
        self.consumer = consumer
        self.keyring = settings.signing_keys()
        self.thresholds = settings.thresholds()
        self.options = settings.preprocess()

    async def process(self, entry: Entry) -> Outcome:
        """Raises Rejected for what can never succeed; other errors mean 'retry later'."""
        signed = verify_fields(entry.fields, self.keyring)
        m = signed.manifest
        self._check_location(m)
        self._check_clock(m)
        rkey = record_key(self.settings.output_prefix, m)
        if await self._done_before(signed, rkey):
            return Outcome("duplicate", m)
        await self._check_camera_owner(m)
        # The lock is held per chunk, by stream entry. Another entry of the same chunk (a
        # copy announced twice) waits, unacknowledged; this entry reclaimed from a consumer
        # that died (its lease ran out) takes the lock over.
        owner = entry.id.decode()
        if not await self._lock(m, owner):
            return Outcome("busy", m)
        try:
            return await self._process(entry, signed, rkey)
        finally:
            await self.redis.eval(UNLOCK_SCRIPT, 1, chunk_lock_key(m.chunk_id), owner)

    def _check_location(self, m: Manifest) -> None:
        """Only the configured raw bucket, only the key the manifest's own fields derive:
        a device cannot make the cloud read (or a record point at) anything else."""
        if m.bucket != self.settings.raw_bucket:
            raise Rejected("foreign_bucket", f"bucket {m.bucket!r} is not INGEST_RAW_BUCKET")
        expected = chunk_key(self.settings.raw_prefix, m.site_id, m.camera_id, m.start_time, m.seq)
        if m.key != expected:
            raise Rejected("foreign_key", f"key {m.key[:200]!r} is not {expected!r}")

    def _check_clock(self, m: Manifest) -> None:
        """A manifest from the future or from too long ago is a replay or a broken clock."""
        now = datetime.now(UTC)
        ahead = (m.end_time - now).total_seconds()
        age = (now - m.start_time).total_seconds()
        if m.end_time < m.start_time:
            raise Rejected("clock_skew", "end_time is before start_time")
        if ahead > self.settings.max_clock_skew_s:
            raise Rejected("clock_skew", f"ends {ahead:.0f}s in the future")
        if age > self.settings.max_manifest_age_s:
            raise Rejected("clock_skew", f"started {age:.0f}s ago (INGEST_MAX_MANIFEST_AGE_S)")

    async def _done_before(self, signed: SignedManifest, rkey: str) -> bool:
        """True for a redelivery of a processed chunk. The same chunk id with different
        content is a replay: refused, and the existing outputs stay as they are."""
        try:
            resp = await self.s3.get_object(Bucket=self.settings.output_bucket, Key=rkey)
        except ClientError as exc:
            if is_not_found(exc):
                return False
            raise
        async with resp["Body"] as body:
            record = json.loads(await body.read())
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

    async def _lock(self, m: Manifest, owner: str) -> bool:
        key = chunk_lock_key(m.chunk_id)
        ttl_ms = int(max(60.0, 2 * self.settings.visibility_timeout_s) * 1000)
        if await self.redis.set(key, owner, nx=True, px=ttl_ms):
            return True
        holder: Any = await self.redis.get(key)
        return bool(holder == owner.encode())  # this very entry, from a consumer that died

    async def _process(self, entry: Entry, signed: SignedManifest, rkey: str) -> Outcome:
        m = signed.manifest
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        data = await self._download(m)
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        if digest != m.sha256:
            raise Rejected("sha256_mismatch", f"object {m.key} hashes to {digest}")
        timings["download_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        analysis = await self._bounded(asyncio.to_thread(analyse, data, m, self.thresholds))
        analysis.reason = verdict(analysis, self.thresholds, await self._recent(m))
        await self._remember(m, analysis.dhash)
        timings["filter_s"] = time.monotonic() - t0
        shard = None
        if analysis.reason is None:
            t0 = time.monotonic()
            shard = await self._preprocess(data, m, analysis)
            timings["preprocess_s"] = time.monotonic() - t0
        shard_key = None if shard is None else str(shard["key"])
        await note_processed(self.redis, self.settings, m, shard_key)  # before the done record
        record = self._record(signed, entry, analysis, shard)
        await self.s3.put_object(
            Bucket=self.settings.output_bucket,
            Key=rkey,
            Body=record,
            ContentType="application/json",
        )
        return Outcome("processed", m, analysis.reason or "accepted", timings)

    async def _bounded(self, work: Awaitable[T]) -> T:
        """Media work under INGEST_PROCESS_TIMEOUT_S: a chunk that hangs the decoder fails
        this attempt (and, after INGEST_MAX_DELIVERIES attempts, goes to the DLQ)."""
        try:
            return await asyncio.wait_for(work, self.settings.process_timeout_s)
        except TimeoutError:
            raise TimeoutError(f"media work exceeded {self.settings.process_timeout_s}s") from None

    async def _download(self, m: Manifest) -> bytes:
        if m.size_bytes > self.settings.max_chunk_bytes:
            raise Rejected(
                "oversized_chunk", f"{m.size_bytes} bytes > {self.settings.max_chunk_bytes}"
            )
        try:
            resp = await self.s3.get_object(Bucket=m.bucket, Key=m.key)
        except ClientError as exc:
            if is_not_found(exc):
                raise Rejected("object_missing", f"s3://{m.bucket}/{m.key}") from None
            raise
        async with resp["Body"] as body:
            data: bytes = await body.read()
        if len(data) != m.size_bytes:
            raise Rejected("size_mismatch", f"{len(data)} bytes, manifest says {m.size_bytes}")
        return data

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

    async def _preprocess(self, data: bytes, m: Manifest, analysis: Analysis) -> dict[str, Any]:
        scores = json.dumps(analysis.scores, sort_keys=True)
        body, frames = await self._bounded(
            asyncio.to_thread(frames_to_shard, data, m, self.options, scores)
        )
        key = shard_key(self.settings.output_prefix, m)
        await self.s3.put_object(
            Bucket=self.settings.output_bucket,
            Key=key,
            Body=body,
            ContentType="application/vnd.apache.parquet",
        )
        return {
            "key": key,
            "frames": frames,
            "bytes": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }

    def _record(
        self, signed: SignedManifest, entry: Entry, analysis: Analysis, shard: dict[str, Any] | None
    ) -> bytes:
        doc = {
            "chunk_id": signed.manifest.chunk_id,
            "status": "accepted" if analysis.reason is None else "rejected",
            "reason": analysis.reason,
            "scores": analysis.scores,
            "manifest": signed.manifest.model_dump(mode="json"),
            "signature": signed.signature.model_dump(mode="json"),
            "integrity": {
                k: v for k, v in analysis.as_dict().items() if k not in ("scores", "reason")
            },
            "shard": shard,
            "stream_entry_id": entry.id.decode(),
            "deliveries": entry.deliveries,
            "consumer": self.consumer,
            "processed_at": datetime.now(UTC).isoformat(),
        }
        return json.dumps(doc, sort_keys=True).encode()
