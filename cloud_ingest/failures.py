"""What a failed attempt means: the chunk's problem, a passing fault, our environment, or
our own bug.

- ``Rejected`` never reaches here: it is dead-lettered at once with its reason.
- A media time limit (``ProcessTimeout``) or a worker that died is a failed attempt.
- S3, credential, connection and Redis errors *may* be the environment's: a probe of the
  consumer's own access decides (``EnvProbe``), never one chunk's error. When the probe
  fails the consumer pauses and gives its entries back uncounted; when it passes, the
  error was that chunk's (one object with a bad ACL) and counts as a failed attempt.
- Anything else is an internal error: our bug. Logged with its traceback, counted,
  retried like a failed attempt and finally dead-lettered as ``internal_error`` with the
  exception's type, so ``dlq requeue --reason internal_error`` replays them after a fix.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable
from typing import Any

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError
from redis.exceptions import RedisError

from cloud_ingest.media_pool import (
    MediaPool,
    ProcessTimeout,
    WorkerDied,
    WorkerError,
    WorkerStartFailed,
)

# Concurrent failures share one probe; a result is reused for this long.
PROBE_REUSE_S = 2.0
PROBE_TIMEOUT_S = 10.0


# Errors of S3 (BotoCoreError: missing credentials, endpoint, connection and read
# timeouts), Redis, HTTP and the OS (TimeoutError included), and a media worker that
# cannot start: any of these may be the environment's.
SUSPECTS = (
    ClientError,
    BotoCoreError,
    RedisError,
    aiohttp.ClientError,
    OSError,
    WorkerStartFailed,
)


class Failure(enum.Enum):
    TIMEOUT = "process_timeout"  # the dead-letter reason after the last attempt
    TRANSIENT = "max_deliveries"
    SUSPECT = "suspect"  # environment or chunk: the probe decides
    INTERNAL = "internal_error"


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, ProcessTimeout):
        return Failure.TIMEOUT
    if isinstance(exc, WorkerDied):
        return Failure.TRANSIENT
    if isinstance(exc, WorkerError):
        return Failure.INTERNAL
    if isinstance(exc, SUSPECTS):
        return Failure.SUSPECT
    return Failure.INTERNAL


def error_type(exc: BaseException) -> str:
    """The exception's type as a dead letter names it (a worker's error: the original)."""
    return exc.kind if isinstance(exc, WorkerError) else type(exc).__name__


class EnvProbe:
    """Can this consumer reach what every chunk needs? ``HeadBucket`` on the raw and output
    buckets, a Redis ``PING``, and a media worker that starts. Returns None when sound,
    else what failed. At most one probe at a time; a recent result is reused."""

    def __init__(self, s3: Any, redis: Any, buckets: list[str], pool: MediaPool) -> None:
        self.s3 = s3
        self.redis = redis
        self.buckets = buckets
        self.pool = pool
        self._last: tuple[float, str | None] | None = None
        self._running: asyncio.Future[str | None] | None = None

    async def check(self, *, fresh: bool = False) -> str | None:
        if not fresh and self._last and time.monotonic() - self._last[0] < PROBE_REUSE_S:
            return self._last[1]
        if self._running is None:
            self._running = asyncio.ensure_future(self._probe())
            self._running.add_done_callback(self._done)
        return await asyncio.shield(self._running)

    def _done(self, future: asyncio.Future[str | None]) -> None:
        self._running = None
        if not future.cancelled() and future.exception() is None:
            self._last = (time.monotonic(), future.result())

    async def _probe(self) -> str | None:
        for bucket in self.buckets:
            if problem := await _attempt(
                f"s3 HeadBucket {bucket}", self.s3.head_bucket(Bucket=bucket)
            ):
                return problem
        if problem := await _attempt("redis PING", self.redis.ping()):
            return problem
        return await self.pool.check()


async def _attempt(what: str, call: Awaitable[Any]) -> str | None:
    try:
        await asyncio.wait_for(call, PROBE_TIMEOUT_S)
    except Exception as exc:
        return f"{what}: {type(exc).__name__}: {exc}"[:500]
    return None
