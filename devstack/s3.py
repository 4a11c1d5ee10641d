"""A thin async helper over a real aiobotocore client, for the demo and the tests."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from typing import Any

from shared.s3 import open_s3


class S3:
    """Thin async helper over a real aiobotocore client."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._stack = AsyncExitStack()
        self.client: Any = None

    async def __aenter__(self) -> S3:
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

    async def chunk_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Raw chunk objects only (not the signed manifests stored beside them)."""
        return [k for k in await self.keys(bucket, prefix) if k.endswith(".mp4")]
