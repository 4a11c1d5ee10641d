"""Scene windows: which views of a site cover each fixed window of ``INGEST_WINDOW_S``.

Every processed chunk (accepted or rejected by a content filter: a static view is still a
view of the scene) is noted in every window its time overlaps, on the edge's wall clock.
A window is complete when each expected camera (``INGEST_SITE_CAMERAS``) is accounted
for over all of it: by chunks, or by a gap its edge declared (``gap_before_s``). It
closes then, or ``INGEST_WINDOW_TIMEOUT_S`` after its end. Closing is one script: it
checks the window is still open and unchanged since its document was built, takes it
out of the open index and adds the document to ``{stream}:windows`` together, so a
consumer killed at any point loses nothing and publishes nothing twice.

A chunk that arrives for a closed window reopens it: the next close publishes revision
n + 1 (``supersedes`` revision n). The last closed revision and its notes are kept in
S3 (``window_state_key``), where they do not expire under the window: the Redis hash
lives a day after its close, and a backfill after that starts a fresh hash that the
close merges with the state from S3.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import structlog

from cloud_ingest.config import IngestSettings
from cloud_ingest.objects import get_json
from cloud_ingest.totals import Tally, windows_closed
from shared.keys import (
    OPEN_WINDOWS,
    handoff_stream,
    revision_id,
    site_gaps_key,
    window_id,
    window_key,
    window_mcap_key,
    window_state_key,
)
from shared.manifest import Manifest

log = structlog.get_logger("cloud_ingest")

OPEN_TTL_S = 7 * 86400  # an open window's hash (it closes within its timeout)
CLOSED_TTL_S = 86400  # a closed one's: later revisions merge with the state in S3
# Seconds of a camera's window left unexplained that still count as accounted for. On
# the edge a chunk ends at the wall time its successor starts, so only rounding is left:
# anything larger would close a window before its last fraction of a second arrived.
TOLERANCE_S = 0.05
MAX_WINDOWS_PER_CHUNK = 64  # a chunk (a gap) spanning more is noted in the first (last) 64
MAX_STATE_BYTES = 64 * 1024**2
RETRY_CLOSE_S = 30.0  # a window whose close failed is tried again this much later
NOTE_PREFIX = "c:"

# KEYS: the window's hash, the open index. ARGV: field, note, site, start, deadline, ttl,
# a fresh token that names this hash if it is new (``born``: which hash a state is of).
# A note seen before (a chunk processed again after a crash) changes nothing; a new one
# bumps the generation and (re)opens the window: a closed window's next revision.
NOTE_SCRIPT = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return 0 end
redis.call('HSETNX', KEYS[1], 'born', ARGV[7])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], 'site', ARGV[3], 'start', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('ZADD', KEYS[2], 'NX', ARGV[5], KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[6])
return 1
"""
# KEYS: the window's hash. Bump the generation of a hash that still exists (not one that
# expired meanwhile: that would leave a hash of its generation alone, without a TTL).
BUMP_SCRIPT = """
if redis.call('HEXISTS', KEYS[1], 'start') == 1 then
  return redis.call('HINCRBY', KEYS[1], 'gen', 1)
end
return 0
"""
# KEYS: the open index, the windows stream, the window's hash. ARGV: the generation and
# the hash's token (``born``) the document was built from, its revision, the document
# ('': nothing new, close without publishing), the closed hash's ttl, then the last
# revision's notes (from S3) to seed a fresh hash with. 0: closed by someone else; -1:
# changed meanwhile (a note, or a new hash after this one expired), build it again.
CLOSE_SCRIPT = """
if not redis.call('ZSCORE', KEYS[1], KEYS[3]) then return 0 end
if (redis.call('HGET', KEYS[3], 'gen') or '0') ~= ARGV[1] then return -1 end
if (redis.call('HGET', KEYS[3], 'born') or '') ~= ARGV[2] then return -1 end
for i = 6, #ARGV, 2 do redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 1]) end
redis.call('ZREM', KEYS[1], KEYS[3])
redis.call('HSET', KEYS[3], 'rev', ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[5])
if ARGV[4] ~= '' then redis.call('XADD', KEYS[2], '*', 'window', ARGV[4]) end
return 1
"""

Interval = tuple[float, float]


def test_hook(hook: str | None, point: str) -> None:
    """``INGEST_TEST_HOOK=point@marker`` parks the whole process at ``point`` once (until
    ``marker`` exists; blocking on purpose), so a fault test can SIGKILL it exactly there.
    Never set in production."""
    if hook is None:
        return
    name, _, marker = hook.partition("@")
    if name != point or (marker and os.path.exists(marker)):
        return
    if marker:
        Path(marker).touch()
    log.warning("test_hook.parked", point=point, pid=os.getpid())
    time.sleep(3600)


# -- accounting ----------------------------------------------------------------------


def union(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def subtract(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """``a`` minus ``b`` (both unions)."""
    out: list[Interval] = []
    for start, end in a:
        cursor = start
        for b_start, b_end in b:
            if b_end <= cursor or b_start >= end:
                continue
            if b_start > cursor:
                out.append((cursor, b_start))
            cursor = max(cursor, b_end)
        if cursor < end:
            out.append((cursor, end))
    return out


def measure(intervals: list[Interval]) -> float:
    return sum(end - start for start, end in intervals)


def account(
    start: float, end: float, notes: list[dict[str, Any]], gaps: list[Interval]
) -> dict[str, Any]:
    """One camera's seconds of the window: accepted, rejected (by a filter; still a view),
    declared gap, unexplained; each second in exactly one of them."""

    def clip(spans: list[Interval]) -> list[Interval]:
        return union([(max(s, start), min(e, end)) for s, e in spans])

    accepted = clip([(n["start"], n["end"]) for n in notes if n["verdict"] == "accepted"])
    rejected = subtract(
        clip([(n["start"], n["end"]) for n in notes if n["verdict"] != "accepted"]), accepted
    )
    footage = union(accepted + rejected)
    gap = subtract(clip(gaps), footage)
    unexplained = (end - start) - measure(union(footage + gap))
    drifts = [float(n["clock_drift_s"]) for n in notes]
    return {
        "accepted_s": round(measure(accepted), 3),
        "rejected_s": round(measure(rejected), 3),
        "gap_s": round(measure(gap), 3),
        "unexplained_s": round(max(0.0, unexplained), 3),
        # Slivers of up to TOLERANCE_S at either end are not noted (Windows.starts).
        "accounted": unexplained <= 2 * TOLERANCE_S,
        "chunks": len(notes),
        "clock_drift_s": {"min": min(drifts), "max": max(drifts)} if drifts else None,
    }


def chunk_note(m: Manifest, verdict: str, shard: str | None, scores: dict[str, Any]) -> str:
    """What a window keeps of a processed chunk: deterministic (the same chunk processed
    again writes the same bytes, which changes nothing)."""
    doc = {
        "chunk_id": m.chunk_id,
        "camera_id": m.camera_id,
        "seq": m.seq,
        "start": m.start_time.timestamp(),
        "end": max(m.end_time.timestamp(), m.start_time.timestamp()),
        "verdict": verdict,
        "key": m.key,
        "size_bytes": m.size_bytes,
        "sha256": m.sha256,
        "shard": shard,
        "codec": m.codec,
        "width": m.width,
        "height": m.height,
        "clock_drift_s": m.clock_drift_s,
        "scores": scores,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)


def window_doc(
    settings: IngestSettings,
    site: str,
    start: int,
    revision: int,
    notes: list[dict[str, Any]],
    gaps: dict[str, list[Interval]],
) -> dict[str, Any]:
    """The closed window's document (contract fields first)."""
    end = start + settings.window_s
    expected = settings.site_cameras.get(site, [])
    by_camera: dict[str, list[dict[str, Any]]] = {}
    for note in notes:
        by_camera.setdefault(note["camera_id"], []).append(note)
    for items in by_camera.values():
        items.sort(key=lambda n: (n["start"], n["seq"]))
    names = sorted(set(by_camera) | set(expected))
    cameras = []
    for camera in names:
        seconds = account(start, end, by_camera.get(camera, []), gaps.get(camera, []))
        cameras.append({"camera_id": camera, "expected": camera in expected, **seconds})
    complete = bool(expected) and all(c["accounted"] for c in cameras if c["expected"])
    base = window_id(site, start)
    return {
        "window_id": base,
        "revision": revision,
        "revision_id": revision_id(base, revision),
        "supersedes": revision_id(base, revision - 1) if revision > 1 else None,
        "site_id": site,
        "start": start,
        "end": end,
        "closed_because": "complete" if complete else "timeout",
        "mcap_key": window_mcap_key(settings.output_prefix, site, start, revision),
        "cameras": cameras,
        "missing_cameras": sorted(set(expected) - set(by_camera)),
        "chunks": {c: by_camera[c] for c in sorted(by_camera)},
        "gaps": {
            c: [{"start": s, "end": e} for s, e in union(v)] for c, v in sorted(gaps.items()) if v
        },
    }


# -- Redis and S3 --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prior:
    """The last closed revision of a window, from S3."""

    revision: int
    notes: dict[str, str]
    born: str  # the hash it was saved from


class Windows:
    """Notes processed chunks into their windows and closes windows; one per consumer."""

    def __init__(
        self, settings: IngestSettings, redis: aioredis.Redis, s3: Any, tally: Tally | None = None
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.s3 = s3
        self.tally = tally or Tally()

    def starts(self, begin: float, end: float, *, latest: bool = False) -> list[int]:
        """The windows [begin, end) overlaps by more than the tolerance (a chunk that
        ends 10 ms into the next window would only reopen it), else the one it begins
        in; at most MAX_WINDOWS_PER_CHUNK of them, the first (or the ``latest``)."""
        size = self.settings.window_s
        first = int(math.floor((begin + TOLERANCE_S) / size) * size)
        last = int(math.floor((end - TOLERANCE_S) / size) * size)
        span = (MAX_WINDOWS_PER_CHUNK - 1) * size
        first, last = (
            (max(first, last - span), last) if latest else (first, min(last, first + span))
        )
        out = [
            ws
            for ws in range(first, last + size, size)
            if min(end, ws + size) - max(begin, ws) > TOLERANCE_S
        ]
        return out or [int(math.floor(begin / size) * size)]

    async def note(
        self, m: Manifest, verdict: str, shard: str | None, scores: dict[str, Any]
    ) -> None:
        """Count a processed chunk (and the gap its edge declared before it) towards every
        window it overlaps; close those it completes."""
        note = chunk_note(m, verdict, shard, scores)
        begin, end = m.start_time.timestamp(), max(m.end_time.timestamp(), m.start_time.timestamp())
        touched = self.starts(begin, end)
        for start in touched:
            deadline = max(start + self.settings.window_s, time.time())
            deadline += self.settings.window_timeout_s
            await self.redis.eval(
                NOTE_SCRIPT,
                2,
                window_key(m.site_id, start),
                OPEN_WINDOWS,
                f"{NOTE_PREFIX}{m.camera_id}:{m.chunk_id}",
                note,
                m.site_id,
                str(start),
                str(deadline),
                str(OPEN_TTL_S),
                uuid.uuid4().hex,
            )
        if m.discontinuity and m.gap_before_s > 0:
            gap_windows = await self._note_gap(m, begin - m.gap_before_s, begin)
            touched = sorted(set(touched) | set(gap_windows))
        for start in touched:
            key = window_key(m.site_id, start)
            try:
                await self.settle(key, due=False)
            except Exception as exc:  # the window's (its state in S3): not the chunk's
                log.warning("window.settle_failed", window=key, error=repr(exc)[:300])

    async def _note_gap(self, m: Manifest, begin: float, end: float) -> list[int]:
        key = site_gaps_key(m.site_id)
        member = f"{m.camera_id}\t{begin!r}\t{end!r}\t{m.chunk_id}"
        keep = self.settings.max_manifest_age_s + 86400
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {member: end})
            pipe.zremrangebyscore(key, "-inf", time.time() - keep)
            pipe.expire(key, int(keep))
            await pipe.execute()
        starts = self.starts(begin, end, latest=True)  # those next to the footage's return
        open_now: Any = await self.redis.zmscore(
            OPEN_WINDOWS, [window_key(m.site_id, s) for s in starts]
        )
        touched = [s for s, score in zip(starts, open_now, strict=True) if score is not None]
        for s in touched:  # a close that read the window before the gap builds it again
            await self.redis.eval(BUMP_SCRIPT, 1, window_key(m.site_id, s))
        return touched

    async def gaps(self, site: str, start: float, end: float) -> dict[str, list[Interval]]:
        """The gaps the site's edges declared that overlap [start, end), per camera."""
        raw: Any = await self.redis.zrangebyscore(site_gaps_key(site), start, "+inf")
        out: dict[str, list[Interval]] = {}
        for member in raw:
            camera, begin, finish, _ = member.decode().split("\t")
            if float(begin) < end:
                out.setdefault(camera, []).append((float(begin), float(finish)))
        return out

    async def close_due(self) -> int:
        due: Any = await self.redis.zrangebyscore(
            OPEN_WINDOWS, "-inf", time.time(), start=0, num=20
        )
        closed = 0
        for raw in due:
            key = raw.decode()
            try:
                closed += int(await self.settle(key, due=True))
            except Exception as exc:  # this window's (its state in S3, say): not the others'
                self.tally.inc("window_close_failures")
                log.warning("window.close_failed", window=key, error=repr(exc)[:300])
                retry_at = time.time() + RETRY_CLOSE_S
                await self.redis.zadd(OPEN_WINDOWS, {key: retry_at}, xx=True, gt=True)
        return closed

    async def settle(self, key: str, *, due: bool) -> bool:
        """Close the window if it is complete, or ``due`` (past its deadline). True if
        this call published a revision."""
        for _ in range(3):  # rebuilt when a note lands between reading and closing
            fields: Any = await self.redis.hgetall(key)
            if b"start" not in fields:  # expired unclosed (7 days open): nothing to hand off
                if await self.redis.zrem(OPEN_WINDOWS, key):
                    self.tally.inc("windows_expired")
                    log.error("window.expired_unclosed", window=key)
                return False
            if await self.redis.zscore(OPEN_WINDOWS, key) is None:
                return False  # closed already, not reopened since
            result = await self._close(key, fields, due)
            if result is not None:
                return result
        return False

    async def _close(self, key: str, fields: dict[bytes, bytes], due: bool) -> bool | None:
        """One attempt; None when the window changed meanwhile."""
        site, start = fields[b"site"].decode(), int(fields[b"start"])
        notes = {
            k.decode(): v.decode() for k, v in fields.items() if k.startswith(NOTE_PREFIX.encode())
        }
        revision = int(fields.get(b"rev", 0))
        if revision and not due:
            return False  # reopened by late footage: one revision per timeout, not per chunk
        gaps = await self.gaps(site, start, start + self.settings.window_s)
        doc = self._doc(site, start, revision + 1, notes, gaps)
        if not due and doc["closed_because"] != "complete":
            return False
        seed: dict[str, str] = {}
        new = True
        born = fields.get(b"born", b"").decode()
        prior = await self._prior(site, start) if revision == 0 else None
        if prior is not None:  # an earlier hash closed, or this one tried to
            if born and prior.born == born:  # saved ahead by this hash's failed close
                new, revision = True, prior.revision - 1
            else:  # a fresh hash after an earlier one closed and expired
                if not due:
                    return False  # late footage: one revision per timeout, as above
                new = any(prior.notes.get(k) != v for k, v in notes.items())
                revision = prior.revision
            seed = {k: v for k, v in prior.notes.items() if k not in notes}
            notes = {**prior.notes, **notes}
            doc = self._doc(site, start, revision + 1, notes, gaps)
        if new:
            revision += 1
            await self._save_state(site, start, revision, notes, born)
        test_hook(self.settings.test_hook, "window.before_close")
        closed: Any = await self.redis.eval(
            CLOSE_SCRIPT,
            3,
            OPEN_WINDOWS,
            handoff_stream(self.settings.stream),
            key,
            fields.get(b"gen", b"0"),
            born,
            str(revision),
            json.dumps(doc, allow_nan=False) if new else "",
            str(CLOSED_TTL_S),
            *[x for pair in sorted(seed.items()) for x in pair],
        )
        if int(closed) == -1:
            return None
        if int(closed) == 1 and new:
            test_hook(self.settings.test_hook, "window.after_close")
            # Again: a closer that lost the race may have saved its (older) state last.
            await self._save_state(site, start, revision, notes, born)
            self._count(doc)
            return True
        return False

    def _doc(
        self, site: str, start: int, revision: int, notes: dict[str, str], gaps: Any
    ) -> dict[str, Any]:
        parsed = [json.loads(v) for v in notes.values()]
        return window_doc(self.settings, site, start, revision, parsed, gaps)

    async def _prior(self, site: str, start: int) -> Prior | None:
        key = window_state_key(self.settings.output_prefix, site, start)
        state = await get_json(self.s3, self.settings.output_bucket, key, MAX_STATE_BYTES)
        if state is None:
            return None
        return Prior(int(state["revision"]), dict(state["notes"]), str(state.get("born", "")))

    async def _save_state(
        self, site: str, start: int, revision: int, notes: dict[str, str], born: str
    ) -> None:
        """Before the close: the state is never behind what was published. A close that
        then does not happen leaves a state one revision ahead, which names the hash it
        came from (``born``): that hash's next close overwrites it, and only a later hash
        (after this one expired) takes its revision as the last one."""
        body = json.dumps(
            {
                "window_id": window_id(site, start),
                "revision": revision,
                "revision_id": revision_id(window_id(site, start), revision),
                "notes": notes,
                "born": born,
            },
            sort_keys=True,
        ).encode()
        await self.s3.put_object(
            Bucket=self.settings.output_bucket,
            Key=window_state_key(self.settings.output_prefix, site, start),
            Body=body,
            ContentType="application/json",
        )

    def _count(self, doc: dict[str, Any]) -> None:
        self.tally.inc(f"windows_{doc['closed_because']}")
        self.tally.inc(windows_closed(doc["site_id"], doc["closed_because"]))
        if doc["revision"] > 1:
            self.tally.inc("window_revisions")
        log.info(
            "window.closed",
            window_id=doc["window_id"],
            revision=doc["revision"],
            closed_because=doc["closed_because"],
            cameras={c["camera_id"]: c["unexplained_s"] for c in doc["cameras"]},
            missing=doc["missing_cameras"],
            mcap_key=doc["mcap_key"],
        )
