"""Commit: each closed chunk gets its ledger row and its final name, in capture order.

Camera threads hand closed chunks to the loop (``chunk_closed``) and never wait for
SQLite; one committer task records them through the ledger thread. A failed step
of the ledger or the disk is retried (``Ledger.retry``); a step that worked is not
repeated on a retry (a recorded chunk is remembered, so it never gets a second
row). Anything else is a bug: the chunk goes back on the queue and the exception
ends the task, which its supervisor logs and restarts; a chunk that keeps failing
is quarantined (and its row, if it had one, marked lost) rather than blocking the
queue for ever.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import structlog

from edge_agent.config import EdgeSettings
from edge_agent.health import Progress
from edge_agent.ledger import Ledger
from edge_agent.metrics import EdgeMetrics
from edge_agent.publisher import build_manifest
from edge_agent.segmenter import ClosedChunk
from edge_agent.spool import Freed, Position
from shared.manifest import Manifest

log = structlog.get_logger("edge_agent")

ATTEMPTS = 3  # failures of one chunk (other than the ledger's own) before it is quarantined


class Committer:
    def __init__(
        self,
        settings: EdgeSettings,
        metrics: EdgeMetrics,
        ledger: Ledger,
        progress: Progress,
        report: Callable[[Freed], None],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.ledger = ledger
        self.spool = ledger.spool
        self.progress = progress
        self.report = report  # evictions and pruned quarantine files, logged and counted
        self.closed: asyncio.Queue[ClosedChunk] = asyncio.Queue()
        self.committed: asyncio.Queue[str] | None = None  # delivery's queue, once it runs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._current: ClosedChunk | None = None
        self._recorded: dict[Path, Manifest] = {}  # recorded, not yet placed
        self._failures: Counter[Path] = Counter()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def waiting(self) -> int:
        return self.closed.qsize() + (self._current is not None)

    def chunk_closed(self, chunk: ClosedChunk) -> None:
        """Called on a camera thread: hand the chunk to the loop."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.closed.put_nowait, chunk)

    async def run(self, committed: asyncio.Queue[str]) -> None:
        self.committed = committed
        while True:
            chunk = self._current = await self.closed.get()
            try:
                await self._commit(chunk)
            except Exception:
                if not await self._give_up(chunk):
                    self.closed.put_nowait(chunk)  # tried again; its file is still in tmp/
                raise
            finally:
                self._current = None
                self.closed.task_done()

    async def _commit(self, chunk: ClosedChunk) -> None:
        """Row, final name, limits: each step retried until the ledger and the disk allow
        it (a failed row transaction leaves nothing behind)."""
        manifest = self._recorded.get(chunk.path)
        if manifest is None:
            manifest = await self.ledger.retry("record", self.spool.record, chunk, self.manifest)
            self._recorded[chunk.path] = manifest
        await self.ledger.retry("place", self.spool.place, chunk, manifest)
        del self._recorded[chunk.path]
        self._failures.pop(chunk.path, None)
        self.metrics.written.labels(chunk.camera_id).inc()
        self.metrics.footage(manifest)
        self.progress.moved("commit")
        assert self.committed is not None
        self.committed.put_nowait(manifest.chunk_id)
        freed = Freed()
        try:
            await self.ledger.retry(
                "enforce_limits", self.spool.enforce_limits, manifest.chunk_id, freed
            )
        finally:
            self.report(freed)

    async def _give_up(self, chunk: ClosedChunk) -> bool:
        """After ATTEMPTS failures: quarantine the chunk (a declared loss) and move on."""
        self._failures[chunk.path] += 1
        if self._failures[chunk.path] < ATTEMPTS:
            return False
        del self._failures[chunk.path]
        manifest = self._recorded.pop(chunk.path, None)
        if manifest is not None:
            await self.ledger.retry("mark_lost", self.spool.mark_lost, manifest.chunk_id)
        if chunk.path.exists():
            await self.ledger.retry("quarantine", self.spool.quarantine, chunk.path)
        self.metrics.quarantined.labels("commit_failed").inc()
        log.error(
            "chunk",
            outcome="quarantined",
            reason=f"commit failed {ATTEMPTS} times",
            camera_id=chunk.camera_id,
            file=chunk.path.name,
            chunk_id=None if manifest is None else manifest.chunk_id,
        )
        return True

    def manifest(self, chunk: ClosedChunk, seq: int, prev: Position) -> Manifest:
        return build_manifest(self.settings, chunk, seq, prev)
