"""Only authentic manifests get in: every rejection class, sent to a real cloud-ingest
deployment (real Redis, SeaweedFS, Ray) while valid traffic flows beside it."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

import aiohttp

from devstack.servers import free_port
from edge_agent.segmenter import ClosedChunk
from shared.queue import publish
from tests.support import (
    S3,
    SECRET,
    Edge,
    Stack,
    cloud_ingest,
    eventually,
    metric_appears,
    queue_state,
    report_figures,
)

# k1 and k1-next are the same device during a key rollover: both must verify.
KEYRING = {
    "k1": {"secret": SECRET, "device_id": "dev-1", "site_id": "site-1"},
    "k1-next": {"secret": "rotated-signing-secret", "device_id": "dev-1", "site_id": "site-1"},
    "k2": {"secret": "second-device-secret", "device_id": "dev-2", "site_id": "site-1"},
    "k3": {
        "secret": "third-device-secret!",
        "device_id": "dev-3",
        "site_id": "site-2",
        "cameras": ["gate"],
    },
}


def secret(key_id: str) -> str:
    return str(KEYRING[key_id]["secret"])


async def test_security_every_forgery_class_is_refused_with_its_reason(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    port = free_port()
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_KEYRING=json.dumps(KEYRING),
        INGEST_FILTER_RECENT_CHUNKS="0",
        INGEST_MAX_CLOCK_SKEW_S="300",
        INGEST_MAX_MANIFEST_AGE_S=str(7 * 86400),
        INGEST_HTTP_BIND=f"127.0.0.1:{port}",
    )
    c, d = chunks[0], chunks[1]
    try:
        # Valid traffic first, so cam1 of site-1 is known to belong to dev-1.
        await edge.send(c, 0, key_id="k1", secret=secret("k1"))
        await edge.send(d, 1, key_id="k1-next", secret=secret("k1-next"))
        kw3 = {"device_id": "dev-3", "site_id": "site-2", "camera_id": "gate"}
        await edge.send(c, 2, key_id="k3", secret=secret("k3"), **kw3)

        async def valid_done() -> bool:
            return len(await s3.records(stack.out_bucket)) == 3

        await eventually(valid_done, 90, "the first three valid chunks processed")
        first = {r["chunk_id"]: r for r in await s3.records(stack.out_bucket)}

        now = datetime.now(UTC).replace(microsecond=0)
        k1 = {"key_id": "k1", "secret": secret("k1")}
        sent = {
            "unsigned": edge.send(c, 10, unsigned=True, **k1),
            "unknown_key": edge.send(c, 11, key_id="k9", secret="k9-is-nobodys-secret"),
            "bad_signature": edge.send(c, 12, key_id="k1", secret="not-the-k1-secret"),
            "device_mismatch": edge.send(c, 13, key_id="k2", secret=secret("k2")),
            "site_mismatch": edge.send(c, 14, site_id="site-2", **k1),
            "camera_not_allowed": edge.send(
                c, 15, key_id="k3", secret=secret("k3"), **{**kw3, "camera_id": "lobby"}
            ),
            "camera_claimed": edge.send(c, 16, key_id="k2", secret=secret("k2"), device_id="dev-2"),
            # seq 0 of cam1 again, same content hash (so the same chunk id), another start time
            "replay": edge.send(c, 0, start_time=now - timedelta(minutes=5), **k1),
            "clock_skew": edge.send(c, 17, start_time=now + timedelta(hours=1), **k1),
            "chunk_id_mismatch": edge.send(c, 18, chunk_id="0" * 32, **k1),
            "foreign_bucket": edge.send(c, 19, bucket=stack.out_bucket, **k1),
            "foreign_key": edge.send(c, 20, key="processed/records/x.mp4", **k1),
        }
        for seq, send in enumerate(sent.values(), start=100):
            await send
            await edge.send(d, seq, **k1)  # valid traffic in between
        await edge.send(c, 21, start_time=now - timedelta(days=30), **k1)  # too old
        await publish(edge.redis, "chunks", _signed_raw(b"x" * 20_000))  # oversized
        await publish(edge.redis, "chunks", _signed_raw(b"\xff not json"))  # malformed
        expected = sorted([*sent, "clock_skew", "oversized", "malformed"])

        async def settled() -> bool:
            st = await queue_state(stack.redis_url)
            return st["dlq"] == len(expected) and st["pending"] == 0 and st["length"] == 0

        try:
            await eventually(settled, 120, "every forgery dead-lettered, the queue empty")
        except AssertionError:
            st = await queue_state(stack.redis_url)
            raise AssertionError(f"{st}\n{cloud.text()[-4000:]}") from None
        lines = [
            f'cloud_ingest_chunks_total{{outcome="rejected_{r}"}} {expected.count(r)}.0'
            for r in set(expected)
        ]
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{port}"

            async def counted() -> bool:
                return all([await metric_appears(http, base, line) for line in lines])

            await eventually(counted, 30, "a rejected_<reason> count per class in /metrics")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()

    st = await queue_state(stack.redis_url)
    assert sorted(st["dlq_reasons"]) == expected
    records = await s3.records(stack.out_bucket)
    valid = 3 + len(sent)
    report_figures(
        "security",
        {
            "sent": valid + len(expected),
            "rejected": st["dlq"],
            "classes": sorted(set(expected)),
            "processed": len(records),
            "lost": valid - len(records),
        },
    )
    assert len(records) == valid  # every valid chunk processed, no forgery among them
    assert {r["manifest"]["device_id"] for r in records} == {"dev-1", "dev-3"}
    # The replay left the original outputs as they were.
    for chunk_id, record in first.items():
        now_record = next(r for r in records if r["chunk_id"] == chunk_id)
        assert now_record == record


def _signed_raw(payload: bytes) -> dict[str, bytes]:
    mac = hmac.new(SECRET.encode(), payload, hashlib.sha256).hexdigest()
    return {"manifest": payload, "key_id": b"k1", "sig": mac.encode()}
