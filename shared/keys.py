"""Every object key and Redis key name, in one place.

Object keys are derived only from validated fields, sort by time within a
camera, and carry site, camera and date so lifecycle rules and prefix
listings work.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from shared.manifest import Manifest, Rejected


def _join(prefix: str, *parts: str) -> str:
    head = prefix.strip("/")
    return "/".join([head, *parts]) if head else "/".join(parts)


def _hour_path(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y/%m/%d/%H")


def chunk_key(prefix: str, site_id: str, camera_id: str, start: datetime, seq: int) -> str:
    """Raw chunk: ``{prefix}/{site}/{camera}/{YYYY}/{MM}/{DD}/{HH}/{start}-{seq}.mp4``."""
    stamp = start.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return _join(prefix, site_id, camera_id, _hour_path(start), f"{stamp}-{seq:010d}.mp4")


def site_prefix(prefix: str, site_id: str) -> str:
    """Every raw chunk of a site: one common prefix per camera below it."""
    return _join(prefix, site_id) + "/"


def chunk_hour_prefix(prefix: str, site_id: str, camera_id: str, hour: datetime) -> str:
    """Every raw chunk (and signed manifest) of one camera that started in ``hour``."""
    return _join(prefix, site_id, camera_id, _hour_path(hour)) + "/"


_SEQ = re.compile(r"-(\d{1,20})\.mp4(?:\.manifest\.json)?$")


def seq_of_chunk_key(key: str) -> int | None:
    """The sequence number in a raw chunk's (or its manifest's) key; None if it has none."""
    found = _SEQ.search(key.rsplit("/", 1)[-1])
    return int(found.group(1)) if found else None


def check_location(m: Manifest, raw_bucket: str, raw_prefix: str) -> None:
    """Only the raw bucket, only the key the manifest's own fields derive: a device cannot
    make the cloud read (or a record, or the coverage audit, point at) anything else."""
    if m.bucket != raw_bucket:
        raise Rejected("foreign_bucket", f"bucket {m.bucket!r} is not INGEST_RAW_BUCKET")
    expected = chunk_key(raw_prefix, m.site_id, m.camera_id, m.start_time, m.seq)
    if m.key != expected:
        raise Rejected("foreign_key", f"key {m.key[:200]!r} is not {expected!r}")


MANIFEST_SUFFIX = ".manifest.json"


def manifest_key(chunk_key: str) -> str:
    """The signed manifest beside its chunk: the bucket alone can rebuild the queue."""
    return chunk_key + MANIFEST_SUFFIX


def record_key(prefix: str, manifest: Manifest) -> str:
    """The per-chunk result record; its existence is the chunk's done marker. Addressed by
    the chunk id alone (sharded by its first byte): a second manifest for the same chunk
    lands on the same record whatever else it claims, so a replay cannot hide behind a
    different start time or site."""
    chunk_id = manifest.chunk_id
    return _join(prefix, "records", chunk_id[:2], f"{chunk_id}.json")


def shard_key(prefix: str, manifest: Manifest) -> str:
    """One Parquet shard of sampled, resized frames per accepted chunk."""
    m = manifest
    return _join(
        prefix, "shards", m.site_id, m.camera_id, _hour_path(m.start_time), f"{m.chunk_id}.parquet"
    )


def coverage_index_key(prefix: str, site_id: str, camera_id: str, hour: datetime) -> str:
    """A camera-hour's coverage index: what became of each of its chunks (one GET for the
    coverage audit instead of one per chunk)."""
    return _join(prefix, "coverage", site_id, camera_id, _hour_path(hour) + ".json")


def coverage_hour_key(site_id: str, camera_id: str, hour: datetime) -> str:
    """The camera-hour's index entries not yet merged into its object in S3 (a hash)."""
    return f"ingest:cov:{site_id}:{camera_id}:{hour.astimezone(UTC):%Y%m%d%H}"


COVERAGE_DIRTY = "ingest:cov:dirty"  # sorted set: coverage hour key -> when it changed first


def recent_hashes_key(site_id: str, camera_id: str) -> str:
    """Perceptual hashes of a camera's recent chunks, for the near-duplicate filter."""
    return f"ingest:dhash:{site_id}:{camera_id}"


def chunk_lock_key(chunk_id: str) -> str:
    """Held while a consumer works on a chunk, so two copies of one manifest are not
    processed at the same time; expires on its own if the holder dies."""
    return f"ingest:lock:{chunk_id}"


def camera_owner_key(site_id: str, camera_id: str) -> str:
    """The device a site's camera belongs to: the first device whose authentic manifest
    named it (or the keyring's camera list); another device claiming it is refused."""
    return f"ingest:camera:{site_id}:{camera_id}"


OPEN_WINDOWS = "ingest:windows:open"  # sorted set: window key -> close-by deadline


def window_key(site_id: str, window_start: int) -> str:
    """A scene window: a note per processed chunk of one site overlapping one time window."""
    return f"ingest:window:{site_id}:{window_start}"


def site_gaps_key(site_id: str) -> str:
    """Gaps the edges of a site declared (sorted set, scored by the gap's end)."""
    return f"ingest:gaps:{site_id}"


def window_id(site_id: str, window_start: int) -> str:
    """A window's base id (contract); each revision is ``{window_id}-r{revision}``."""
    return f"{site_id}-{window_start}"


def revision_id(window: str, revision: int) -> str:
    return f"{window}-r{revision}"


def window_state_key(prefix: str, site_id: str, window_start: int) -> str:
    """The window's last closed revision and its notes: in S3, where it does not expire
    under the window (a backfill long after the close still makes the next revision)."""
    return _join(prefix, "windows", site_id, str(window_start), "state.json")


def window_mcap_key(prefix: str, site_id: str, window_start: int, revision: int) -> str:
    """One MCAP per window revision (contract: the closed window's ``mcap_key``)."""
    name = f"{revision_id(window_id(site_id, window_start), revision)}.mcap"
    return _join(prefix, "windows", site_id, str(window_start), name)


def handoff_done_key(revision: str) -> str:
    """Which hand-off steps have completed for a window revision (idempotency across
    redeliveries; keyed on the revision id, so revision 2 is not taken for revision 1)."""
    return f"ingest:handoff:{revision}"


JOBS = "ingest:jobs"  # hash: submission id -> last known status of hand-off Ray jobs
ACTIVE_JOBS = "ingest:jobs:active"  # set: submission ids not yet in a terminal state
JOB_SUBMIT_LOCK = "ingest:lock:job-submit"  # held while a consumer counts jobs and submits


def handoff_stream(stream: str) -> str:
    """Closed windows waiting for their hand-off (a stream with its own consumer group)."""
    return f"{stream}:windows"


def dlq_stream(stream: str) -> str:
    """Dead letters of ``stream`` (contract name)."""
    return f"{stream}:dlq"


def consumer_totals_key(group: str, consumer: str) -> str:
    """A consumer's running totals (hash: ``count:<outcome>``, ``seconds:<stage>``), kept
    in Redis so the exported counters survive actor restarts and kills."""
    return f"ingest:totals:{group}:{consumer}"


def whereabouts_key(group: str) -> str:
    """Hash: consumer name -> JSON of the Ray node and PID it runs on, and when it said so."""
    return f"ingest:whereabouts:{group}"


def consumers_key(group: str) -> str:
    """The consumers of ``group`` that ever kept totals (a set), for the metrics observer."""
    return f"ingest:consumers:{group}"


def flushed_key(group: str, consumer: str) -> str:
    """The token of the consumer's last totals flush applied: a flush sent again after its
    reply was lost is recognised and not counted twice."""
    return f"ingest:flushed:{group}:{consumer}"


def redis_probe_key(consumer: str) -> str:
    """The consumer's canary write (``SET … PX``): a Redis that answers PING but refuses
    writes (maxmemory, a read-only replica, ACL drift) fails the environment probe."""
    return f"ingest:probe:{consumer}"


def readable_object_key(group: str) -> str:
    """A raw object some consumer of ``group`` read lately, ``bucket`` NUL ``key``: what a
    paused consumer's probe reads when it has read none itself (fresh after a restart)."""
    return f"ingest:probe:readable:{group}"


def s3_probe_key(prefix: str, consumer: str) -> str:
    """The consumer's canary object in the output bucket (PUT, then GET): a consumer that
    may list the buckets but not write or read objects fails the environment probe."""
    return _join(prefix, "_probe", consumer)
