"""One chunk, end to end: verify → idempotency check → download → hash → filter → record."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from cloud_ingest.config import IngestSettings
from cloud_ingest.filters import check_integrity
from shared.keys import record_key
from shared.manifest import Manifest, Rejected, SignedManifest, verify_fields
from shared.queue import Entry
from shared.s3 import is_not_found


@dataclass(slots=True)
class Outcome:
    status: str  # "processed" or "duplicate"
    manifest: Manifest
    timings: dict[str, float] = field(default_factory=dict)


class ChunkProcessor:
    def __init__(self, settings: IngestSettings, s3: Any, consumer: str) -> None:
        self.settings = settings
        self.s3 = s3
        self.consumer = consumer
        self.keyring = settings.secrets()

    async def process(self, entry: Entry) -> Outcome:
        """Raises Rejected for what can never succeed; other errors mean 'retry later'."""
        signed = verify_fields(entry.fields, self.keyring)
        m = signed.manifest
        rkey = record_key(self.settings.output_prefix, m)
        if await self._exists(rkey):
            return Outcome("duplicate", m)
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        data = await self._download(m)
        timings["download_s"] = time.monotonic() - t0
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        if digest != m.sha256:
            raise Rejected("sha256_mismatch", f"object {m.key} hashes to {digest}")
        t0 = time.monotonic()
        integrity = await asyncio.to_thread(check_integrity, data, m)
        timings["filter_s"] = time.monotonic() - t0
        record = self._record(signed, entry, integrity.as_dict())
        await self.s3.put_object(
            Bucket=self.settings.output_bucket,
            Key=rkey,
            Body=record,
            ContentType="application/json",
        )
        return Outcome("processed", m, timings)

    async def _exists(self, key: str) -> bool:
        try:
            await self.s3.head_object(Bucket=self.settings.output_bucket, Key=key)
        except ClientError as exc:
            if is_not_found(exc):
                return False
            raise
        return True

    async def _download(self, m: Manifest) -> bytes:
        if m.size_bytes > self.settings.max_chunk_bytes:
            raise Rejected(
                "oversized_chunk", f"{m.size_bytes} bytes > {self.settings.max_chunk_bytes}"
            )
        try:
            resp = await self.s3.get_object(Bucket=m.bucket, Key=m.key)
        except ClientError as exc:
            if is_not_found(exc):
                raise Rejected("object_missing", f"s3://{m.bucket}/{m.key}") from None
            raise
        async with resp["Body"] as body:
            data: bytes = await body.read()
        if len(data) != m.size_bytes:
            raise Rejected("size_mismatch", f"{len(data)} bytes, manifest says {m.size_bytes}")
        return data

    def _record(self, signed: SignedManifest, entry: Entry, integrity: dict[str, Any]) -> bytes:
        doc = {
            "chunk_id": signed.manifest.chunk_id,
            "manifest": signed.manifest.model_dump(mode="json"),
            "signature": signed.signature.model_dump(mode="json"),
            "integrity": integrity,
            "stream_entry_id": entry.id.decode(),
            "deliveries": entry.deliveries,
            "consumer": self.consumer,
            "processed_at": datetime.now(UTC).isoformat(),
        }
        return json.dumps(doc, sort_keys=True).encode()
