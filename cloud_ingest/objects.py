"""Reading objects whose size someone else decides: bounded before and while reading.

A compromised box can upload gigabytes and declare a megabyte; a sidecar manifest can
be any size. The ``Content-Length`` is compared first (nothing of the body is read
when it is already wrong), and the body is read in pieces, never more than the bound
plus one byte, whatever the server then sends.
"""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import ClientError

from shared.s3 import is_not_found

READ_PIECE = 1 << 20


class SizeError(Exception):
    def __init__(self, size: int | None, expected: str) -> None:
        seen = "more" if size is None else str(size)
        super().__init__(f"{seen} bytes, expected {expected}")
        self.size = size


async def get_bounded(s3: Any, bucket: str, key: str, limit: int, *, exact: bool = False) -> bytes:
    """The object's bytes: at most ``limit`` (exactly ``limit`` with ``exact``); SizeError
    otherwise, after reading at most ``limit + 1`` bytes of it."""
    expected = f"{limit}" if exact else f"at most {limit}"
    resp = await s3.get_object(Bucket=bucket, Key=key)
    async with resp["Body"] as body:
        length = resp.get("ContentLength")
        if length is not None and (length > limit or (exact and length != limit)):
            raise SizeError(int(length), expected)  # closing the body drops the connection
        data = await _read_at_most(body, limit + 1)
    if len(data) > limit or (exact and len(data) != limit):
        raise SizeError(None if len(data) > limit else len(data), expected)
    return data


async def _read_at_most(body: Any, most: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < most:
        part: bytes = await body.read(min(READ_PIECE, most - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


async def get_json(s3: Any, bucket: str, key: str, limit: int) -> Any:
    """One of our own JSON documents (bounded), or None when there is no such key. Any
    other error (a missing bucket, a refusal) is raised: the caller's probe decides."""
    try:
        raw = await get_bounded(s3, bucket, key, limit)
    except ClientError as exc:
        if is_not_found(exc):
            return None
        raise
    return json.loads(raw)
