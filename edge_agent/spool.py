"""The durable spool: chunk files on disk plus a SQLite ledger of their state.

Every chunk goes written → uploaded → announced (or evicted / lost, always with
a ledger row, a log line and a metric). The ledger (WAL, synchronous=FULL) is
the agent's memory across crashes: each camera's next ``seq`` and where its
timeline ended. A chunk's file is deleted once uploaded; the spool's size is the
bytes still waiting for upload. Camera threads and the event loop each use
their own connection.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from edge_agent.recovery import salvage
from edge_agent.segmenter import ClosedChunk, fsync_and_hash, fsync_dir
from shared.manifest import Manifest

WRITTEN, UPLOADED, ANNOUNCED = "written", "uploaded", "announced"
EVICTED, LOST = "evicted", "lost"
EvictionPolicy = Literal["oldest", "newest"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cameras (
    camera_id TEXT PRIMARY KEY,
    next_seq INTEGER NOT NULL,
    media_end_s REAL,
    wall_end TEXT
);
CREATE TABLE IF NOT EXISTS chunks (
    chunk_id TEXT PRIMARY KEY,
    camera_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    manifest TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (camera_id, seq)
);
CREATE INDEX IF NOT EXISTS chunks_by_state ON chunks (state, created);
"""


@dataclass(frozen=True, slots=True)
class Position:
    """Where a camera's timeline stood after its last committed chunk."""

    next_seq: int
    media_end_s: float | None
    wall_end: datetime | None


@dataclass(frozen=True, slots=True)
class Record:
    chunk_id: str
    path: Path
    state: str
    manifest: Manifest


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int
    min_free_bytes: int
    policy: EvictionPolicy = "oldest"


ManifestFactory = Callable[[ClosedChunk, int, Position], Manifest]


class Spool:
    def __init__(self, root: Path, limits: Limits | None = None) -> None:
        self.root = root
        self.limits = limits or Limits(max_bytes=1 << 62, min_free_bytes=0)
        self.tmp_dir = root / "tmp"
        self.quarantine_dir = root / "quarantine"
        for d in (root, self.tmp_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.db_path = root / "ledger.sqlite3"
        self._local = threading.local()
        self._busy: set[str] = set()  # chunks being uploaded: never evicted mid-flight
        self._busy_lock = threading.Lock()
        self._db().executescript(_SCHEMA)

    # -- connections ------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- commit -----------------------------------------------------------------

    def position(self, db: sqlite3.Connection, camera_id: str) -> Position:
        row = db.execute(
            "SELECT next_seq, media_end_s, wall_end FROM cameras WHERE camera_id = ?", (camera_id,)
        ).fetchone()
        if row is None:
            return Position(0, None, None)
        wall = datetime.fromisoformat(row[2]) if row[2] else None
        return Position(int(row[0]), row[1], wall)

    def commit(
        self, chunk: ClosedChunk, make_manifest: ManifestFactory
    ) -> tuple[Manifest, list[Record]]:
        """Give a closed chunk its seq, record it, move it to its final name, enforce limits.

        The row is written first with the final path; if we crash before the
        rename, recovery finishes it from the ``.partial`` file. Returns the
        manifest and any chunks evicted to make room.
        """
        with self._tx() as db:
            pos = self.position(db, chunk.camera_id)
            manifest = make_manifest(chunk, pos.next_seq, pos)
            final = self.root / chunk.camera_id / f"{manifest.seq:010d}-{manifest.chunk_id}.mp4"
            now = time.time()
            db.execute(
                "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    manifest.chunk_id,
                    chunk.camera_id,
                    manifest.seq,
                    str(final),
                    WRITTEN,
                    manifest.model_dump_json(),
                    chunk.size_bytes,
                    now,
                    now,
                ),
            )
            db.execute(
                "INSERT INTO cameras VALUES (?, ?, ?, ?) ON CONFLICT(camera_id) DO UPDATE SET "
                "next_seq = excluded.next_seq, media_end_s = excluded.media_end_s, "
                "wall_end = excluded.wall_end",
                (chunk.camera_id, manifest.seq + 1, chunk.media_end_s, chunk.wall_end.isoformat()),
            )
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(chunk.path, final)
        fsync_dir(final.parent)
        return manifest, self.enforce_limits(newest=manifest.chunk_id)

    # -- reads ------------------------------------------------------------------

    def get(self, chunk_id: str) -> Record | None:
        row = (
            self._db()
            .execute(
                "SELECT chunk_id, path, state, manifest FROM chunks WHERE chunk_id = ?", (chunk_id,)
            )
            .fetchone()
        )
        if row is None:
            return None
        return Record(row[0], Path(row[1]), row[2], Manifest.model_validate_json(row[3]))

    def unfinished(self) -> list[str]:
        """Chunks not yet announced, oldest first (backfill order)."""
        rows = (
            self._db()
            .execute(
                "SELECT chunk_id FROM chunks WHERE state IN (?, ?) ORDER BY created",
                (WRITTEN, UPLOADED),
            )
            .fetchall()
        )
        return [r[0] for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self._db().execute("SELECT state, COUNT(*) FROM chunks GROUP BY state").fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def pending_bytes(self) -> int:
        """Bytes of chunk files still waiting for upload (the spool's bounded size)."""
        row = (
            self._db()
            .execute("SELECT COALESCE(SUM(size_bytes), 0) FROM chunks WHERE state = ?", (WRITTEN,))
            .fetchone()
        )
        return int(row[0])

    def evicted_run_before(self, camera_id: str, seq: int) -> tuple[float, int]:
        """Seconds and count of chunks evicted or lost immediately before ``seq``.

        Derived at announce time from the ledger, so a gap caused by an eviction
        lands in the next manifest without rewriting anything already stored.
        """
        rows = (
            self._db()
            .execute(
                "SELECT seq, state, manifest FROM chunks WHERE camera_id = ? AND seq < ? "
                "ORDER BY seq DESC LIMIT 10000",
                (camera_id, seq),
            )
            .fetchall()
        )
        gap, count, expected = 0.0, 0, seq - 1
        for row_seq, state, doc in rows:
            if row_seq != expected or state not in (EVICTED, LOST):
                break
            m = Manifest.model_validate_json(doc)
            gap += m.media_duration_s + m.gap_before_s
            count += 1
            expected -= 1
        return gap, count

    # -- state changes ----------------------------------------------------------

    def claim(self, chunk_id: str) -> None:
        with self._busy_lock:
            self._busy.add(chunk_id)

    def release(self, chunk_id: str) -> None:
        with self._busy_lock:
            self._busy.discard(chunk_id)

    def mark_uploaded(self, chunk_id: str) -> None:
        rec = self._set_state(chunk_id, UPLOADED, WRITTEN)
        if rec is not None:
            rec.path.unlink(missing_ok=True)  # in S3 now; the manifest lives in the ledger

    def mark_announced(self, chunk_id: str) -> None:
        self._set_state(chunk_id, ANNOUNCED, UPLOADED)

    def _set_state(self, chunk_id: str, state: str, expected: str) -> Record | None:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE chunks SET state = ?, updated = ? WHERE chunk_id = ? AND state = ?",
                (state, time.time(), chunk_id, expected),
            )
        return self.get(chunk_id) if cur.rowcount else None

    # -- limits -----------------------------------------------------------------

    def _over_limits(self) -> bool:
        free = shutil.disk_usage(self.root).free
        return self.pending_bytes() > self.limits.max_bytes or free < self.limits.min_free_bytes

    def enforce_limits(self, newest: str | None = None) -> list[Record]:
        """Evict by policy until under the byte limit and above the free-disk margin."""
        evicted: list[Record] = []
        while self._over_limits():
            victim = self._victim(newest)
            if victim is None:
                break
            rec = self._set_state(victim, EVICTED, WRITTEN)
            if rec is not None:
                rec.path.unlink(missing_ok=True)
                evicted.append(rec)
        return evicted

    def _victim(self, newest: str | None) -> str | None:
        if self.limits.policy == "newest" and newest is not None:
            return newest if newest not in self._busy and self._state(newest) == WRITTEN else None
        with self._busy_lock:
            busy = set(self._busy)
        order = "ASC" if self.limits.policy == "oldest" else "DESC"
        for (chunk_id,) in self._db().execute(
            f"SELECT chunk_id FROM chunks WHERE state = ? ORDER BY created {order}",  # noqa: S608
            (WRITTEN,),
        ):
            if chunk_id not in busy:
                return str(chunk_id)
        return None

    def _state(self, chunk_id: str) -> str | None:
        row = (
            self._db()
            .execute("SELECT state FROM chunks WHERE chunk_id = ?", (chunk_id,))
            .fetchone()
        )
        return None if row is None else str(row[0])

    # -- recovery ---------------------------------------------------------------

    def recover(self, make_manifest: ManifestFactory) -> dict[str, int]:
        """After a crash: finish interrupted renames, salvage partial chunks, quarantine the rest.

        A ``written`` row whose file is gone is marked ``lost`` (a gap the next
        manifest reports) rather than uploaded as if it were good.
        """
        out = {"renamed": 0, "lost": 0, "salvaged": 0, "quarantined": 0}
        partials = {p.name: p for p in self.tmp_dir.glob("*.partial")}
        for chunk_id in self.unfinished():
            rec = self.get(chunk_id)
            if rec is None or rec.state != WRITTEN or rec.path.exists():
                continue
            partial = self._partial_for(rec, partials)
            if partial is not None:
                os.replace(partial, rec.path)
                del partials[partial.name]
                out["renamed"] += 1
            else:
                self._set_state(chunk_id, LOST, WRITTEN)
                out["lost"] += 1
        for path in sorted(partials.values()):
            chunk = salvage(path)
            if chunk is None:
                os.replace(path, self.quarantine_dir / path.name)
                out["quarantined"] += 1
            else:
                self.commit(chunk, make_manifest)
                out["salvaged"] += 1
        return out

    def _partial_for(self, rec: Record, partials: dict[str, Path]) -> Path | None:
        for p in partials.values():
            if p.name.startswith(rec.manifest.camera_id + "+") and (
                fsync_and_hash(p)[0] == rec.manifest.sha256
            ):
                return p
        return None
