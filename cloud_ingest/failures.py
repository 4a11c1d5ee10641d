"""What a failed attempt means: the chunk's problem, a passing fault, our environment, or
our own bug.

- ``Rejected`` never reaches here: it is dead-lettered at once with its reason.
- A media time limit (``ProcessTimeout``) or a worker that died is a failed attempt.
- Redis refusing what every chunk needs (maxmemory ``OOM``, a ``READONLY`` replica after a
  failover, ``NOPERM`` from ACL drift, a password no longer accepted) is the environment's
  whatever the chunk: the consumer pauses at once, uncounted, and never dead-letters.
- Other S3, credential, connection and Redis errors *may* be the environment's: a probe of
  the consumer's own access decides (``EnvProbe``: it writes and reads back, not only
  pings), never one chunk's error. When the probe fails the consumer pauses and gives its
  entries back uncounted; when it passes, the error was that chunk's (one object with a
  bad ACL) and counts as a failed attempt, unless the raw reads of several chunks in a row
  fail alike (``ReadBreaker``): then it is this consumer's access after all.
- Anything else is an internal error: our bug. Logged with its traceback, counted,
  retried like a failed attempt and finally dead-lettered as ``internal_error`` with the
  exception's type, so ``dlq requeue --reason internal_error`` replays them after a fix.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
)

from cloud_ingest.media_pool import (
    START_TIMEOUT_S,
    MediaPool,
    ProcessTimeout,
    WorkerDied,
    WorkerError,
    WorkerStartFailed,
)
from cloud_ingest.objects import get_bounded
from shared.s3 import is_not_found

# Concurrent failures share one probe; a result is reused for this long.
PROBE_REUSE_S = 2.0
PROBE_TIMEOUT_S = 10.0


class RawReadFailed(Exception):
    """The GET of a chunk's raw object failed with an S3 error other than "no such key"."""

    def __init__(self, code: str, bucket: str, key: str) -> None:
        super().__init__(f"s3 GetObject s3://{bucket}/{key}: {code}")
        self.code = code
        self.bucket = bucket
        self.key = key


# Redis errors no chunk can cause: every chunk would meet them.
ENVIRONMENT = (OutOfMemoryError, ReadOnlyError, NoPermissionError, AuthenticationError)

# Errors of S3 (BotoCoreError: missing credentials, endpoint, connection and read
# timeouts), Redis, HTTP and the OS (TimeoutError included), and a media worker that
# cannot start: any of these may be the environment's.
SUSPECTS = (
    ClientError,
    BotoCoreError,
    RawReadFailed,
    RedisError,
    aiohttp.ClientError,
    OSError,
    WorkerStartFailed,
)


class Failure(enum.Enum):
    TIMEOUT = "process_timeout"  # the dead-letter reason after the last attempt
    TRANSIENT = "max_deliveries"
    SUSPECT = "suspect"  # environment or chunk: the probe decides
    ENVIRONMENT = "environment"  # never the chunk's: pause
    INTERNAL = "internal_error"


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, ProcessTimeout):
        return Failure.TIMEOUT
    if isinstance(exc, WorkerDied):
        return Failure.TRANSIENT
    if isinstance(exc, WorkerError):
        return Failure.INTERNAL
    if isinstance(exc, ENVIRONMENT):
        return Failure.ENVIRONMENT
    if isinstance(exc, SUSPECTS):
        return Failure.SUSPECT
    return Failure.INTERNAL


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def error_type(exc: BaseException) -> str:
    """The exception's type as a dead letter names it (a worker's error: the original)."""
    return exc.kind if isinstance(exc, WorkerError) else type(exc).__name__


class ReadBreaker:
    """``threshold`` distinct chunks in a row whose raw GET failed with the same S3 error
    code while the probe passed: not those chunks but this consumer's access (a policy that
    lets it list the bucket but not read it, a KMS key it may not use), which HeadBucket
    cannot see. Any raw read that succeeds starts the count again, and is remembered: the
    paused consumer's probe reads that object again (or one another consumer of the group
    read lately: ``ChunkProcessor.readable_object``), so chunks that are bad on their own
    (three objects with a broken ACL) cannot keep it paused."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.code: str | None = None
        self.chunks: set[bytes] = set()
        self.last_read: tuple[str, str] | None = None  # (bucket, key) last read fine

    def failed(self, entry_id: bytes, exc: RawReadFailed) -> bool:
        """Note a failed read; True when that makes ``threshold`` in a row."""
        if exc.code != self.code:
            self.code, self.chunks = exc.code, set()
        self.chunks.add(entry_id)
        return len(self.chunks) >= self.threshold

    def succeeded(self, bucket: str, key: str) -> None:
        self.reset()
        self.last_read = (bucket, key)

    def reset(self) -> None:
        self.code, self.chunks = None, set()


@dataclass(frozen=True, slots=True)
class Canary:
    """What the probe writes and reads back: an object under the output prefix, a key;
    and the consumer's totals hash, which every acknowledgement adds to (a key of another
    type there fails every flush)."""

    bucket: str
    key: str
    redis_key: str
    totals_key: str
    body: bytes = b"cloud-ingest environment probe\n"


class EnvProbe:
    """Can this consumer do what every chunk needs? ``HeadBucket`` on the raw and output
    buckets; with a ``canary``, a PUT and a GET of a small object in the output bucket and
    a Redis write (``SET … PX``: a Redis that answers PING can still refuse every write)
    and a look at the totals hash (``HEXISTS``), else a Redis ``PING``; a read of
    ``raw_canary`` (see ReadBreaker) while one is set; and a media worker that starts.
    Returns None when sound, else what failed. At most one probe at a time; a recent
    result is reused."""

    def __init__(
        self,
        s3: Any,
        redis: Any,
        buckets: list[str],
        pool: MediaPool,
        *,
        canary: Canary | None = None,
    ) -> None:
        self.s3 = s3
        self.redis = redis
        self.buckets = buckets
        self.pool = pool
        self.canary = canary
        self.raw_canary: tuple[str, str] | None = None  # (bucket, key)
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
        for what, call, limit_s in self._checks():
            if problem := await _attempt(what, call(), limit_s):
                return problem
        return None

    def _checks(self) -> list[tuple[str, Callable[[], Awaitable[Any]], float]]:
        """What the probe tries, in order: (what, the call, its time limit)."""
        checks: list[tuple[str, Callable[[], Awaitable[Any]], float]] = [
            (f"s3 HeadBucket {b}", partial(self.s3.head_bucket, Bucket=b), PROBE_TIMEOUT_S)
            for b in self.buckets
        ]
        canary = self.canary
        if canary is not None:
            where = f"s3://{canary.bucket}/{canary.key}"
            checks.append((f"s3 canary {where}", partial(self._s3_canary, canary), PROBE_TIMEOUT_S))
        if self.raw_canary is not None:
            bucket, key = self.raw_canary
            read = partial(self._raw_read, bucket, key)
            checks.append((f"s3 GetObject s3://{bucket}/{key}", read, PROBE_TIMEOUT_S))
        if canary is None:
            checks.append(("redis PING", self.redis.ping, PROBE_TIMEOUT_S))
        else:
            stamp = str(time.time())
            write = partial(self.redis.set, canary.redis_key, stamp, px=60_000)
            look = partial(self.redis.hexists, canary.totals_key, "-")
            checks.append((f"redis SET {canary.redis_key}", write, PROBE_TIMEOUT_S))
            checks.append((f"redis HEXISTS {canary.totals_key}", look, PROBE_TIMEOUT_S))
        # A worker's start may take START_TIMEOUT_S; one that cannot even be tried (no
        # file descriptors left) is a problem found, not an error escaping the probe.
        checks.append(("media worker", self._pool_check, START_TIMEOUT_S + 5.0))
        return checks

    async def _pool_check(self) -> None:
        if problem := await self.pool.check():
            raise RuntimeError(problem)

    async def _s3_canary(self, canary: Canary) -> None:
        await self.s3.put_object(Bucket=canary.bucket, Key=canary.key, Body=canary.body)
        back = await get_bounded(self.s3, canary.bucket, canary.key, len(canary.body))
        if back != canary.body:
            raise ValueError(f"read back {len(back)} bytes that differ from those written")

    async def _raw_read(self, bucket: str, key: str) -> None:
        """One byte of the object, as a chunk's download would read it (a KMS-encrypted
        object is decrypted for it); an object since deleted proves the read is allowed."""
        try:
            resp = await self.s3.get_object(Bucket=bucket, Key=key, Range="bytes=0-0")
        except ClientError as exc:
            if is_not_found(exc):
                return
            raise
        async with resp["Body"] as body:
            await body.read()


async def _attempt(what: str, call: Awaitable[Any], limit_s: float = PROBE_TIMEOUT_S) -> str | None:
    try:
        await asyncio.wait_for(call, limit_s)
    except Exception as exc:
        return f"{what}: {describe(exc)}"[:500]
    return None
