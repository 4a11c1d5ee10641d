"""Operator commands: dead letters (list / requeue / purge) and reconcile.

``reconcile`` treats the bucket as the source of truth: every raw chunk has its
signed manifest beside it (``{key}.manifest.json``); any chunk whose done record
is missing is announced again, verbatim, so it is verified like any other entry.
Re-enqueueing something already queued is harmless: processing is idempotent.
The listing is streamed page by page and the per-chunk work (sidecar GET, record
HEAD, XADD) runs at most ``concurrency`` at a time, so memory does not grow with
the bucket. A chunk whose lookup fails (a sidecar deleted between the listing and
its GET, a refusal, Redis refusing the XADD) is counted in ``errors``, with a few
examples, and the rest goes on: the report is always printed, and the command
exits non-zero when anything failed.

Replayed entries (reconcile, requeue) carry a replay tag (``shared.manifest.tag_replay``)
minted with the cloud's own replay key (INGEST_REPLAY_KEY) or, without one, with the
manifest's own key: the consumer accepts it in place of the start-time age check, so
footage of any age can be replayed. The age check is there against replays by someone
who can XADD but holds no signing key; such a party cannot mint the tag. Without a
replay key, a device's own key can tag (and so backdate) that device's manifests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from cloud_ingest.objects import SizeError, get_bounded
from shared.keys import MANIFEST_SUFFIX, dlq_stream, record_key
from shared.manifest import (
    MAX_MANIFEST_BYTES,
    REPLAY_SIG,
    Keyring,
    Rejected,
    parse_manifest,
    tag_replay,
)
from shared.queue import publish
from shared.s3 import object_exists

# Fields the consumer adds to a dead letter; everything else is the original entry.
LETTER_FIELDS = {
    b"reason",
    b"detail",
    b"source_id",
    b"deliveries",
    b"consumer",
    b"dead_at",
    b"truncated_fields",
}
# A sidecar holds one manifest (at most MAX_MANIFEST_BYTES, JSON-escaped once more) and
# its signature: anything much bigger is not one, and is never read whole.
MAX_SIDECAR_BYTES = 4 * MAX_MANIFEST_BYTES
MAX_ERROR_EXAMPLES = 5  # failed chunks named in a reconcile report


@dataclass(frozen=True, slots=True)
class Letter:
    id: str
    reason: str
    detail: str
    deliveries: int
    original: dict[bytes, bytes]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "reason": self.reason,
            "detail": self.detail,
            "deliveries": self.deliveries,
        }
        try:
            m = parse_manifest(self.original.get(b"manifest", b""))
            out.update(chunk_id=m.chunk_id, camera_id=m.camera_id, seq=m.seq, key=m.key)
        except Rejected:
            pass
        return out


async def letters(
    client: aioredis.Redis, stream: str, page: int = 1000
) -> AsyncIterator[list[Letter]]:
    """Every dead letter there is when the call starts, a page at a time (never the whole
    DLQ in memory, never only its first page). Letters added meanwhile (a requeued entry
    refused again) are left for the next run, so a requeue cannot chase its own tail."""
    dlq = dlq_stream(stream)
    try:
        info: Any = await client.xinfo_stream(dlq)
    except ResponseError:  # no dead letters yet
        return
    last, start = info["last-generated-id"], b"-"
    while True:
        entries: Any = await client.xrange(dlq, min=start, max=last, count=page)
        if not entries:
            return
        yield [_letter(eid, fields) for eid, fields in entries]
        start = b"(" + entries[-1][0]


def _letter(eid: bytes, fields: dict[bytes, bytes]) -> Letter:
    return Letter(
        id=eid.decode(),
        reason=fields.get(b"reason", b"").decode(),
        detail=fields.get(b"detail", b"").decode(errors="replace"),
        deliveries=int(fields.get(b"deliveries", b"0")),
        original={k: v for k, v in fields.items() if k not in LETTER_FIELDS},
    )


def select(items: Iterable[Letter], ids: set[str], reason: str | None) -> list[Letter]:
    return [x for x in items if (not ids or x.id in ids) and (reason is None or x.reason == reason)]


async def requeue(
    client: aioredis.Redis,
    stream: str,
    chosen: list[Letter],
    keyring: Keyring,
    replay_key: bytes | None = None,
) -> int:
    """Put dead letters back on the stream as they were first sent, with a fresh replay tag,
    atomically per letter."""
    for letter in chosen:
        fields = tag_replay(letter.original, keyring, time.time(), replay_key)
        async with client.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, fields)  # type: ignore[arg-type]
            pipe.xdel(dlq_stream(stream), letter.id)
            await pipe.execute()
    return len(chosen)


async def purge(client: aioredis.Redis, stream: str, chosen: list[Letter]) -> int:
    if not chosen:
        return 0
    return int(await client.xdel(dlq_stream(stream), *[x.id for x in chosen]))


@dataclass(slots=True)
class ReconcileReport:
    chunks: int = 0
    done: int = 0
    requeued: int = 0
    without_manifest: int = 0
    unreadable_manifest: int = 0
    unknown_key: int = 0  # signed with a key no longer in the keyring: cannot be replayed
    out_of_range: int = 0
    errors: int = 0  # chunks (or the listing) whose lookup or requeue failed
    error_examples: list[str] = field(default_factory=list)  # the first few, with the error

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    def failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        if len(self.error_examples) < MAX_ERROR_EXAMPLES:
            self.error_examples.append(f"{what}: {type(exc).__name__}: {exc}"[:300])


@dataclass(frozen=True, slots=True)
class Reconcile:
    s3: Any
    client: aioredis.Redis
    keyring: Keyring
    raw_bucket: str
    output_bucket: str
    output_prefix: str
    stream: str
    since: datetime | None = None
    until: datetime | None = None
    dry_run: bool = False
    replay_key: bytes | None = None


async def reconcile(
    job: Reconcile, prefix: str, *, page_size: int = 1000, concurrency: int = 16
) -> ReconcileReport:
    """Re-announce every raw chunk under ``prefix`` that has a sidecar and no done record.
    One chunk's failure is counted in the report's ``errors`` and the others go on; a
    listing that fails ends the walk there (counted too), with the report of what was done."""
    report = ReconcileReport()
    try:  # a HEAD's 404 cannot tell a missing record from a missing bucket: ask first
        await job.s3.head_bucket(Bucket=job.output_bucket)
    except Exception as exc:
        report.failed(f"output bucket s3://{job.output_bucket}", exc)
        return report
    slots = asyncio.Semaphore(concurrency)

    async def one(key: str) -> None:
        try:
            await _reconcile_chunk(job, key, report)
        except Exception as exc:  # S3, Redis, a sidecar gone since the listing: this chunk's
            report.failed(key, exc)
        finally:
            slots.release()

    async with asyncio.TaskGroup() as group:
        try:
            async for key, has_sidecar in _paired(_keys(job.s3, job.raw_bucket, prefix, page_size)):
                report.chunks += 1
                if not has_sidecar:
                    report.without_manifest += 1  # never announced: the edge still owns it
                    continue
                await slots.acquire()  # the listing waits while `concurrency` chunks work
                group.create_task(one(key))
        except Exception as exc:  # the listing itself: nothing more to walk
            report.failed(f"listing s3://{job.raw_bucket}/{prefix}", exc)
    return report


async def _reconcile_chunk(job: Reconcile, key: str, report: ReconcileReport) -> None:
    fields = await _sidecar(job.s3, job.raw_bucket, key)
    if fields is None:
        report.unreadable_manifest += 1
        return
    m = parse_manifest(fields[b"manifest"])
    if (job.since and m.start_time < job.since) or (job.until and m.start_time >= job.until):
        report.out_of_range += 1
        return
    if await object_exists(job.s3, job.output_bucket, record_key(job.output_prefix, m)):
        report.done += 1
        return
    tagged = tag_replay(fields, job.keyring, time.time(), job.replay_key)
    if REPLAY_SIG not in tagged:
        report.unknown_key += 1
        return
    if not job.dry_run:
        await publish(job.client, job.stream, {k.decode(): v for k, v in tagged.items()})
    report.requeued += 1


async def _keys(s3: Any, bucket: str, prefix: str, page_size: int) -> AsyncIterator[str]:
    paginator = s3.get_paginator("list_objects_v2")
    pages = paginator.paginate(
        Bucket=bucket,
        Prefix=prefix.strip("/") + "/" if prefix else "",
        PaginationConfig={"PageSize": page_size},
    )
    async for page in pages:
        for item in page.get("Contents", []):
            yield item["Key"]


async def _paired(keys: AsyncIterator[str]) -> AsyncIterator[tuple[str, bool]]:
    """(chunk key, whether its sidecar exists), from a sorted listing: a sidecar sorts right
    after its chunk, possibly on the next page, so only chunks whose sidecar could still
    come are held."""
    waiting: dict[str, None] = {}
    async for key in keys:
        chunk = key.removesuffix(MANIFEST_SUFFIX)
        if chunk != key and chunk in waiting:
            del waiting[chunk]
            yield chunk, True
            continue
        for passed in [c for c in waiting if c + MANIFEST_SUFFIX < key]:
            del waiting[passed]
            yield passed, False
        if key.endswith(".mp4"):
            waiting[key] = None
    for chunk in waiting:
        yield chunk, False


async def _sidecar(s3: Any, bucket: str, key: str) -> dict[bytes, bytes] | None:
    try:
        raw = await get_bounded(s3, bucket, key + MANIFEST_SUFFIX, MAX_SIDECAR_BYTES)
    except SizeError:
        return None
    try:
        doc = json.loads(raw)
        fields = {k.encode(): str(doc[k]).encode() for k in ("manifest", "key_id", "sig")}
        parse_manifest(fields[b"manifest"])
    except (ValueError, KeyError, TypeError, Rejected):
        return None
    return fields
