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
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import redis_client
from shared.keys import consumer_totals_key, consumers_key, dlq_stream, flushed_key
from shared.redis_client import RedisConnection

Fields = dict[bytes, bytes]
# A call that failed this way may have run, its reply lost on the way back.
LOST_REPLY = (RedisTimeoutError, RedisConnectionError)

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
# KEYS: stream, the consumer's totals hash, the set of consumers with totals, the consumer's
# last flush token. ARGV: group, me, token, n, m, then n (entry id, its counts) pairs (the
# counts comma-separated), m (count, increment) pairs, then (stage, seconds) pairs.
# Acknowledges and deletes the entries we own and adds each one's own counts only if it was
# ours (an entry the reaper gave to another consumer is theirs to count); the batch's other
# counts are added once per token (a flush sent again after a lost reply is not counted
# twice, nor are its entries, acknowledged by then, taken for leases lost). The token is
# written only after another write (under maxmemory it must not be the script's first).
# XACK/XDEL come first: under maxmemory they still run, and once the script has
# written, so do the increments (Redis refuses only a script's first denyoom write; a
# MULTI/EXEC with an HINCRBY is refused whole). Returns {1} for a token applied before,
# else {0, acknowledged ids...}.
ACK_SCRIPT = (
    _OWNED
    + """
local token, n, m = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
if token ~= '' and redis.call('GET', KEYS[4]) == token then return {1} end
local acked, counted = {0}, false
local counts = 6 + 2 * n
for i = 6, counts - 1, 2 do
  if owned(ARGV[i]) then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    redis.call('XDEL', KEYS[1], ARGV[i])
    acked[#acked + 1] = ARGV[i]
    for item in string.gmatch(ARGV[i + 1], '[^,]+') do
      local name, by = string.match(item, '^(.-)=(%d+)$')
      redis.call('HINCRBY', KEYS[2], 'count:' .. (name or item), by or 1)
      counted = true
    end
  end
end
local seconds = counts + 2 * m
for i = counts, seconds - 1, 2 do
  redis.call('HINCRBY', KEYS[2], 'count:' .. ARGV[i], ARGV[i + 1])
end
for i = seconds, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[2], 'seconds:' .. ARGV[i], ARGV[i + 1])
end
local extra = seconds > counts or #ARGV >= seconds
if extra then counted = true end
if token ~= '' and (extra or #acked > 1) then redis.call('SET', KEYS[4], token) end
if counted then redis.call('SADD', KEYS[3], ARGV[2]) end
return acked
"""
)
# KEYS: stream, dlq, the consumer's totals hash, the set of consumers with totals.
# ARGV: group, me, id, reason, then the letter's field/value pairs. The letter is counted
# by the script that moves it (dead_lettered, rejected_<reason>): never lost to a lost
# reply, never counted by a consumer whose entry it no longer was. XADD comes first: when
# Redis refuses it (maxmemory), nothing has been deleted.
DEAD_LETTER_SCRIPT = (
    _OWNED
    + """
if not owned(ARGV[3]) then return 0 end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
redis.call('HINCRBY', KEYS[3], 'count:dead_lettered', 1)
redis.call('HINCRBY', KEYS[3], 'count:rejected_' .. ARGV[4], 1)
redis.call('SADD', KEYS[4], ARGV[2])
return 1
"""
)


@dataclass(frozen=True, slots=True)
class Entry:
    id: bytes
    fields: Fields
    deliveries: int = 1


@dataclass(slots=True)
class Acks:
    """One flush of acknowledgements and counts (``GroupConsumer.ack``).

    ``entries``: entry id -> the counts its acknowledgement brings (added only if the entry
    was still ours; ``name`` adds 1, ``name=N`` adds N); ``counts`` and ``seconds``: added
    once per ``token`` (empty: no counts). After ``ack``: ``acked``, the ids acknowledged;
    ``applied_before``, the token had been applied already (a flush sent again after its
    reply was lost)."""

    entries: dict[bytes, tuple[str, ...]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    token: str = ""
    acked: list[bytes] = field(default_factory=list)
    applied_before: bool = False

    def __bool__(self) -> bool:
        return bool(self.entries or self.counts or self.seconds)


@dataclass(slots=True)
class ReapCursor:
    position: bytes = b"0-0"
    last_run: float = field(default=0.0)


async def publish(client: aioredis.Redis, stream: str, fields: dict[str, bytes]) -> bytes:
    entry_id: Any = await client.xadd(stream, fields)  # type: ignore[arg-type]
    return bytes(entry_id)


async def ensure_group(client: aioredis.Redis, stream: str, group: str) -> bool:
    """Create the consumer group (and the stream) if needed, reading from the stream's start
    (id 0: entries added before it existed are delivered too); an existing group is kept.
    True if it was created."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return False
    return True


def is_lost_group(exc: BaseException) -> bool:
    """The stream or its consumer group is gone (a Redis restarted without persistence,
    FLUSHALL, XGROUP DESTROY): every group command fails with NOGROUP until it is created
    again."""
    return isinstance(exc, ResponseError) and "NOGROUP" in str(exc)


def connect(target: str | RedisConnection, timeout_s: float) -> aioredis.Redis:
    """A client of the queue's Redis: ``target`` is a daemon's settings (``REDIS_URL``,
    ``REDIS_PASSWORD``, sentinels: see ``shared.redis_client``) or a plain URL. Every read
    and connect is bounded by ``timeout_s`` (above the longest XREADGROUP block or WAIT),
    TCP keepalive is on, an idle connection is checked before reuse, and a command whose
    connection broke or timed out raises and is never re-sent blindly (a re-sent XREADGROUP
    or XAUTOCLAIM after a lost reply would leave entries in our pending list unseen, a
    re-sent XADD would publish twice): our own loops retry, knowing what a lost reply may
    have done (``GroupConsumer`` re-reads its own pending entries)."""
    if isinstance(target, str):
        return redis_client.connect(target, timeout_s)
    return redis_client.redis_client(target, timeout_s)


class GroupConsumer:
    def __init__(self, client: aioredis.Redis, stream: str, group: str, name: str) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.name = name
        self.dlq = dlq_stream(stream)
        self._history: bytes | None = b"0"  # cursor through our own pending entries
        # When a read or claim whose reply never came was sent: it may have given us entries.
        self._unseen_since: float | None = None

    async def read(
        self, count: int, block_ms: int | None, *, working: Collection[bytes] = ()
    ) -> list[Entry]:
        """Own pending entries first (a restarted consumer resumes its work), then new ones
        (waiting up to ``block_ms`` for them; None: not at all). After a read or a claim
        whose reply never came, our pending entries other than those we are ``working``
        on come first: that reply delivered them."""
        if self._history is not None:
            entries = await self._xreadgroup(self._history, count, None)
            if entries:
                self._history = entries[-1].id
                return await self._with_deliveries(entries)
            self._history = None
        if self._unseen_since is not None:
            unseen = await self._pending_unseen(count, working, self._unseen_since)
            self._unseen_since = None
            if unseen:
                return unseen
        sent = time.monotonic()
        try:
            return await self._xreadgroup(b">", count, block_ms)
        except LOST_REPLY:
            self._unseen_since = sent
            raise

    async def _pending_unseen(
        self, count: int, working: Collection[bytes], since: float
    ) -> list[Entry]:
        """Our pending entries delivered since ``since`` that we are not working on, read
        without counting a delivery (XPENDING and XRANGE: XREADGROUP of our own history
        would count one more for every entry, those at work too). Older ones (given back,
        or waiting for the reaper after a failed attempt) are left as they are."""
        rows: Any = await self.client.xpending_range(
            self.stream, self.group, "-", "+", count + len(working), consumername=self.name
        )
        window_ms = (time.monotonic() - since) * 1000 + 1000  # plus Redis's clock's slack
        found: list[Entry] = []
        for row in rows:
            entry_id = bytes(row["message_id"])
            if entry_id in working or row["time_since_delivered"] > window_ms:
                continue
            items: Any = await self.client.xrange(self.stream, entry_id, entry_id)
            fields = dict(items[0][1] or {}) if items else {}
            found.append(Entry(entry_id, fields, int(row["times_delivered"])))
            if len(found) == count:
                break
        return found

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
        """XAUTOCLAIM entries idle past the visibility timeout, following the cursor. When
        it fails, what it may have claimed is found among our own pending entries."""
        sent = time.monotonic()
        try:
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
        except LOST_REPLY:
            self._unseen_since = sent
            raise

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

    async def ack(self, acks: Sequence[bytes] | Acks) -> int:
        """Acknowledge and delete in one round trip (XACK alone never frees memory), only
        the entries we own, and add to this consumer's totals what ``acks`` carries (see
        ACK_SCRIPT). Returns how many were acknowledged now; an ``Acks`` also says which."""
        batch = acks if isinstance(acks, Acks) else Acks(dict.fromkeys(acks, ()))
        if not batch:
            return 0
        if any(b"," in name.encode() for names in batch.entries.values() for name in names):
            raise ValueError("a count's name may not contain a comma")
        args: list[bytes | str] = [
            self.group,
            self.name,
            batch.token,
            str(len(batch.entries)),
            str(len(batch.counts)),
        ]
        for entry_id, names in batch.entries.items():
            args += [entry_id, ",".join(names)]
        for name, n in batch.counts.items():
            args += [name, str(n)]
        for stage, seconds in batch.seconds.items():
            args += [stage, repr(float(seconds))]
        reply: Any = await self.client.eval(ACK_SCRIPT, 4, *self._totals_keys(), *args)
        batch.applied_before = int(reply[0]) == 1
        batch.acked = [bytes(x) for x in reply[1:]]
        return len(batch.acked)

    def _totals_keys(self) -> tuple[str, str, str, str]:
        return (
            self.stream,
            consumer_totals_key(self.group, self.name),
            consumers_key(self.group),
            flushed_key(self.group, self.name),
        )

    async def dead_letter(self, entry: Entry, reason: str, detail: str) -> bool:
        """Move an entry to ``{stream}:dlq`` with its reason, atomically with the ack, and
        count it in this consumer's totals. False when the entry is no longer ours (its new
        owner decides what becomes of it)."""
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
            DEAD_LETTER_SCRIPT,
            4,
            self.stream,
            self.dlq,
            consumer_totals_key(self.group, self.name),
            consumers_key(self.group),
            self.group,
            self.name,
            entry.id,
            reason,
            *pairs,
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
