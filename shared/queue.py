"""The reliable queue: a Redis Stream with a consumer group.

Producer side: ``publish`` (XADD, no trimming: only acknowledged entries may go).
Consumer side: batched XREADGROUP, own-pending first, an XAUTOCLAIM reaper with
delivery counts, lease renewal (XCLAIM JUSTID resets idle time without counting
a delivery), and ack/dead-letter that also delete the entry so memory stays bounded.

XACK and XCLAIM do not check who owns an entry. Every consumer-side write that must
only touch this consumer's own entries (renew, release, ack, dead-letter) is a Lua
script that looks the owner up with XPENDING first: an entry the reaper handed to
another consumer is never taken back, acknowledged or dead-lettered under it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared.keys import dlq_stream

Fields = dict[bytes, bytes]

# A dead letter keeps the entry's own fields (for requeue), up to this many.
MAX_LETTER_FIELDS = 64
# Released entries look idle this long (ms), so any consumer's reaper takes them at once.
RELEASE_IDLE_MS = 10 * 365 * 86400 * 1000

# The owner of pending entry ``id`` is ARGV[2] (``me``)?
_OWNED = """
local function owned(id)
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)[1]
  return row ~= nil and row[2] == ARGV[2]
end
"""
# ARGV: group, me, lock ttl ms, n, n entry ids, then one holder per lock key (KEYS[2..]).
# Resets the idle time of the entries we still own; renews each lock only while it still
# holds our value ("{entry id}/{consumer}"). Returns the ids that are no longer ours.
RENEW_SCRIPT = (
    _OWNED
    + """
local n, lost, gone = tonumber(ARGV[4]), {}, {}
for i = 1, n do
  local id = ARGV[4 + i]
  if owned(id) then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
  else
    lost[#lost + 1] = id
    gone[id] = true
  end
end
for j = 2, #KEYS do
  local holder = ARGV[3 + n + j]
  if not gone[string.match(holder, '^[^/]+')] and redis.call('GET', KEYS[j]) == holder then
    redis.call('PEXPIRE', KEYS[j], ARGV[3])
  end
end
return lost
"""
)
# ARGV: group, me, idle ms, then (id, retry count) pairs: hand our entries back as if
# their lease had run out long ago, with the delivery count they had before this attempt.
RELEASE_SCRIPT = (
    _OWNED
    + """
local released = 0
for i = 4, #ARGV, 2 do
  if owned(ARGV[i]) then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i],
               'IDLE', ARGV[3], 'RETRYCOUNT', ARGV[i + 1], 'JUSTID')
    released = released + 1
  end
end
return released
"""
)
# ARGV: group, me, ids. Acknowledge and delete the ones we own.
ACK_SCRIPT = (
    _OWNED
    + """
local acked = 0
for i = 3, #ARGV do
  if owned(ARGV[i]) then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
    acked = acked + 1
  end
end
return acked
"""
)
# KEYS: stream, dlq. ARGV: group, me, id, then the letter's field/value pairs.
DEAD_LETTER_SCRIPT = (
    _OWNED
    + """
if not owned(ARGV[3]) then return 0 end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""
)


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

    async def renew(
        self, ids: Sequence[bytes], locks: Mapping[str, str] | None = None, lock_ttl_ms: int = 0
    ) -> list[bytes]:
        """Reset the idle time of the entries we still own, so the reaper leaves them alone,
        and renew the chunk ``locks`` (key -> our holder value) they hold. Returns the ids
        that are no longer ours (the reaper gave them to another consumer, or they are gone)."""
        if not ids:
            return []
        locks = locks or {}
        lost: Any = await self.client.eval(
            RENEW_SCRIPT,
            1 + len(locks),
            self.stream,
            *locks.keys(),
            self.group,
            self.name,
            str(lock_ttl_ms),
            str(len(ids)),
            *ids,
            *locks.values(),
        )
        return [bytes(x) for x in lost]

    async def release(self, entries: Sequence[Entry]) -> int:
        """Give entries back without counting this attempt as a delivery: they look idle for
        years (any reaper takes them at once) and keep their previous delivery count."""
        if not entries:
            return 0
        pairs = [x for e in entries for x in (e.id, str(max(0, e.deliveries - 1)).encode())]
        released: Any = await self.client.eval(
            RELEASE_SCRIPT, 1, self.stream, self.group, self.name, str(RELEASE_IDLE_MS), *pairs
        )
        return int(released)

    async def ack(self, ids: Sequence[bytes], *, also: Callable[[Any], None] | None = None) -> int:
        """Acknowledge and delete in one round trip (XACK alone never frees memory), only
        the entries we own. ``also`` queues more commands in the same MULTI/EXEC: applied
        together with the acknowledgements or not at all. Returns how many were ours."""
        async with self.client.pipeline(transaction=True) as pipe:
            if ids:
                pipe.eval(ACK_SCRIPT, 1, self.stream, self.group, self.name, *ids)
            if also is not None:
                also(pipe)
            if not pipe.command_stack:
                return 0
            replies = await pipe.execute()
        return int(replies[0]) if ids else 0

    async def dead_letter(self, entry: Entry, reason: str, detail: str) -> bool:
        """Move an entry to ``{stream}:dlq`` with its reason, atomically with the ack. False
        when the entry is no longer ours (its new owner decides what becomes of it)."""
        letter: dict[bytes, bytes] = dict(list(entry.fields.items())[:MAX_LETTER_FIELDS])
        if len(entry.fields) > MAX_LETTER_FIELDS:
            letter[b"truncated_fields"] = str(len(entry.fields) - MAX_LETTER_FIELDS).encode()
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
        pairs = [x for item in letter.items() for x in item]
        moved: Any = await self.client.eval(
            DEAD_LETTER_SCRIPT, 2, self.stream, self.dlq, self.group, self.name, entry.id, *pairs
        )
        return bool(moved)


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
