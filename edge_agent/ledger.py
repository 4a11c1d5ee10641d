"""The spool's ledger, called from the event loop: every call runs on one thread of its
own, never on the loop (a transaction with ``synchronous=FULL`` fsyncs; a ledger that
another process holds makes a write wait up to ``EDGE_LEDGER_BUSY_TIMEOUT_S``).

One thread also means one connection and one writer: commits, claims and evictions
are serialised, and no camera thread ever waits for SQLite. Failures of the database
or the disk under it ("database is locked", "database or disk is full", an I/O
error) are retried with back-off and counted per operation; anything else is a bug
and propagates to the supervised task that made the call.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog

from edge_agent.metrics import EdgeMetrics
from edge_agent.spool import Spool
from shared.backoff import Backoff

log = structlog.get_logger("edge_agent")
T = TypeVar("T")
LEDGER_ERRORS = (sqlite3.OperationalError, OSError)


class Ledger:
    def __init__(self, spool: Spool, metrics: EdgeMetrics) -> None:
        self.spool = spool
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ledger")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the ledger thread, once."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    async def retry(self, op: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the ledger thread until the database lets it through."""
        backoff = Backoff(base=0.2, cap=10.0)
        while True:
            try:
                return await self.call(fn, *args)
            except LEDGER_ERRORS as exc:
                self.metrics.ledger_retries.labels(op).inc()
                delay = backoff.next()
                log.warning("ledger.retry", op=op, error=str(exc)[:200], retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)

    async def close(self) -> None:
        await self.call(self.spool.close)
        self._pool.shutdown(wait=False)
