"""Operator commands: dead letters (list / requeue / purge) and reconcile.

``reconcile`` treats the bucket as the source of truth: every raw chunk has its
signed manifest beside it (``{key}.manifest.json``); any chunk whose done record
is missing is announced again, verbatim, so it is verified like any other entry.
Re-enqueueing something already queued is harmless: processing is idempotent.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis

from shared.keys import MANIFEST_SUFFIX, dlq_stream, record_key
from shared.manifest import Rejected, parse_manifest
from shared.queue import publish
from shared.s3 import object_exists

# Fields the consumer adds to a dead letter; everything else is the original entry.
LETTER_FIELDS = {b"reason", b"detail", b"source_id", b"deliveries", b"consumer", b"dead_at"}


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


async def letters(client: aioredis.Redis, stream: str, limit: int = 1000) -> list[Letter]:
    out = []
    entries: Any = await client.xrange(dlq_stream(stream), count=limit)
    for eid, fields in entries:
        out.append(
            Letter(
                id=eid.decode(),
                reason=fields.get(b"reason", b"").decode(),
                detail=fields.get(b"detail", b"").decode(errors="replace"),
                deliveries=int(fields.get(b"deliveries", b"0")),
                original={k: v for k, v in fields.items() if k not in LETTER_FIELDS},
            )
        )
    return out


def select(items: Iterable[Letter], ids: set[str], reason: str | None) -> list[Letter]:
    return [x for x in items if (not ids or x.id in ids) and (reason is None or x.reason == reason)]


async def requeue(client: aioredis.Redis, stream: str, chosen: list[Letter]) -> int:
    """Put dead letters back on the stream as they were first sent, atomically per letter."""
    for letter in chosen:
        async with client.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, letter.original)  # type: ignore[arg-type]
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
    out_of_range: int = 0
    requeued_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if k != "requeued_ids"}


async def reconcile(
    s3: Any,
    client: aioredis.Redis,
    *,
    raw_bucket: str,
    prefix: str,
    output_bucket: str,
    output_prefix: str,
    stream: str,
    since: datetime | None = None,
    until: datetime | None = None,
    dry_run: bool = False,
) -> ReconcileReport:
    report = ReconcileReport()
    keys = await _list(s3, raw_bucket, prefix)
    chunks = [k for k in keys if k.endswith(".mp4")]
    sidecars = {k[: -len(MANIFEST_SUFFIX)] for k in keys if k.endswith(MANIFEST_SUFFIX)}
    report.chunks = len(chunks)
    for key in chunks:
        if key not in sidecars:
            report.without_manifest += 1  # never announced: the edge still owns it
            continue
        fields = await _sidecar(s3, raw_bucket, key)
        if fields is None:
            report.unreadable_manifest += 1
            continue
        m = parse_manifest(fields[b"manifest"])
        if (since and m.start_time < since) or (until and m.start_time >= until):
            report.out_of_range += 1
            continue
        if await object_exists(s3, output_bucket, record_key(output_prefix, m)):
            report.done += 1
            continue
        if not dry_run:
            await publish(client, stream, {k.decode(): v for k, v in fields.items()})
        report.requeued += 1
        report.requeued_ids.append(m.chunk_id)
    return report


async def _list(s3: Any, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    paginator = s3.get_paginator("list_objects_v2")
    async for page in paginator.paginate(
        Bucket=bucket, Prefix=prefix.strip("/") + "/" if prefix else ""
    ):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return keys


async def _sidecar(s3: Any, bucket: str, key: str) -> dict[bytes, bytes] | None:
    resp = await s3.get_object(Bucket=bucket, Key=key + MANIFEST_SUFFIX)
    async with resp["Body"] as body:
        raw = await body.read()
    try:
        doc = json.loads(raw)
        fields = {k.encode(): str(doc[k]).encode() for k in ("manifest", "key_id", "sig")}
        parse_manifest(fields[b"manifest"])
    except (ValueError, KeyError, Rejected):
        return None
    return fields


def reasons(items: Iterable[Letter]) -> dict[str, int]:
    return dict(Counter(x.reason for x in items))
