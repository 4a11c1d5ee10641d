"""Chunk uploads to S3.

The body is sent with a Content-MD5 so the server rejects a corrupted transfer,
and the sha256 travels as object metadata for the cloud to check.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path
from typing import Any

from shared.manifest import Manifest


async def upload(s3: Any, path: Path, manifest: Manifest) -> None:
    body = await asyncio.to_thread(path.read_bytes)
    md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
    await s3.put_object(
        Bucket=manifest.bucket,
        Key=manifest.key,
        Body=body,
        ContentMD5=md5,
        ContentType="video/mp4",
        Metadata={"sha256": manifest.sha256, "chunk-id": manifest.chunk_id},
    )
