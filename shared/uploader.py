"""Chunk uploads to S3: streamed from disk, integrity-checked, optionally rate-limited.

Below the multipart threshold a chunk goes in one PUT; above it, in parts sent
one at a time. Bodies are streamed from the file (a seekable view of the byte
range), never read whole into memory, so memory per upload stays a few read
buffers whatever the chunk or part size. Every PUT and part carries a
Content-MD5 (and a CRC32), computed by one streaming pass over the same range
before the request, so the server refuses a body corrupted in transit; the
sha256 travels as object metadata.

``EDGE_UPLOAD_MAX_BPS`` paces the body bytes themselves: aiohttp sends a body
by reading it 64 KiB at a time in a worker thread, and each read waits for its
tokens, so across all uploads at once no more than the cap plus one burst
(``RateLimit.burst``: a tenth of a second's worth, at least one read) leaves in
any interval. Request headers and TLS framing are not counted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import os
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.manifest import Manifest

MIB = 1024 * 1024
ABORT_TIMEOUT_S = 5.0
READ_SIZE = MIB  # per read() while hashing: large enough to amortise the calls


class RateLimit:
    """A token bucket over body bytes, shared by every upload; ``rate`` 0 means unlimited.

    Thread-safe and blocking: it is called from the threads that read request bodies.
    Each caller reserves its bytes (the balance may go negative) and sleeps off the
    debt outside the lock, so concurrent readers queue in order and the total rate
    holds whatever their number."""

    READ = 64 * 1024  # what aiohttp reads per call

    def __init__(self, rate: int, burst: int | None = None) -> None:
        self.rate = rate
        self.burst = burst or max(self.READ, rate // 10)
        self.tokens = float(self.burst)
        self.stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        if self.rate <= 0 or n <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


class FileRange(io.RawIOBase):
    """A read-only, seekable file-like view of ``size`` bytes of a file from ``offset``.

    botocore reads it to sign and checksum the request, seeks back, and aiohttp then
    streams it to the socket in small reads; a retry seeks it back to 0. Nothing holds
    more than one read's worth of it."""

    def __init__(
        self,
        path: Path,
        offset: int,
        size: int,
        rate: RateLimit | None = None,
        on_read: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY)
        self._offset = offset
        self._size = max(0, min(size, os.fstat(self._fd).st_size - offset))
        self._pos = 0
        self._rate = rate  # paces read(), the call that feeds the socket
        self._on_read = on_read  # body bytes are moving: progress, for the stall check

    def __len__(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = min(max(0, base + pos), self._size)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        left = self._size - self._pos
        n = left if size is None or size < 0 else min(size, left)
        if n <= 0:
            return b""
        if self._rate is not None and self._rate.rate > 0:
            # At a low cap a whole 64 KiB read would leave each connection idle for seconds
            # (long enough for a server's idle timeout): send a quarter second's worth.
            n = min(n, max(4096, self._rate.rate // 4))
            self._rate.take(n)
        # pread: no shared file position, so a read never depends on an earlier seek.
        data = os.pread(self._fd, n, self._offset + self._pos)
        self._pos += len(data)
        if self._on_read is not None:
            self._on_read()
        return data

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        got = os.preadv(self._fd, [memoryview(buffer)[:n]], self._offset + self._pos)
        self._pos += got
        return got

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def content_md5(data: bytes) -> str:
    """The Content-MD5 header of a small in-memory body (the manifest sidecar)."""
    return _b64(hashlib.md5(data, usedforsecurity=False).digest())


def _checksums(path: Path, offset: int, size: int) -> dict[str, str]:
    """Content-MD5 and the CRC32 botocore would otherwise add, in one pass over the range
    into one reused buffer (no per-read allocation)."""
    md5, crc = hashlib.md5(usedforsecurity=False), 0
    buf = memoryview(bytearray(READ_SIZE))
    with FileRange(path, offset, size) as body:
        while n := body.readinto(buf):
            md5.update(buf[:n])
            crc = zlib.crc32(buf[:n], crc)
    return {
        "ContentMD5": _b64(md5.digest()),
        # Given here, botocore's default CRC32 is not computed again on the event loop;
        # the request carries the same headers as when botocore computes it.
        "ChecksumAlgorithm": "CRC32",
        "ChecksumCRC32": _b64(crc.to_bytes(4, "big")),
    }


class Uploader:
    def __init__(
        self,
        s3: Any,
        *,
        multipart_threshold: int = 16 * MIB,
        part_size: int = 8 * MIB,
        rate: RateLimit | None = None,
        on_read: Callable[[], None] | None = None,
    ) -> None:
        self.s3 = s3
        self.threshold = multipart_threshold
        self.part_size = part_size
        self.rate = rate or RateLimit(0)
        self.on_read = on_read

    async def _send(self, path: Path, offset: int, size: int, request: Any, **params: Any) -> Any:
        """One PUT or part: its checksums by a streaming pass (in a thread: hashlib and zlib
        release the GIL), then the range itself as the streamed, paced body."""
        checksums = await asyncio.to_thread(_checksums, path, offset, size)
        with FileRange(path, offset, size, self.rate, self.on_read) as body:
            return await request(Body=body, **checksums, **params)

    async def upload(self, path: Path, manifest: Manifest) -> None:
        await self.put_file(
            path,
            manifest.bucket,
            manifest.key,
            manifest.size_bytes,
            "video/mp4",
            {"sha256": manifest.sha256, "chunk-id": manifest.chunk_id},
        )

    async def put_file(
        self,
        path: Path,
        bucket: str,
        key: str,
        size: int,
        content_type: str,
        metadata: dict[str, str],
    ) -> None:
        """The first ``size`` bytes of ``path`` as s3://bucket/key: one PUT below the
        threshold, parts above it."""
        target = {"Bucket": bucket, "Key": key}
        if size <= self.threshold:
            await self._send(
                path,
                0,
                size,
                self.s3.put_object,
                **target,
                ContentType=content_type,
                Metadata=metadata,
            )
            return
        created = await self.s3.create_multipart_upload(
            **target, ContentType=content_type, Metadata=metadata
        )
        upload_id = created["UploadId"]
        try:
            parts = []
            for number, offset in enumerate(range(0, size, self.part_size), start=1):
                resp = await self._send(
                    path,
                    offset,
                    min(self.part_size, size - offset),
                    self.s3.upload_part,
                    **target,
                    UploadId=upload_id,
                    PartNumber=number,
                )
                parts.append({"PartNumber": number, "ETag": resp["ETag"]})
            await self.s3.complete_multipart_upload(
                **target, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            await asyncio.shield(self._abort(bucket, key, upload_id))
            raise

    async def _abort(self, bucket: str, key: str, upload_id: str) -> None:
        """Best effort and bounded (S3 may be unreachable: that may be why we are here);
        a bucket lifecycle rule for incomplete multipart uploads cleans up what is left."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id),
                ABORT_TIMEOUT_S,
            )
