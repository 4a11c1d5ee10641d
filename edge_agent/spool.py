"""The durable spool: chunk files on disk plus a SQLite ledger of their state.

Every chunk goes written → uploaded → announced (or evicted / lost, always with
a ledger row, a log line and a metric). The ledger (WAL, synchronous=FULL) is
the agent's memory across crashes: each camera's next ``seq`` and where its
timeline ended. A chunk's file is deleted once uploaded; the spool's size is the
bytes still waiting for upload plus the quarantine (partial files that could not
be salvaged, kept for inspection, bounded by bytes and age). Finished rows are
pruned after a retention period, so the ledger does not grow with the years.

Each thread that calls in gets its own connection; the agent makes every call
from one ledger thread, off its event loop. Claiming a chunk for delivery and
evicting one are decided under one lock, so a chunk is never both.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from edge_agent.durable import fsync_and_hash, fsync_dir
from edge_agent.recovery import salvage
from edge_agent.segmenter import ClosedChunk
from shared.manifest import Manifest, canonical_bytes, wall_span

WRITTEN, UPLOADED, ANNOUNCED = "written", "uploaded", "announced"
EVICTED, LOST = "evicted", "lost"
UNFINISHED = (WRITTEN, UPLOADED)
EvictionPolicy = Literal["oldest", "newest"]
# Directories of the spool that are not a camera's: camera ids may not take these names.
RESERVED_DIRS = frozenset({"tmp", "quarantine"})
_CHUNK_FILE = re.compile(r"^\d{10}-([0-9a-f]{32})\.mp4$")

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
    final INTEGER NOT NULL DEFAULT 0,  -- the manifest is the one to announce (finalize)
    UNIQUE (camera_id, seq)
);
CREATE INDEX IF NOT EXISTS chunks_by_state ON chunks (state, created);
"""
# Finished rows to prune, oldest first, a batch at a time (rowid subqueries: SQLite's
# DELETE has no LIMIT without a compile option).
# A gap row is declared once a later chunk of its camera was announced: compared with
# the camera's announced high-water mark, one primary-key lookup per row.
_PRUNE_GAPS = """
DELETE FROM chunks WHERE rowid IN (
    SELECT c.rowid FROM chunks c JOIN cameras k ON k.camera_id = c.camera_id
    WHERE c.state IN ('evicted', 'lost') AND c.created < ? AND c.seq < k.announced_seq
    LIMIT ?)
"""
_PRUNE_ANNOUNCED = """
DELETE FROM chunks WHERE rowid IN (
    SELECT rowid FROM chunks WHERE state = 'announced' AND created < ? LIMIT ?)
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
    quarantine_max_bytes: int = 1 << 30
    quarantine_max_age_s: float = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class Pruned:
    """A quarantined file removed: too old, over the quarantine's own byte limit, or to
    bring the spool back under its limits (``age``, ``bytes``, ``spool_limit``)."""

    name: str
    size_bytes: int
    reason: str


@dataclass(slots=True)
class Freed:
    """What making room removed: evicted chunks (footage, each a declared gap) and
    quarantined files (unusable partials) pruned first."""

    evicted: list[Record] = field(default_factory=list)
    pruned: list[Pruned] = field(default_factory=list)


@dataclass(slots=True)
class Recovered:
    """What start-up recovery found after a crash."""

    renamed: int = 0  # interrupted renames finished from their .partial file
    salvaged: int = 0  # partial chunks cut to their complete fragments and committed
    quarantined: int = 0  # partial chunks with nothing usable in them
    removed: int = 0  # files of finished rows (a crash between commit and unlink)
    orphaned: int = 0  # chunk files no row knows, quarantined
    lost: list[Record] = field(default_factory=list)  # written rows whose file is gone
    freed: Freed = field(default_factory=Freed)  # what salvaged chunks' commits evicted
    # (file, error) of partials whose salvage failed in a way it does not expect: the file
    # is quarantined all the same, so one hostile file cannot crash-loop the start-up.
    errors: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {
            "renamed": self.renamed,
            "salvaged": self.salvaged,
            "quarantined": self.quarantined,
            "removed": self.removed,
            "orphaned": self.orphaned,
            "lost": len(self.lost),
        }


ManifestFactory = Callable[[ClosedChunk, int, Position], Manifest]
Fold = Callable[[Manifest, float, int], Manifest]  # (manifest, gap seconds, chunks) -> final


def _row_json(m: Manifest) -> str:
    """A manifest as its row keeps it: in its own version's form, so the agent it was
    pinned for (EDGE_MANIFEST_SCHEMA_VERSION) can still read it after a downgrade."""
    return canonical_bytes(m).decode()


def _tombstone(m: Manifest) -> str:
    """What an evicted or lost row keeps of its manifest: enough to declare the gap (a
    tenth of the whole manifest; during a long outage such rows pile up by the thousand)."""
    doc = {"chunk_id": m.chunk_id, "camera_id": m.camera_id, "seq": m.seq}
    # Wall time: on the wall clock a camera's chunks and declared gaps tile its timeline,
    # so the gap declared for a run of evictions ends exactly where the next chunk starts.
    doc["span_s"] = wall_span(m) + m.gap_before_s
    return json.dumps(doc)


class Spool:
    def __init__(
        self, root: Path, limits: Limits | None = None, *, busy_timeout_s: float = 30.0
    ) -> None:
        self.root = root
        self.limits = limits or Limits(max_bytes=1 << 62, min_free_bytes=0)
        # How long a write waits for another process holding the ledger (a backup tool,
        # an sqlite3 shell) before it fails with "database is locked"; callers retry.
        self.busy_timeout_s = busy_timeout_s
        self.tmp_dir = root / "tmp"
        self.quarantine_dir = root / "quarantine"
        for d in (root, self.tmp_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.db_path = root / "ledger.sqlite3"
        self._local = threading.local()
        self._busy: set[str] = set()  # chunks claimed for delivery: never evicted
        self._busy_lock = threading.Lock()  # claim and evict decide under it
        self._db().executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Ledgers written by earlier versions lack the announced high-water mark and the
        final-manifest flag."""
        db = self._db()
        columns = {r[1] for r in db.execute("PRAGMA table_info(cameras)")}
        if "announced_seq" not in columns:
            db.execute("ALTER TABLE cameras ADD COLUMN announced_seq INTEGER")
        columns = {r[1] for r in db.execute("PRAGMA table_info(chunks)")}
        if "final" not in columns:
            db.execute("ALTER TABLE chunks ADD COLUMN final INTEGER NOT NULL DEFAULT 0")

    # -- connections ------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.db_path, timeout=self.busy_timeout_s, isolation_level=None)
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
            db.execute("COMMIT")
        except BaseException:
            # Also after a failed COMMIT (busy, disk full): never leave the connection
            # inside a transaction that the next BEGIN would trip over.
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

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

    def commit(self, chunk: ClosedChunk, make_manifest: ManifestFactory) -> tuple[Manifest, Freed]:
        """``record``, ``place``, ``enforce_limits``: a closed chunk in the spool for good.
        Returns its manifest and what was removed to make room."""
        manifest = self.record(chunk, make_manifest)
        self.place(chunk, manifest)
        return manifest, self.enforce_limits(newest=manifest.chunk_id)

    def record(self, chunk: ClosedChunk, make_manifest: ManifestFactory) -> Manifest:
        """Give a closed chunk its seq and write its row (with its final path) in one
        transaction: all or nothing, so a failed attempt can simply be tried again."""
        with self._tx() as db:
            pos = self.position(db, chunk.camera_id)
            manifest = make_manifest(chunk, pos.next_seq, pos)
            now = time.time()
            db.execute(
                "INSERT INTO chunks (chunk_id, camera_id, seq, path, state, manifest, "
                "size_bytes, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    manifest.chunk_id,
                    chunk.camera_id,
                    manifest.seq,
                    str(self.final_path(manifest).relative_to(self.root)),
                    WRITTEN,
                    _row_json(manifest),
                    chunk.size_bytes,
                    now,
                    now,
                ),
            )
            db.execute(
                "INSERT INTO cameras (camera_id, next_seq, media_end_s, wall_end) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(camera_id) DO UPDATE SET "
                "next_seq = excluded.next_seq, media_end_s = excluded.media_end_s, "
                "wall_end = excluded.wall_end",
                (chunk.camera_id, manifest.seq + 1, chunk.media_end_s, chunk.wall_end.isoformat()),
            )
        return manifest

    def final_path(self, manifest: Manifest) -> Path:
        return self.root / manifest.camera_id / f"{manifest.seq:010d}-{manifest.chunk_id}.mp4"

    def place(self, chunk: ClosedChunk, manifest: Manifest) -> None:
        """Move a recorded chunk's file to its final name (idempotent). A crash before
        this is finished by recovery from the ``.partial`` file (same sha256)."""
        final = self.final_path(manifest)
        if final.exists() and not chunk.path.exists():
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(chunk.path, final)
        fsync_dir(final.parent)

    # -- reads ------------------------------------------------------------------

    def _path(self, stored: str) -> Path:
        """A row's file under this spool root. Rows keep ``camera/file`` (older ones an
        absolute path, of which the same two parts count), so a spool moved to another
        disk or mount point keeps its backlog."""
        p = Path(stored)
        return self.root / p.parent.name / p.name

    def state(self, chunk_id: str) -> tuple[str, Path] | None:
        """(state, file) of a row, whatever its state."""
        row = (
            self._db()
            .execute("SELECT state, path FROM chunks WHERE chunk_id = ?", (chunk_id,))
            .fetchone()
        )
        return None if row is None else (str(row[0]), self._path(row[1]))

    def get(self, chunk_id: str) -> Record | None:
        """A chunk with its manifest; None for an unknown one and for an evicted or lost one
        (their rows keep only what declares the gap: see ``state``)."""
        row = (
            self._db()
            .execute(
                "SELECT chunk_id, path, state, manifest FROM chunks WHERE chunk_id = ? "
                "AND state NOT IN (?, ?)",
                (chunk_id, EVICTED, LOST),
            )
            .fetchone()
        )
        if row is None:
            return None
        return Record(row[0], self._path(row[1]), row[2], Manifest.model_validate_json(row[3]))

    def unfinished(self) -> list[str]:
        """Chunks not yet announced, oldest first (backfill order)."""
        rows = (
            self._db()
            .execute(
                "SELECT chunk_id FROM chunks WHERE state IN (?, ?) ORDER BY created", UNFINISHED
            )
            .fetchall()
        )
        return [r[0] for r in rows]

    def counts(self) -> dict[str, int]:
        """Rows per state, the whole ledger (for start-up and shutdown lines)."""
        rows = self._db().execute("SELECT state, COUNT(*) FROM chunks GROUP BY state").fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def backlog(self) -> tuple[dict[str, int], float | None]:
        """Unfinished rows per state and when the oldest of them was committed (epoch
        seconds); an index range, however long the ledger's history."""
        db = self._db()
        rows = db.execute(
            "SELECT state, COUNT(*), MIN(created) FROM chunks WHERE state IN (?, ?) GROUP BY state",
            UNFINISHED,
        ).fetchall()
        counts = {state: 0 for state in UNFINISHED} | {r[0]: int(r[1]) for r in rows}
        oldest = min((float(r[2]) for r in rows), default=None)
        return counts, oldest

    def pending_bytes(self) -> int:
        """Bytes of chunk files still waiting for upload (the spool's bounded size)."""
        row = (
            self._db()
            .execute("SELECT COALESCE(SUM(size_bytes), 0) FROM chunks WHERE state = ?", (WRITTEN,))
            .fetchone()
        )
        return int(row[0])

    def finalize(self, chunk_id: str, fold: Fold) -> Manifest | None:
        """The manifest to announce, decided once and kept: the chunks evicted or lost just
        before it are folded in (``fold``) the first time, and every later call (a retried
        XADD whose first reply was lost, a restart) gets the very same manifest, even if
        more evictions happened meanwhile; a second, different manifest for the chunk would
        be refused by the cloud as a replay. None unless the chunk is uploaded."""
        with self._tx() as db:
            row = db.execute(
                "SELECT manifest, final FROM chunks WHERE chunk_id = ? AND state = ?",
                (chunk_id, UPLOADED),
            ).fetchone()
            if row is None:
                return None
            manifest = Manifest.model_validate_json(row[0])
            if row[1]:
                return manifest
            gap, count = self.evicted_run_before(manifest.camera_id, manifest.seq)
            manifest = fold(manifest, gap, count)
            db.execute(
                "UPDATE chunks SET manifest = ?, final = 1 WHERE chunk_id = ?",
                (_row_json(manifest), chunk_id),
            )
        return manifest

    def evicted_run_before(self, camera_id: str, seq: int) -> tuple[float, int]:
        """Seconds and count of chunks evicted or lost immediately before ``seq``.

        Derived at announce time from the ledger, so a gap caused by an eviction
        lands in the next manifest without rewriting anything already stored.
        """
        # Walked lazily down the (camera_id, seq) index: only the run itself is read.
        rows = self._db().execute(
            "SELECT seq, state, manifest FROM chunks WHERE camera_id = ? AND seq < ? "
            "ORDER BY seq DESC",
            (camera_id, seq),
        )
        gap, count, expected = 0.0, 0, seq - 1
        for row_seq, state, doc in rows:
            if row_seq != expected or state not in (EVICTED, LOST):
                break
            kept = json.loads(doc)  # a tombstone (or a whole manifest, from older versions)
            whole = kept.get("media_duration_s", 0.0) + kept.get("gap_before_s", 0.0)
            gap += kept.get("span_s", whole)
            count += 1
            expected -= 1
        return gap, count

    # -- state changes ----------------------------------------------------------

    def claim(self, chunk_id: str) -> Record | None:
        """Reserve a chunk for delivery; None when it is not waiting any more (announced,
        evicted) or another worker holds it. Decided under the same lock as eviction: a
        claimed chunk is never evicted, an evicted one is never claimed."""
        with self._busy_lock:
            if chunk_id in self._busy:
                return None
            rec = self.get(chunk_id)
            if rec is None or rec.state not in UNFINISHED:
                return None
            self._busy.add(chunk_id)
            return rec

    def release(self, chunk_id: str) -> None:
        with self._busy_lock:
            self._busy.discard(chunk_id)

    def mark_uploaded(self, chunk_id: str) -> None:
        """In S3 now (the manifest lives in the ledger): the file goes. Unlinked whenever
        the row is past ``written``, so a retry after a failed unlink still frees it."""
        self._set_state(chunk_id, UPLOADED, WRITTEN)
        found = self.state(chunk_id)
        if found is not None and found[0] != WRITTEN:
            found[1].unlink(missing_ok=True)

    def mark_announced(self, chunk_id: str) -> None:
        """Announced: done. Also raises the camera's announced high-water mark, which tells
        the pruner which gaps have been declared."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE chunks SET state = ?, updated = ? WHERE chunk_id = ? AND state = ? "
                "RETURNING camera_id, seq",
                (ANNOUNCED, time.time(), chunk_id, UPLOADED),
            )
            for camera_id, seq in cur.fetchall():
                db.execute(
                    "UPDATE cameras SET announced_seq = MAX(COALESCE(announced_seq, -1), ?) "
                    "WHERE camera_id = ?",
                    (seq, camera_id),
                )

    def mark_lost(self, chunk_id: str) -> Record | None:
        """A waiting chunk whose file vanished or changed on disk: lost (a declared gap, like
        an eviction), never retried for ever. What is left of the file is quarantined.
        Returns the chunk as it was, or None if it was not waiting."""
        rec = self.get(chunk_id)
        if rec is None or rec.state != WRITTEN or not self._gone(rec, LOST):
            return None
        if rec.path.exists():
            self.quarantine(rec.path)
        return rec

    def _gone(self, rec: Record, state: str) -> bool:
        """``written`` → evicted or lost, keeping only the row's tombstone."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE chunks SET state = ?, updated = ?, manifest = ? "
                "WHERE chunk_id = ? AND state = ?",
                (state, time.time(), _tombstone(rec.manifest), rec.chunk_id, WRITTEN),
            )
        return bool(cur.rowcount)

    def _set_state(self, chunk_id: str, state: str, expected: str) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE chunks SET state = ?, updated = ? WHERE chunk_id = ? AND state = ?",
                (state, time.time(), chunk_id, expected),
            )
        return bool(cur.rowcount)

    def prune(self, older_than: float, batch: int = 1000, batches: int = 10) -> tuple[int, bool]:
        """Delete finished rows committed before ``older_than`` (epoch seconds), in at most
        ``batches`` transactions of ``batch`` rows, so one call never holds the ledger for
        long. Returns (rows deleted, whether more may be left). An evicted or lost row goes
        only once a later chunk of its camera was announced (the manifest that declared its
        gap); seq and timelines live in the cameras table and are never pruned."""
        deleted, budget, more = 0, batches, False
        for sql in (_PRUNE_GAPS, _PRUNE_ANNOUNCED):
            while True:
                if budget == 0:
                    more = True
                    break
                budget -= 1
                with self._tx() as db:
                    n = db.execute(sql, (older_than, batch)).rowcount
                deleted += n
                if n < batch:
                    break
        return deleted, more

    # -- limits -----------------------------------------------------------------

    def has_room(self) -> bool:
        """May capture open another chunk file? Not once free disk is under half the
        margin: eviction keeps it above the margin while the ledger works, so this only
        happens when it cannot (a ledger held elsewhere, a disk filled by something else),
        and the disk must not fill up with chunks nobody can commit. (Any thread.)"""
        margin = self.limits.min_free_bytes // 2
        return margin == 0 or shutil.disk_usage(self.root).free >= margin

    def _over_limits(self) -> bool:
        free = shutil.disk_usage(self.root).free
        used = self.pending_bytes() + self.quarantine_bytes()
        return used > self.limits.max_bytes or free < self.limits.min_free_bytes

    def enforce_limits(self, newest: str | None = None, freed: Freed | None = None) -> Freed:
        """Until under the byte limit and above the free-disk margin: drop quarantined
        files first (oldest first; they can never be uploaded), then evict chunks by
        policy, never one claimed for delivery. What goes is added to ``freed`` as it goes,
        so a caller that retries after a failure still reports every eviction."""
        freed = Freed() if freed is None else freed
        with self._busy_lock:
            while self._over_limits():
                pruned = self._drop_quarantined("spool_limit")
                if pruned is not None:
                    freed.pruned.append(pruned)
                    continue
                victim = self._victim(newest)
                rec = None if victim is None else self.get(victim)
                if rec is None:
                    break
                if self._gone(rec, EVICTED):
                    freed.evicted.append(rec)
                    rec.path.unlink(missing_ok=True)
        return freed

    def _victim(self, newest: str | None) -> str | None:
        """The next chunk to evict (the caller holds the busy lock)."""
        if self.limits.policy == "newest" and newest is not None:
            found = self.state(newest)
            ok = newest not in self._busy and found is not None and found[0] == WRITTEN
            return newest if ok else None
        order = "ASC" if self.limits.policy == "oldest" else "DESC"
        for (chunk_id,) in self._db().execute(
            f"SELECT chunk_id FROM chunks WHERE state = ? ORDER BY created {order}",  # noqa: S608
            (WRITTEN,),
        ):
            if chunk_id not in self._busy:
                return str(chunk_id)
        return None

    # -- quarantine -------------------------------------------------------------

    def quarantine(self, path: Path) -> Path:
        """Keep a file that cannot be uploaded for inspection; its age counts from now."""
        dst = self.quarantine_dir / path.name
        n = 0
        while dst.exists():
            n += 1
            dst = self.quarantine_dir / f"{path.name}.{n}"
        os.replace(path, dst)
        os.utime(dst)
        fsync_dir(self.quarantine_dir)
        return dst

    def _quarantined(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every quarantined file, oldest first."""
        out = []
        for entry in os.scandir(self.quarantine_dir):
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat()
                out.append((st.st_mtime, st.st_size, Path(entry.path)))
        return sorted(out)

    def quarantine_bytes(self) -> int:
        return sum(size for _, size, _ in self._quarantined())

    def _drop_quarantined(self, reason: str) -> Pruned | None:
        files = self._quarantined()
        if not files:
            return None
        _, size, path = files[0]
        path.unlink(missing_ok=True)
        return Pruned(path.name, size, reason)

    def prune_quarantine(
        self, now: float | None = None, out: list[Pruned] | None = None
    ) -> list[Pruned]:
        """Remove quarantined files past their age limit, then the oldest until the
        quarantine is within its own byte limit (added to ``out`` as they go)."""
        now = time.time() if now is None else now
        out = [] if out is None else out
        files = self._quarantined()
        total = sum(size for _, size, _ in files)
        for mtime, size, path in files:
            if now - mtime > self.limits.quarantine_max_age_s:
                reason = "age"
            elif total > self.limits.quarantine_max_bytes:
                reason = "bytes"
            else:
                continue
            path.unlink(missing_ok=True)
            total -= size
            out.append(Pruned(path.name, size, reason))
        return out

    # -- recovery ---------------------------------------------------------------

    def recover(
        self,
        make_manifest: ManifestFactory,
        out: Recovered | None = None,
        partials: list[Path] | None = None,
    ) -> Recovered:
        """After a crash: finish interrupted renames, salvage partial chunks (``partials``,
        by default every file in tmp/), quarantine the rest, and remove the files that
        finished rows left behind. Findings are added to ``out`` as they are made, so a
        caller that retries after a failure still reports them all.

        A ``written`` row whose file is gone is marked ``lost`` (a gap the next
        manifest reports) rather than uploaded as if it were good.
        """
        out = Recovered() if out is None else out
        found = self.partials() if partials is None else partials
        partials_by_name = {p.name: p for p in found if p.exists()}
        for chunk_id in self.unfinished():
            rec = self.get(chunk_id)
            if rec is None or rec.state != WRITTEN or rec.path.exists():
                continue
            partial = self._partial_for(rec, partials_by_name)
            if partial is not None:
                os.replace(partial, rec.path)
                del partials_by_name[partial.name]
                out.renamed += 1
            elif self._gone(rec, LOST):
                out.lost.append(rec)
        for path in sorted(partials_by_name.values()):
            self._salvage(path, make_manifest, out)
        self._sweep(out)
        return out

    def partials(self) -> list[Path]:
        """The chunk files in tmp/ now: what a crash left (before capture starts again)."""
        return sorted(p for p in self.tmp_dir.glob("*.partial") if p.is_file())

    def _salvage(self, path: Path, make_manifest: ManifestFactory, out: Recovered) -> None:
        try:
            chunk = salvage(path)
            if chunk is not None:
                _, freed = self.commit(chunk, make_manifest)
                out.freed.evicted += freed.evicted
                out.freed.pruned += freed.pruned
                out.salvaged += 1
                return
        except sqlite3.Error:
            raise  # the ledger's trouble, not the file's: recovery is retried
        except Exception as exc:  # a file that breaks the salvage must not stop every start
            out.errors.append((path.name, repr(exc)[:300]))
        if path.exists():
            self.quarantine(path)
            out.quarantined += 1

    def _sweep(self, out: Recovered) -> None:
        """Chunk files whose row is finished are deleted (``mark_uploaded`` commits before
        it unlinks; a crash between leaves the file); files no row knows are quarantined."""
        for cam_dir in self.root.iterdir():
            if not cam_dir.is_dir() or cam_dir.name in RESERVED_DIRS:
                continue
            for path in cam_dir.glob("*.mp4"):
                match = _CHUNK_FILE.match(path.name)
                found = self.state(match.group(1)) if match else None
                if found is None or found[1] != path:
                    self.quarantine(path)
                    out.orphaned += 1
                elif found[0] != WRITTEN:
                    path.unlink(missing_ok=True)
                    out.removed += 1

    def _partial_for(self, rec: Record, partials: dict[str, Path]) -> Path | None:
        for p in partials.values():
            if p.name.startswith(rec.manifest.camera_id + "+") and (
                fsync_and_hash(p)[0] == rec.manifest.sha256
            ):
                return p
        return None
