"""Manifests: built when a chunk is committed, signed and announced after its upload."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from edge_agent.config import EdgeSettings
from edge_agent.segmenter import ClosedChunk
from edge_agent.spool import Position
from shared import __version__
from shared.keys import chunk_key, manifest_key
from shared.manifest import Manifest, derive_chunk_id, sign_fields
from shared.queue import publish
from shared.uploader import content_md5


class NotReplicated(RedisError):
    """XADD ran, but fewer than EDGE_REDIS_MIN_REPLICAS replicas acknowledged it within
    EDGE_REDIS_MIN_REPLICAS_TIMEOUT_S: a failover now could lose it, so the manifest is
    not announced yet. A RedisError: delivery retries it like any Redis failure (the entry
    may then be in the stream twice; the cloud acknowledges the copy without redoing work)."""

    def __init__(self, entry_id: bytes, acked: int, wanted: int) -> None:
        super().__init__(f"entry {entry_id.decode()} reached {acked} of {wanted} replicas")
        self.entry_id, self.acked, self.wanted = entry_id, acked, wanted


# A chunk that starts within this much of where the previous one ended is contiguous.
CONTIGUITY_TOLERANCE_S = 0.5


def gap_before(chunk: ClosedChunk, prev: Position) -> float | None:
    """Seconds missing before this chunk, or None when it is contiguous (or the first)."""
    wall = None if prev.wall_end is None else (chunk.wall_start - prev.wall_end).total_seconds()
    if chunk.session_start:
        # New connection: media clocks restart, so only wall time can measure the gap.
        return None if wall is None else max(0.0, wall)
    if prev.media_end_s is None:
        return None
    media = chunk.media_start_s - prev.media_end_s
    # Within a connection chunks are cut at one instant, so any wall time between them
    # is footage not kept (no disk space). A media jump is the camera's clock: the chunk
    # does not follow on, but the wall time it skipped is in the previous chunk's span.
    wall = max(0.0, wall or 0.0)
    if abs(media) > CONTIGUITY_TOLERANCE_S or wall > CONTIGUITY_TOLERANCE_S:
        return wall
    return None


def gap_cause(chunk: ClosedChunk) -> str:
    """What the gap before ``chunk`` is put down to (a ``GapCause``)."""
    if chunk.cause is not None:
        return chunk.cause
    return "reconnect" if chunk.session_start else "clock_jump"


def build_manifest(
    settings: EdgeSettings, chunk: ClosedChunk, seq: int, prev: Position
) -> Manifest:
    gap = gap_before(chunk, prev)
    v2 = settings.manifest_schema_version >= 2
    return Manifest(
        schema_version=settings.manifest_schema_version,
        chunk_id=derive_chunk_id(settings.device_id, chunk.camera_id, seq, chunk.sha256),
        device_id=settings.device_id,
        site_id=settings.site_id,
        camera_id=chunk.camera_id,
        seq=seq,
        bucket=settings.s3_bucket,
        key=chunk_key(settings.s3_prefix, settings.site_id, chunk.camera_id, chunk.wall_start, seq),
        size_bytes=chunk.size_bytes,
        sha256=chunk.sha256,
        container="mp4",
        codec=chunk.codec,
        width=chunk.width,
        height=chunk.height,
        frame_count=chunk.frame_count,
        keyframe_count=chunk.keyframe_count,
        start_time=chunk.wall_start,
        end_time=chunk.wall_end,
        media_start_s=chunk.media_start_s,
        media_duration_s=max(0.0, chunk.media_end_s - chunk.media_start_s),
        discontinuity=gap is not None,
        gap_before_s=max(0.0, gap or 0.0),
        agent_version=__version__,
        clock_drift_s=chunk.clock_drift_s,
        gap_cause=gap_cause(chunk) if v2 and gap is not None else None,
    )


def with_evictions(manifest: Manifest, gap_s: float, count: int) -> Manifest:
    """Fold chunks evicted just before this one into its gap (derived at announce time):
    the whole gap is then put down to the eviction."""
    if count == 0:
        return manifest
    update: dict[str, Any] = {
        "discontinuity": True,
        "gap_before_s": manifest.gap_before_s + gap_s,
        "evicted_before": count,
    }
    if manifest.schema_version >= 2:
        update["gap_cause"] = "eviction"
    # model_copy does not validate: build it anew so the model's rules still hold.
    return Manifest.model_validate({**manifest.model_dump(), **update})


async def announce(
    client: aioredis.Redis, s3: Any, settings: EdgeSettings, manifest: Manifest
) -> bytes:
    """Sign with the current key (rotation-friendly), store the signed manifest beside the
    chunk (what ``cloud-ingest reconcile`` rebuilds the queue from), then XADD it."""
    fields = sign_fields(manifest, settings.signing_key_id, settings.secret())
    sidecar = json.dumps({k: v.decode() for k, v in fields.items()}, sort_keys=True).encode()
    await s3.put_object(
        Bucket=manifest.bucket,
        Key=manifest_key(manifest.key),
        Body=sidecar,
        ContentMD5=content_md5(sidecar),
        ContentType="application/json",
    )
    if settings.redis_min_replicas == 0:
        return await publish(client, settings.stream, fields)
    return await publish_replicated(
        client,
        settings.stream,
        fields,
        settings.redis_min_replicas,
        settings.redis_min_replicas_timeout_s,
    )


async def publish_replicated(
    client: aioredis.Redis, stream: str, fields: dict[str, bytes], replicas: int, timeout_s: float
) -> bytes:
    """XADD, then WAIT for ``replicas`` replicas on the same connection (a pipeline holds
    one: WAIT counts the writes of its own connection). NotReplicated when fewer answered
    within ``timeout_s``."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.xadd(stream, fields)  # type: ignore[arg-type]
        pipe.execute_command("WAIT", replicas, max(1, round(timeout_s * 1000)))
        entry_id, acked = await pipe.execute()
    if int(acked) < replicas:
        raise NotReplicated(bytes(entry_id), int(acked), replicas)
    return bytes(entry_id)
