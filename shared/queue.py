"""The reliable queue: a Redis Stream with a consumer group.

Producer side: ``publish`` (XADD, no trimming: only acknowledged entries may go).
Consumer side: batched XREADGROUP, own-pending first, an XAUTOCLAIM reaper with
delivery counts, lease renewal (XCLAIM JUSTID resets idle time without counting
a delivery), and ack/dead-letter that also delete the entry so memory stays bounded.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared.keys import dlq_stream

Fields = dict[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Entry:
    id: bytes
    fields: Fields
    deliveries: int = 1


@dataclass(slots=True)
class ReapCursor:
    position: bytes = b"0-0"
    last_run: float = field(default=0.0)


async def publish(client: aioredis.Redis, stream: str, fields: dict[str, bytes]) -> bytes:
    entry_id: Any = await client.xadd(stream, fields)  # type: ignore[arg-type]
    return bytes(entry_id)


async def ensure_group(client: aioredis.Redis, stream: str, group: str) -> None:
    """Create the consumer group (and the stream) if needed; an existing group is kept."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class GroupConsumer:
    def __init__(self, client: aioredis.Redis, stream: str, group: str, name: str) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.name = name
        self.dlq = dlq_stream(stream)
        self._history: bytes | None = b"0"  # cursor through our own pending entries

    async def read(self, count: int, block_ms: int | None) -> list[Entry]:
        """Own pending entries first (a restarted consumer resumes its work), then new ones
        (waiting up to ``block_ms`` for them; None: not at all)."""
        if self._history is not None:
            entries = await self._xreadgroup(self._history, count, None)
            if entries:
                self._history = entries[-1].id
                return await self._with_deliveries(entries)
            self._history = None
        return await self._xreadgroup(b">", count, block_ms)

    async def _xreadgroup(self, start: bytes, count: int, block_ms: int | None) -> list[Entry]:
        reply: Any = await self.client.xreadgroup(
            self.group, self.name, {self.stream: start}, count=count, block=block_ms
        )
        entries: list[Entry] = []
        for _stream, items in reply or []:
            # A pending entry whose data was deleted comes back with fields None.
            entries.extend(Entry(eid, dict(f or {})) for eid, f in items)
        return entries

    async def claim_stale(self, cursor: ReapCursor, min_idle_ms: int, count: int) -> list[Entry]:
        """XAUTOCLAIM entries idle past the visibility timeout, following the cursor."""
        reply: Any = await self.client.xautoclaim(
            self.stream, self.group, self.name, min_idle_ms, cursor.position, count=count
        )
        cursor.position = reply[0]
        cursor.last_run = time.monotonic()
        claimed = [Entry(eid, dict(f or {})) for eid, f in reply[1] if eid is not None]
        deleted: list[bytes] = list(reply[2]) if len(reply) > 2 else []
        if deleted:  # entries trimmed/deleted while pending: nothing left to process
            await self.client.xack(self.stream, self.group, *deleted)
        return await self._with_deliveries(claimed)

    async def _with_deliveries(self, entries: Sequence[Entry]) -> list[Entry]:
        if not entries:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for e in entries:
                pipe.xpending_range(self.stream, self.group, e.id, e.id, 1)
            replies = await pipe.execute()
        out = []
        for e, rows in zip(entries, replies, strict=True):
            n = int(rows[0]["times_delivered"]) if rows else 1
            out.append(Entry(e.id, e.fields, n))
        return out

    async def renew(self, ids: Sequence[bytes]) -> None:
        """Reset idle time of entries we still work on, so the reaper leaves them alone."""
        if ids:
            await self.client.xclaim(self.stream, self.group, self.name, 0, list(ids), justid=True)

    async def ack(self, ids: Sequence[bytes]) -> None:
        """Acknowledge and delete in one round trip: XACK alone never frees memory."""
        if not ids:
            return
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, *ids)
            pipe.xdel(self.stream, *ids)
            await pipe.execute()

    async def dead_letter(self, entry: Entry, reason: str, detail: str) -> None:
        """Move an entry to ``{stream}:dlq`` with its reason, atomically with the ack."""
        letter: dict[bytes, bytes] = dict(entry.fields)
        letter.update(
            {
                b"reason": reason.encode(),
                b"detail": detail[:2000].encode(),
                b"source_id": entry.id,
                b"deliveries": str(entry.deliveries).encode(),
                b"consumer": self.name.encode(),
                b"dead_at": str(time.time()).encode(),
            }
        )
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dlq, letter)  # type: ignore[arg-type]
            pipe.xack(self.stream, self.group, entry.id)
            pipe.xdel(self.stream, entry.id)
            await pipe.execute()


@dataclass(frozen=True, slots=True)
class QueueStatus:
    length: int
    pending: int
    lag: int | None
    dlq: int
    consumers: list[dict[str, Any]]
    added: int = 0  # entries ever added to the stream (for rates)
    read: int = 0  # entries ever delivered to the group


async def status(client: aioredis.Redis, stream: str, group: str) -> QueueStatus:
    length = await client.xlen(stream)
    dlq = await client.xlen(dlq_stream(stream))
    pending, lag, consumers, added, read = 0, None, [], 0, 0
    try:
        groups = await client.xinfo_groups(stream)
        info: Any = await client.xinfo_stream(stream)
        added = int(info.get("entries-added") or 0)
    except ResponseError:  # no such stream yet
        groups = []
    for g in groups:
        if _text(g["name"]) == group:
            pending, lag = int(g["pending"]), g.get("lag")
            read = int(g.get("entries-read") or 0)
            consumers = [
                {"name": _text(c["name"]), "pending": int(c["pending"]), "idle_ms": int(c["idle"])}
                for c in await client.xinfo_consumers(stream, group)
            ]
    return QueueStatus(
        length, pending, None if lag is None else int(lag), dlq, consumers, added, read
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
