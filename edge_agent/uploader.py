"""Chunk uploads to S3: streamed from disk, integrity-checked, optionally rate-limited.

Below the multipart threshold a chunk goes in one PUT; above it, in parts read
one at a time, so memory per upload is bounded by the part size whatever the
chunk size. Every PUT and part carries a Content-MD5, so the server refuses a
body corrupted in transit; the sha256 travels as object metadata.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from pathlib import Path
from typing import Any

from shared.manifest import Manifest

MIB = 1024 * 1024


class RateLimit:
    """A token bucket over bytes; ``rate`` 0 means unlimited. Bursts up to one second's worth."""

    def __init__(self, rate: int, burst: int | None = None) -> None:
        self.rate = rate
        self.capacity = float(burst or rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= min(n, self.capacity):
                    self.tokens -= n  # may go negative for a large n: later callers wait longer
                    return
                await asyncio.sleep((min(n, self.capacity) - self.tokens) / self.rate)


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


async def _read(path: Path, offset: int, size: int) -> bytes:
    def read() -> bytes:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(size)

    return await asyncio.to_thread(read)


class Uploader:
    def __init__(
        self,
        s3: Any,
        *,
        multipart_threshold: int = 16 * MIB,
        part_size: int = 8 * MIB,
        rate: RateLimit | None = None,
    ) -> None:
        self.s3 = s3
        self.threshold = multipart_threshold
        self.part_size = part_size
        self.rate = rate or RateLimit(0)

    async def upload(self, path: Path, manifest: Manifest) -> None:
        if manifest.size_bytes <= self.threshold:
            body = await _read(path, 0, manifest.size_bytes)
            await self.rate.take(len(body))
            await self.s3.put_object(
                Bucket=manifest.bucket,
                Key=manifest.key,
                Body=body,
                ContentMD5=_md5(body),
                ContentType="video/mp4",
                Metadata=_metadata(manifest),
            )
            return
        await self._multipart(path, manifest)

    async def _multipart(self, path: Path, m: Manifest) -> None:
        created = await self.s3.create_multipart_upload(
            Bucket=m.bucket, Key=m.key, ContentType="video/mp4", Metadata=_metadata(m)
        )
        upload_id = created["UploadId"]
        try:
            parts = []
            for number, offset in enumerate(range(0, m.size_bytes, self.part_size), start=1):
                body = await _read(path, offset, self.part_size)
                await self.rate.take(len(body))
                resp = await self.s3.upload_part(
                    Bucket=m.bucket,
                    Key=m.key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                    ContentMD5=_md5(body),
                )
                parts.append({"PartNumber": number, "ETag": resp["ETag"]})
                del body
            await self.s3.complete_multipart_upload(
                Bucket=m.bucket, Key=m.key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            await asyncio.shield(self._abort(m, upload_id))
            raise

    async def _abort(self, m: Manifest, upload_id: str) -> None:
        try:
            await self.s3.abort_multipart_upload(Bucket=m.bucket, Key=m.key, UploadId=upload_id)
        except Exception:  # best effort: lifecycle rules clean up what is left
            return


def _metadata(m: Manifest) -> dict[str, str]:
    return {"sha256": m.sha256, "chunk-id": m.chunk_id}
