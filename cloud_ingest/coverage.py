"""Coverage: what became of every second of every camera's timeline.

The consumer keeps a small index per camera-hour (``Index``): one entry per chunk it
processed or dead-lettered (its wall-clock span, verdict or reason, and the gap its edge
declared before it). Entries land in a Redis hash first and are merged into the hour's
object in S3 (``coverage_index_key``) once the hash has been quiet or old for
``INGEST_COVERAGE_FLUSH_S``.

``audit`` answers for a site and a time range. The signed manifests beside the chunks
are the source of truth: it lists each camera-hour of the raw bucket (a page or two),
takes what the index says of the chunks listed there, and reads the manifest (and the
done record) only of a chunk the index does not know yet. Each second of the range is
then exactly one of: accepted, rejected (by a filter), pending (in the bucket, not yet
processed), gap (declared by the edge, with its cause), dead-lettered, or unexplained:
no chunk and no declaration, the number that must be zero.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis
import structlog
from botocore.exceptions import ClientError

from cloud_ingest.config import IngestSettings
from cloud_ingest.objects import SizeError, get_bounded, get_json
from cloud_ingest.windows import Interval, union
from shared.keys import (
    COVERAGE_DIRTY,
    MANIFEST_SUFFIX,
    camera_owner_key,
    check_location,
    chunk_hour_prefix,
    coverage_hour_key,
    coverage_index_key,
    record_key,
    seq_of_chunk_key,
    site_prefix,
)
from shared.manifest import Manifest, Rejected, verify_fields, wall_span
from shared.s3 import is_not_found

log = structlog.get_logger("cloud_ingest")

MERGE_LOCK_S = 120.0  # a merger's hold on an hour (the merge itself gets half of it)
HOUR_TTL_S = 3 * 86400  # an unmerged camera-hour's hash (merged within minutes normally)
MAX_INDEX_BYTES = 64 * 1024**2
MAX_SIDECAR_BYTES = 64 * 1024
LOOKAHEAD_HOURS = 48  # how far past the range to look for the chunk that declares its end
# Kinds, strongest first: a second two of them claim is the first one's.
KINDS = ("accepted", "rejected", "pending", "dead_lettered", "gap", "unexplained")
PROCESSED = ("accepted", "rejected")

# KEYS: a lock. ARGV: its holder's token. Released by its holder only.
UNLOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: the hour's hash, the dirty set. ARGV: the generation read. Forget the hash and
# its dirty mark only if nothing was noted since it was read (else: merged next time).
SETTLED_SCRIPT = """
if (redis.call('HGET', KEYS[1], '_gen') or '0') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], KEYS[1])
return 1
"""


def hour_of(ts: float) -> datetime:
    return datetime.fromtimestamp(ts - ts % 3600, UTC)


def entry_of(m: Manifest, kind: str, reason: str | None) -> dict[str, Any]:
    """What the index keeps of a chunk."""
    start = m.start_time.timestamp()
    return {
        "chunk_id": m.chunk_id,
        "key": m.key,
        "seq": m.seq,
        "start": start,
        "end": start + wall_span(m),
        "kind": kind,
        "reason": reason,
        "gap_before_s": m.gap_before_s if m.discontinuity else 0.0,
        "gap_cause": gap_cause_of(m),
        "schema_version": m.schema_version,
    }


def gap_cause_of(m: Manifest) -> str | None:
    """The cause its edge gave, or what a version 1 manifest lets us infer."""
    if not m.discontinuity:
        return None
    if m.gap_cause is not None:
        return m.gap_cause
    return "eviction" if m.evicted_before else None


def merge(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Of two entries for one chunk, ``new`` the later: a processed verdict over a dead
    letter (a dead letter requeued and processed), unless the letter is ``forced`` (the
    chunk has no done record: its verdict was noted, its record never written)."""
    if old is None:
        return new
    if old["kind"] in PROCESSED and new["kind"] not in PROCESSED and not new.get("forced"):
        return old
    return new


def valid_entry(e: Any) -> bool:
    """An entry the audit can use (an index object is ours, but S3 is not only ours)."""
    try:
        start, end = float(e["start"]), float(e["end"])
        gap = float(e.get("gap_before_s") or 0.0)
        return (
            e["kind"] in KINDS
            and math.isfinite(start)
            and math.isfinite(end)
            and math.isfinite(gap)
            and gap >= 0
            and isinstance(e["chunk_id"], str)
        )
    except (KeyError, TypeError, ValueError):
        return False


# -- the index, kept by the consumers --------------------------------------------------


class Index:
    def __init__(self, settings: IngestSettings, redis: aioredis.Redis, s3: Any) -> None:
        self.settings = settings
        self.redis = redis
        self.s3 = s3

    async def note(
        self, m: Manifest, kind: str, reason: str | None = None, *, force: bool = False
    ) -> None:
        """Index a chunk processed (``kind`` accepted or rejected) or dead-lettered (over
        an earlier verdict only with ``force``: one whose record was never written)."""
        key = coverage_hour_key(m.site_id, m.camera_id, m.start_time)
        entry = entry_of(m, kind, reason)
        if force:
            entry["forced"] = True
        body = json.dumps(entry, sort_keys=True, allow_nan=False)
        async with self.redis.pipeline(transaction=True) as pipe:
            if kind in PROCESSED or force:
                pipe.hset(key, m.chunk_id, body)
            else:  # never over a verdict (a late copy of a chunk processed meanwhile)
                pipe.hsetnx(key, m.chunk_id, body)
            pipe.hincrby(key, "_gen", 1)
            pipe.expire(key, HOUR_TTL_S)
            pipe.zadd(COVERAGE_DIRTY, {key: time.time()}, nx=True)
            await pipe.execute()

    async def flush(self, limit: int = 20) -> tuple[int, int]:
        """Merge camera-hours noted at least INGEST_COVERAGE_FLUSH_S ago into S3: (merged,
        failed). An hour that fails is tried again a flush period later, behind the others."""
        due: Any = await self.redis.zrangebyscore(
            COVERAGE_DIRTY, "-inf", time.time() - self.settings.coverage_flush_s, 0, limit
        )
        merged = failed = 0
        for raw in due:
            key = raw.decode()
            lock, token = f"ingest:lock:{key}", uuid.uuid4().hex
            # One merger per hour at a time: two would each write what they read, and
            # the older read could land last. The merge is bounded well within the lock.
            if not await self.redis.set(lock, token, nx=True, px=int(MERGE_LOCK_S * 1000)):
                continue
            try:
                async with asyncio.timeout(MERGE_LOCK_S / 2):
                    merged += await self._merge(key)
            except Exception as exc:  # this hour's (a refusal, a bad object): not the others'
                failed += 1
                log.warning("coverage.merge_failed", hour=key, error=repr(exc)[:300])
                await self.redis.zadd(COVERAGE_DIRTY, {key: time.time()}, xx=True)
            finally:
                await self.redis.eval(UNLOCK_SCRIPT, 1, lock, token)
        return merged, failed

    async def _merge(self, key: str) -> int:
        _, _, site, camera, stamp = key.split(":")
        hour = datetime.strptime(stamp, "%Y%m%d%H").replace(tzinfo=UTC)
        fields: Any = await self.redis.hgetall(key)
        gen = fields.pop(b"_gen", b"0").decode()
        if not fields:  # expired meanwhile (or merged by a consumer before a crash)
            await self.redis.eval(SETTLED_SCRIPT, 2, key, COVERAGE_DIRTY, gen)
            return 0
        okey = coverage_index_key(self.settings.output_prefix, site, camera, hour)
        entries = await read_index(self.s3, self.settings.output_bucket, okey)

        def build() -> bytes:  # an hour of a camera is thousands of entries: off the loop
            for value in fields.values():
                new = json.loads(value)
                if valid_entry(new):
                    entries[new["chunk_id"]] = merge(entries.get(new["chunk_id"]), new)
            doc = {"site_id": site, "camera_id": camera, "hour": hour.isoformat()}
            return json.dumps({**doc, "entries": entries}, sort_keys=True).encode()

        body = await asyncio.to_thread(build)
        await self.s3.put_object(
            Bucket=self.settings.output_bucket,
            Key=okey,
            Body=body,
            ContentType="application/json",
        )
        await self.redis.eval(SETTLED_SCRIPT, 2, key, COVERAGE_DIRTY, gen)
        return 1


async def read_index(s3: Any, bucket: str, key: str) -> dict[str, dict[str, Any]]:
    """A camera-hour's index entries by chunk id; {} for none, or for an object that is
    not an index (logged): the audit then reads the hour's manifests instead, and the
    next merge writes the hour anew from what it has. Entries it cannot use are dropped."""
    try:
        raw = await get_bounded(s3, bucket, key, MAX_INDEX_BYTES)
    except ClientError as exc:
        if is_not_found(exc):
            return {}
        raise
    except SizeError as exc:
        log.error("coverage.bad_index", key=key, error=str(exc)[:200])
        return {}
    try:
        doc = await asyncio.to_thread(json.loads, raw)
        entries = {str(k): v for k, v in doc["entries"].items()}
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        log.error("coverage.bad_index", key=key, error=repr(exc)[:200])
        return {}
    good = {k: v for k, v in entries.items() if valid_entry(v)}
    if len(good) < len(entries):
        log.error("coverage.bad_index_entries", key=key, dropped=len(entries) - len(good))
    return good


# -- the audit --------------------------------------------------------------------------


@dataclass(slots=True)
class Timeline:
    """One camera's spans, by (kind, cause or reason), as unions kept small as they grow."""

    spans: dict[tuple[str, str | None], list[Interval]] = field(default_factory=dict)
    chunks: int = 0
    from_index: int = 0
    from_manifests: int = 0
    unverified: int = 0  # manifests in the bucket that do not verify (not evidence)
    unannounced: int = 0  # chunks in the bucket with no manifest beside them (yet)

    def add(self, kind: str, label: str | None, start: float, end: float) -> None:
        if end > start:
            self.spans.setdefault((kind, label), []).append((start, end))

    def add_entry(self, e: dict[str, Any]) -> None:
        self.chunks += 1
        self.add(e["kind"], e.get("reason"), float(e["start"]), float(e["end"]))
        gap = float(e.get("gap_before_s") or 0.0)
        if gap > 0:
            self.add("gap", e.get("gap_cause") or "unspecified", e["start"] - gap, e["start"])

    def compact(self) -> None:
        for label, spans in self.spans.items():
            self.spans[label] = union(spans)


class Auditor:
    """One audit: bounded S3 concurrency, one camera-hour in memory per task."""

    def __init__(
        self, settings: IngestSettings, s3: Any, redis: aioredis.Redis, concurrency: int = 16
    ) -> None:
        self.settings = settings
        self.s3 = s3
        self.redis = redis
        self.keyring = settings.signing_keys()
        self.gate = asyncio.Semaphore(concurrency)

    async def cameras(self, site: str) -> list[str]:
        """Every camera with footage in the raw bucket, and every one the site expects."""
        prefix = site_prefix(self.settings.raw_prefix, site)
        found = set(self.settings.site_cameras.get(site, []))
        paginator = self.s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(
            Bucket=self.settings.raw_bucket, Prefix=prefix, Delimiter="/"
        ):
            for p in page.get("CommonPrefixes", []):
                found.add(p["Prefix"][len(prefix) :].strip("/"))
        return sorted(found)

    async def hour(self, site: str, camera: str, hour: datetime) -> list[dict[str, Any]]:
        """Every chunk of the camera that started in ``hour``: index entries, and for a
        chunk the index does not know, what its manifest (and done record) say."""
        async with self.gate:
            listed, indexed = await asyncio.gather(
                self._listing(site, camera, hour), self._indexed(site, camera, hour)
            )
        known = {e.get("key") for e in indexed.values()}
        seqs = {e.get("seq") for e in indexed.values() if not e.get("key")}  # older entries
        out = list(indexed.values())
        unknown = [
            (chunk, mkey)
            for chunk, mkey in listed.items()
            if chunk not in known and seq_of_chunk_key(chunk) not in seqs
        ]
        found = await asyncio.gather(
            *(self._from_manifest(mkey, site, camera) for _, mkey in unknown)
        )
        out += [e for e in found if e is not None]
        for e in out:
            e.setdefault("_source", "index")
        return out

    async def _indexed(self, site: str, camera: str, hour: datetime) -> dict[str, Any]:
        # Redis first: a merge between the two reads then lands in the object read second.
        fresh: Any = await self.redis.hgetall(coverage_hour_key(site, camera, hour))
        okey = coverage_index_key(self.settings.output_prefix, site, camera, hour)
        entries = await read_index(self.s3, self.settings.output_bucket, okey)
        for name, value in fresh.items():
            if name == b"_gen":
                continue
            new = json.loads(value)
            if valid_entry(new):
                entries[new["chunk_id"]] = merge(entries.get(new["chunk_id"]), new)
        return entries

    async def _listing(self, site: str, camera: str, hour: datetime) -> dict[str, str]:
        """chunk key -> its manifest's key, for the hour's chunks ('': none beside it)."""
        prefix = chunk_hour_prefix(self.settings.raw_prefix, site, camera, hour)
        out: dict[str, str] = {}
        paginator = self.s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.settings.raw_bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if seq_of_chunk_key(key) is None:
                    continue  # not ours
                if key.endswith(MANIFEST_SUFFIX):
                    out[key.removesuffix(MANIFEST_SUFFIX)] = key
                else:
                    out.setdefault(key, "")  # an upload its edge has not announced (yet)
        return out

    async def _speaks_for(self, m: Manifest, key: str, site: str, camera: str) -> bool:
        """What the consumers check before they believe a manifest: it lies where its own
        fields put it, and its device owns the camera (once an owner is known)."""
        try:
            check_location(m, self.settings.raw_bucket, self.settings.raw_prefix)
        except Rejected:
            return False
        if (m.key + MANIFEST_SUFFIX, m.site_id, m.camera_id) != (key, site, camera):
            return False
        owner: Any = await self.redis.get(camera_owner_key(site, camera))
        return owner is None or bytes(owner).decode() == m.device_id

    async def _from_manifest(self, key: str, site: str, camera: str) -> dict[str, Any] | None:
        if not key:
            return {"_source": "unannounced"}
        async with self.gate:
            try:
                doc = await get_json(self.s3, self.settings.raw_bucket, key, MAX_SIDECAR_BYTES)
                if doc is None:
                    return None  # deleted since the listing
                fields = {str(k).encode(): str(v).encode() for k, v in dict(doc).items()}
                m = verify_fields(fields, self.keyring).manifest
            except (Rejected, SizeError, ValueError, TypeError, UnicodeError) as exc:
                # Not JSON, too big, not signed by a key we hold (or one retired since):
                # no evidence of anything, counted so that an operator sees it.
                log.warning("coverage.unverified_manifest", key=key, error=str(exc)[:200])
                return {"_source": "unverified"}
            if not await self._speaks_for(m, key, site, camera):
                return {"_source": "unverified"}
            record = await get_json(
                self.s3,
                self.settings.output_bucket,
                record_key(self.settings.output_prefix, m),
                1 << 20,
            )
        if record is None:
            kind, reason = "pending", None
        elif record.get("manifest") != m.model_dump(mode="json"):
            return {"_source": "unverified"}  # another manifest for the chunk: a replay
        else:
            kind, reason = str(record["status"]), record.get("reason")
        return {**entry_of(m, kind, reason), "_source": "manifest"}

    async def camera(self, site: str, camera: str, since: float, until: float) -> Timeline:
        t = Timeline()
        first = hour_of(since) - timedelta(hours=1)  # a chunk from before may reach in
        hours = []
        at = first
        while at.timestamp() < until:
            hours.append(at)
            at += timedelta(hours=1)
        # Hours in order, a few in flight: memory stays a few hours' entries.
        for batch in _batches(hours, 4):
            fetched = await asyncio.gather(*(self.hour(site, camera, h) for h in batch))
            for entries in fetched:
                self._take(t, entries)
            del fetched, entries  # not held while the next batch is read
            t.compact()
        await self._lookahead(t, site, camera, at, until)
        return t

    def _take(self, t: Timeline, entries: Iterable[dict[str, Any]]) -> None:
        for e in entries:
            source = e.pop("_source", "index")
            if source == "unverified":
                t.unverified += 1
            elif source == "unannounced":
                t.unannounced += 1
            else:
                t.from_index += source == "index"
                t.from_manifests += source == "manifest"
                t.add_entry(e)

    async def _lookahead(
        self, t: Timeline, site: str, camera: str, at: datetime, until: float
    ) -> None:
        """The chunk after the range: the gap it declares may explain the range's end."""
        now = time.time()
        for _ in range(LOOKAHEAD_HOURS):
            if at.timestamp() > now:
                return
            later = [
                e
                for e in await self.hour(site, camera, at)
                if e.get("_source") in ("index", "manifest") and e["start"] >= until
            ]
            if later:
                e = min(later, key=lambda x: x["start"])
                gap = float(e.get("gap_before_s") or 0.0)
                if gap > 0:
                    t.add("gap", e.get("gap_cause") or "unspecified", e["start"] - gap, e["start"])
                return
            at += timedelta(hours=1)


def _batches(items: list[datetime], n: int) -> Iterable[list[datetime]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def resolve(t: Timeline, since: float, until: float) -> list[tuple[float, float, str, str | None]]:
    """The range as consecutive intervals (start, end, kind, label), each second given to
    the strongest kind that claims it; what none claims is unexplained."""
    rank = {kind: i for i, kind in enumerate(KINDS)}
    layers = sorted(
        ((rank[kind], label or "", kind, label), clip(spans, since, until))
        for (kind, label), spans in t.spans.items()
    )
    cuts = sorted({since, until, *(x for _, spans in layers for span in spans for x in span)})
    cursors = [0] * len(layers)
    out: list[tuple[float, float, str, str | None]] = []
    for start, end in itertools.pairwise(cuts):
        kind, label = _strongest(layers, cursors, (start + end) / 2)
        if out and out[-1][1] == start and out[-1][2:] == (kind, label):
            out[-1] = (out[-1][0], end, kind, label)
        else:
            out.append((start, end, kind, label))
    return out


def clip(spans: list[Interval], since: float, until: float) -> list[Interval]:
    return union([(max(s, since), min(e, until)) for s, e in spans])


def _strongest(
    layers: list[tuple[tuple[int, str, str, str | None], list[Interval]]],
    cursors: list[int],
    at: float,
) -> tuple[str, str | None]:
    """The first layer (strongest) with a span holding ``at``; cursors only move forward
    (``at`` grows from call to call)."""
    for n, ((_, _, kind, label), spans) in enumerate(layers):
        while cursors[n] < len(spans) and spans[cursors[n]][1] <= at:
            cursors[n] += 1
        if cursors[n] < len(spans) and spans[cursors[n]][0] <= at:
            return kind, label
    return "unexplained", None


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def camera_doc(camera: str, t: Timeline, since: float, until: float) -> dict[str, Any]:
    intervals = resolve(t, since, until)
    seconds = dict.fromkeys(KINDS, 0.0)
    by_label: dict[str, dict[str, float]] = {"gap": {}, "rejected": {}, "dead_lettered": {}}
    for start, end, kind, label in intervals:
        seconds[kind] += end - start
        if kind in by_label:
            name = label or "unspecified"
            by_label[kind][name] = by_label[kind].get(name, 0.0) + end - start
    wall = until - since
    covered = seconds["accepted"] + seconds["rejected"] + seconds["pending"]
    holes = sorted(
        (i for i in intervals if i[2] in ("gap", "dead_lettered", "unexplained")),
        key=lambda i: i[0] - i[1],
    )
    return {
        "camera_id": camera,
        "wall_s": round(wall, 3),
        "accepted_s": round(seconds["accepted"], 3),
        "rejected_s": round(seconds["rejected"], 3),
        "pending_s": round(seconds["pending"], 3),
        "gap_s": round(seconds["gap"], 3),
        "dead_lettered_s": round(seconds["dead_lettered"], 3),
        "unexplained_s": round(seconds["unexplained"], 3),
        "ratio": round(covered / wall, 6) if wall > 0 else 1.0,
        "gaps_by_cause": _rounded(by_label["gap"]),
        "rejected_by_reason": _rounded(by_label["rejected"]),
        "dead_lettered_by_reason": _rounded(by_label["dead_lettered"]),
        "chunks": t.chunks,
        "chunks_from_index": t.from_index,
        "chunks_from_manifests": t.from_manifests,
        "unverified_manifests": t.unverified,
        "unannounced_chunks": t.unannounced,
        "worst_holes": [_interval(i) for i in holes[:10]],
        "intervals": [_interval(i) for i in intervals],
    }


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in sorted(d.items())}


def _interval(i: tuple[float, float, str, str | None]) -> dict[str, Any]:
    start, end, kind, label = i
    return {
        "start": iso(start),
        "end": iso(end),
        "kind": kind,
        "cause": label if kind == "gap" else None,
        "reason": label if kind in ("rejected", "dead_lettered") else None,
        "seconds": round(end - start, 3),
    }


async def audit(
    settings: IngestSettings,
    s3: Any,
    redis: aioredis.Redis,
    site: str,
    since: datetime,
    until: datetime,
    cameras: list[str] | None = None,
) -> dict[str, Any]:
    """The coverage document (``cloud-ingest coverage --json``, contract fields first)."""
    start, end = since.timestamp(), until.timestamp()
    if end <= start:
        raise ValueError("--until must be after --since")
    auditor = Auditor(settings, s3, redis)
    names = cameras or await auditor.cameras(site)
    timelines = await asyncio.gather(*(auditor.camera(site, c, start, end) for c in names))
    docs = [camera_doc(c, t, start, end) for c, t in zip(names, timelines, strict=True)]
    wall = sum(d["wall_s"] for d in docs)
    covered = sum(d["accepted_s"] + d["rejected_s"] + d["pending_s"] for d in docs)
    worst = sorted(
        ({"camera_id": d["camera_id"], **h} for d in docs for h in d["worst_holes"]),
        key=lambda h: -h["seconds"],
    )
    return {
        "site_id": site,
        "since": iso(start),
        "until": iso(end),
        "cameras": docs,
        "ratio": round(covered / wall, 6) if wall > 0 else 1.0,
        "unexplained_s": round(sum(d["unexplained_s"] for d in docs), 3),
        "worst_holes": worst[:20],
    }


def table(doc: dict[str, Any]) -> str:
    """The document for a person: one line per camera, then the worst holes."""
    head = f"{'camera':<24}{'wall_s':>10}{'accepted':>10}{'rejected':>10}{'pending':>9}"
    head += f"{'gap':>9}{'dlq':>8}{'unexpl.':>9}{'ratio':>9}  gaps by cause"
    lines = [f"site {doc['site_id']}  {doc['since']} .. {doc['until']}", head]
    for c in doc["cameras"]:
        causes = ", ".join(f"{k} {v:.1f}s" for k, v in c["gaps_by_cause"].items()) or "-"
        lines.append(
            f"{c['camera_id']:<24}{c['wall_s']:>10.1f}{c['accepted_s']:>10.1f}"
            f"{c['rejected_s']:>10.1f}{c['pending_s']:>9.1f}{c['gap_s']:>9.1f}"
            f"{c['dead_lettered_s']:>8.1f}{c['unexplained_s']:>9.1f}{c['ratio']:>9.4f}  {causes}"
        )
    lines.append(f"site ratio {doc['ratio']:.4f}, unexplained {doc['unexplained_s']:.1f}s")
    if doc["worst_holes"]:
        lines.append("worst holes:")
        for h in doc["worst_holes"]:
            what = h["cause"] or h["reason"] or ""
            lines.append(
                f"  {h['camera_id']:<22}{h['seconds']:>10.1f}s  {h['kind']:<14}{what:<18}"
                f"{h['start']} .. {h['end']}"
            )
    return "\n".join(lines)
