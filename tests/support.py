"""Helpers for tests on real servers: daemons as subprocesses, S3 and Redis inspection."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from shared.keys import dlq_stream
from shared.s3 import open_s3

BIN = Path(sys.executable).parent
SECRET = "test-signing-secret"
KEY_ID = "k1"


@dataclass
class Stack:
    redis_url: str
    s3_endpoint: str
    ray_address: str
    raw_bucket: str
    out_bucket: str
    workdir: Path

    def edge_env(self, cameras: list[dict[str, str]], **extra: str) -> dict[str, str]:
        env = {
            "EDGE_DEVICE_ID": "dev-1",
            "EDGE_SITE_ID": "site-1",
            "EDGE_CAMERAS": json.dumps(cameras),
            "EDGE_SEGMENT_SECONDS": "2",
            "EDGE_SPOOL_DIR": str(self.workdir / "spool"),
            "EDGE_S3_ENDPOINT_URL": self.s3_endpoint,
            "EDGE_S3_BUCKET": self.raw_bucket,
            "EDGE_REDIS_URL": self.redis_url,
            "EDGE_STREAM": "chunks",
            "EDGE_SIGNING_KEY_ID": KEY_ID,
            "EDGE_SIGNING_KEY": SECRET,
            "EDGE_LOG_FORMAT": "json",
        }
        return {**base_env(), **env, **extra}

    def ingest_env(self, **extra: str) -> dict[str, str]:
        env = {
            "INGEST_REDIS_URL": self.redis_url,
            "INGEST_STREAM": "chunks",
            "INGEST_GROUP": "ingest",
            "INGEST_S3_ENDPOINT_URL": self.s3_endpoint,
            "INGEST_OUTPUT_BUCKET": self.out_bucket,
            "INGEST_OUTPUT_PREFIX": "processed",
            "INGEST_CONSUMERS": "2",
            "INGEST_VISIBILITY_TIMEOUT_S": "10",
            "INGEST_MAX_DELIVERIES": "3",
            "INGEST_KEYRING": json.dumps({KEY_ID: SECRET}),
            "INGEST_ACTOR_CPUS": "0.25",
            "INGEST_LOG_FORMAT": "json",
            "RAY_ADDRESS": self.ray_address,
        }
        return {**base_env(), **env, **extra}


def base_env() -> dict[str, str]:
    keep = {
        k: v for k, v in os.environ.items() if not k.startswith(("EDGE_", "INGEST_", "RAY_ADDRESS"))
    }
    return {
        **keep,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    }


class Daemon:
    """A daemon under test, run as its own process exactly as systemd would run it."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = log.open("wb")
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        return log_events(self.log, name)

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._fh.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._fh.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def log_events(path: Path, name: str) -> list[dict[str, Any]]:
    """The JSON log lines with ``event == name`` (Ray prefixes actor lines; skip to the '{')."""
    out = []
    for raw in path.read_text(errors="replace").splitlines():
        start = raw.find("{")
        if start < 0:
            continue
        try:
            doc = json.loads(raw[start:])
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("event") == name:
            out.append(doc)
    return out


def edge_agent(stack: Stack, cameras: list[dict[str, str]], log: Path, **extra: str) -> Daemon:
    return Daemon([str(BIN / "edge-agent"), "run"], stack.edge_env(cameras, **extra), log)


def cloud_ingest(stack: Stack, log: Path, **extra: str) -> Daemon:
    return Daemon([str(BIN / "cloud-ingest"), "run"], stack.ingest_env(**extra), log)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class S3:
    """Thin async helper over a real aiobotocore client."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._stack = AsyncExitStack()
        self.client: Any = None

    async def __aenter__(self) -> S3:
        os.environ.update({k: v for k, v in base_env().items() if k.startswith("AWS_")})
        self.client = await open_s3(self._stack, self.endpoint, "us-east-1")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def keys(self, bucket: str, prefix: str = "") -> list[str]:
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(keys)

    async def get(self, bucket: str, key: str) -> bytes:
        resp = await self.client.get_object(Bucket=bucket, Key=key)
        async with resp["Body"] as body:
            data: bytes = await body.read()
        return data

    async def put(self, bucket: str, key: str, data: bytes) -> None:
        await self.client.put_object(Bucket=bucket, Key=key, Body=data)

    async def records(self, bucket: str) -> list[dict[str, Any]]:
        keys = await self.keys(bucket, "processed/records/")
        return [json.loads(await self.get(bucket, k)) for k in keys]


async def queue_state(
    redis_url: str, stream: str = "chunks", group: str = "ingest"
) -> dict[str, Any]:
    client = aioredis.from_url(redis_url)
    try:
        from shared.queue import status

        st = await status(client, stream, group)
        letters = await client.xrange(dlq_stream(stream))
    finally:
        await client.aclose()
    return {
        "length": st.length,
        "pending": st.pending,
        "dlq": st.dlq,
        "dlq_reasons": [f[b"reason"].decode() for _, f in letters],
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def segment_file(
    clip: Path, out: Path, seconds: float, *, loop: bool = False, limit: int = 0
) -> list[Any]:
    """Cut a clip into chunks as the agent would, without real-time pacing."""
    import threading

    from edge_agent.capture import Source, SourceSpec
    from edge_agent.segmenter import ClosedChunk, Segmenter

    chunks: list[ClosedChunk] = []
    source = Source(f"file://{clip}", 5, threading.Event())
    source.spec = SourceSpec(source.spec.target, {}, realtime=False, loop=loop)
    seg = Segmenter("cam1", source.stream, out, seconds, chunks.append)
    for n, pkt in enumerate(source.packets()):
        if limit and n >= limit:
            break
        seg.feed(pkt)
    seg.flush()
    source.close()
    return chunks
