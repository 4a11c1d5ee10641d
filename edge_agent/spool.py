"""The durable spool: chunk files on disk plus a SQLite ledger of their state.

Every chunk goes written → uploaded → announced; the ledger (WAL, synchronous=FULL)
is the agent's memory across crashes and restarts, including each camera's next
``seq`` and where its timeline last ended. Camera threads and the event loop
each use their own connection.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from edge_agent.segmenter import ClosedChunk, fsync_and_hash, fsync_dir
from shared.manifest import Manifest

WRITTEN, UPLOADED, ANNOUNCED, LOST = "written", "uploaded", "announced", "lost"

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


ManifestFactory = Callable[[ClosedChunk, int, Position], Manifest]


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.quarantine_dir = root / "quarantine"
        for d in (root, self.tmp_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.db_path = root / "ledger.sqlite3"
        self._local = threading.local()
        self._db().executescript(_SCHEMA)

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

    def position(self, db: sqlite3.Connection, camera_id: str) -> Position:
        row = db.execute(
            "SELECT next_seq, media_end_s, wall_end FROM cameras WHERE camera_id = ?", (camera_id,)
        ).fetchone()
        if row is None:
            return Position(0, None, None)
        wall = datetime.fromisoformat(row[2]) if row[2] else None
        return Position(int(row[0]), row[1], wall)

    def commit(self, chunk: ClosedChunk, make_manifest: ManifestFactory) -> Manifest:
        """Give a closed chunk its seq, record it, then move it to its final name.

        The row is written first with the final path; if we crash before the
        rename, recovery finishes it from the ``.partial`` file (same sha256).
        """
        with self._tx() as db:
            pos = self.position(db, chunk.camera_id)
            manifest = make_manifest(chunk, pos.next_seq, pos)
            final = self.root / chunk.camera_id / f"{manifest.seq:010d}-{manifest.chunk_id}.mp4"
            now = time.time()
            db.execute(
                "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    manifest.chunk_id,
                    chunk.camera_id,
                    manifest.seq,
                    str(final),
                    WRITTEN,
                    manifest.model_dump_json(),
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
        return manifest

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

    def mark(self, chunk_id: str, state: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE chunks SET state = ?, updated = ? WHERE chunk_id = ?",
                (state, time.time(), chunk_id),
            )
        if state == ANNOUNCED:
            rec = self.get(chunk_id)
            if rec is not None:
                rec.path.unlink(missing_ok=True)

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

    def recover(self) -> tuple[int, int]:
        """After a crash: finish interrupted renames, quarantine orphans.

        Returns (recovered, quarantined). A ``written`` row whose file cannot be
        found is marked ``lost`` (and its loss logged by the caller) rather than
        uploaded as if it were good.
        """
        recovered = lost = 0
        for chunk_id in self.unfinished():
            rec = self.get(chunk_id)
            if rec is None or rec.path.exists():
                continue
            partial = self._partial_for(rec)
            if partial is not None:
                os.replace(partial, rec.path)
                recovered += 1
            elif rec.state == WRITTEN:
                self.mark(chunk_id, LOST)
                lost += 1
        quarantined = self._quarantine_strays()
        return recovered, quarantined + lost

    def _partial_for(self, rec: Record) -> Path | None:
        for p in self.tmp_dir.glob(f"{rec.manifest.camera_id}-*.partial"):
            if fsync_and_hash(p)[0] == rec.manifest.sha256:
                return p
        return None

    def _quarantine_strays(self) -> int:
        strays = list(self.tmp_dir.glob("*.partial"))
        for p in strays:
            os.replace(p, self.quarantine_dir / p.name)
        return len(strays)
