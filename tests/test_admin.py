"""Operator commands on real servers: dead letters and reconcile."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from devstack.proxy import HttpTap
from edge_agent.segmenter import ClosedChunk
from shared.manifest import SigningKey, sign, tag_replay
from shared.queue import publish
from tests.support import (
    BIN,
    KEY_ID,
    S3,
    SECRET,
    Edge,
    Stack,
    cloud_ingest,
    edge_agent,
    eventually,
    queue_state,
    report_figures,
)


async def cli(stack: Stack, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "cloud-ingest"), *args],
        env=stack.ingest_env(INGEST_RAW_BUCKET=stack.raw_bucket, **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


KEYRING = {KEY_ID: SigningKey(SECRET.encode(), device_id="dev-1")}


def listed(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


async def test_admin_dlq_list_requeue_and_purge(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    missing = await edge.send(chunks[0], 0, upload=False)  # announced before its upload existed
    await edge.send(chunks[1], 1, tamper=True)
    cloud = cloud_ingest(stack, stack.workdir / "cloud.log")
    try:

        async def two_letters() -> bool:
            return (await queue_state(stack.redis_url))["dlq"] == 2

        await eventually(two_letters, 60, "two dead letters")
        letters = listed(await cli(stack, "dlq", "list"))
        assert sorted(x["reason"] for x in letters) == ["bad_signature", "object_missing"]
        assert (
            next(x for x in letters if x["reason"] == "object_missing")["chunk_id"]
            == missing.chunk_id
        )

        refused = await cli(stack, "dlq", "requeue")
        assert refused.returncode == 2  # no selection: nothing is replayed by accident

        await s3.put(missing.bucket, missing.key, chunks[0].path.read_bytes())  # the fix
        result = await cli(stack, "dlq", "requeue", "--reason", "object_missing")
        assert json.loads(result.stdout) == {"requeued": 1}

        async def processed() -> bool:
            return len(await s3.records(stack.out_bucket)) == 1

        await eventually(processed, 60, "the requeued chunk to be processed")
        result = await cli(stack, "dlq", "purge", "--reason", "bad_signature")
        assert json.loads(result.stdout) == {"purged": 1}
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    state = await queue_state(stack.redis_url)
    assert (state["dlq"], state["pending"], state["length"]) == (0, 0, 0)
    [record] = await s3.records(stack.out_bucket)
    assert record["chunk_id"] == missing.chunk_id


async def test_admin_reconcile_rebuilds_the_queue_from_the_bucket(
    stack: Stack, s3: S3, clip: Path
) -> None:
    """The stream loses its entries (say, a Redis without AOF restarted); the bucket has all."""
    edge = edge_agent(stack, [{"id": "cam1", "url": f"file://{clip}"}], stack.workdir / "e.log")
    try:

        async def finished() -> bool:
            return bool(edge.events("camera.finished")) and len(edge.events("chunk")) == 3

        await eventually(finished, 60, "3 chunks announced")
        assert edge.terminate() == 0
    finally:
        edge.kill()
    client = aioredis.from_url(stack.redis_url)
    await client.delete("chunks")  # every entry gone
    await client.aclose()

    dry = json.loads((await cli(stack, "reconcile", "--dry-run")).stdout)
    assert (dry["chunks"], dry["requeued"], dry["done"]) == (3, 3, 0)
    assert (await queue_state(stack.redis_url))["length"] == 0  # a dry run changes nothing
    outside = json.loads((await cli(stack, "reconcile", "--until", "2000-01-01T00:00:00Z")).stdout)
    assert (outside["requeued"], outside["out_of_range"]) == (0, 3)

    report = json.loads((await cli(stack, "reconcile")).stdout)
    assert report["requeued"] == 3
    cloud = cloud_ingest(stack, stack.workdir / "cloud.log")
    try:

        async def processed() -> bool:
            return len(await s3.records(stack.out_bucket)) == 3

        await eventually(processed, 60, "the reconciled chunks to be processed")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    again = json.loads((await cli(stack, "reconcile")).stdout)
    assert (again["done"], again["requeued"]) == (3, 0)  # done records stop a second replay


async def test_admin_reconcile_streams_pages_and_bounds_its_concurrency(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    """40 chunks with their sidecars, listed 7 keys a page (so chunks and sidecars fall on
    different pages) with --concurrency 4, through a tap on the wire: the per-chunk lookups
    (sidecar GET, record HEAD) start before the listing ends, at most 4 and more than one
    are in flight at once, and every chunk is paired with its sidecar."""
    total = 40
    for seq in range(total):
        await edge.send(chunks[seq % len(chunks)], seq, sidecar=True, announce=False)
    with HttpTap(stack.s3_endpoint) as tap:
        result = await cli(
            stack,
            "reconcile",
            "--dry-run",
            "--page-size",
            "7",
            "--concurrency",
            "4",
            INGEST_S3_ENDPOINT_URL=tap.url,
        )
        requests = tap.snapshot()
        lists = [r for r in requests if "list-type=2" in r.query]
        per_chunk = [r for r in requests if r.path.strip("/") != stack.out_bucket]  # not HeadBucket
        lookups = [r for r in per_chunk if r not in lists and r.method in ("GET", "HEAD")]
        most = tap.most_in_flight(lookups)
    report = json.loads(result.stdout)
    report_figures(
        "reconcile_streaming",
        {
            "chunks": report["chunks"],
            "list_pages": len(lists),
            "lookups": len(lookups),
            "lookups_before_last_page": sum(r.started < lists[-1].started for r in lookups),
            "most_in_flight": most,
        },
    )
    assert (report["chunks"], report["requeued"], report["without_manifest"]) == (total, total, 0)
    assert len(lists) == -(-2 * total // 7)  # 80 keys, 7 a page
    assert len(lookups) == 2 * total  # a sidecar GET and a record HEAD per chunk
    assert lookups[0].started < lists[-1].started  # work began while the listing went on
    assert 1 < most <= 4


async def test_admin_reconcile_replays_footage_of_any_age(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk]
) -> None:
    """Footage an hour old against INGEST_MAX_MANIFEST_AGE_S=600: announced as it is, it is
    refused (`clock_skew`: the age check against replays by whoever can XADD); rebuilt from
    the bucket by reconcile, each entry carries a replay tag made with its manifest's own
    key and is processed, and so is the refused one once `dlq requeue` replays it. A
    forged tag (no key) and a tag older than the window are refused."""
    old = [await edge.send(chunks[seq], seq, sidecar=True, announce=False) for seq in range(3)]
    refused = await edge.send(chunks[0], 3)  # announced directly, untagged: too old
    forged = sign(old[0], KEY_ID, SECRET.encode()).to_fields()
    now = str(int(time.time())).encode()
    forged_tagged = {**forged, "replayed_at": now, "replay_sig": b"0" * 64}
    await publish(edge.redis, "chunks", forged_tagged)  # type: ignore[arg-type]
    stale_at = str(int(time.time()) - 3600).encode()
    stale = tag_replay({k.encode(): v for k, v in forged.items()}, KEYRING, float(stale_at))
    await publish(edge.redis, "chunks", {k.decode(): v for k, v in stale.items()})
    result = await cli(stack, "reconcile", INGEST_MAX_MANIFEST_AGE_S="600")
    assert json.loads(result.stdout)["requeued"] == 3
    cloud = cloud_ingest(stack, stack.workdir / "cloud.log", INGEST_MAX_MANIFEST_AGE_S="600")
    try:

        async def first_round() -> bool:
            st = await queue_state(stack.redis_url)
            return (
                st["length"] == 0
                and st["dlq"] == 3
                and len(await s3.records(stack.out_bucket)) == 3
            )

        await eventually(first_round, 90, "the replayed chunks processed, the rest refused")
        reasons = sorted((await queue_state(stack.redis_url))["dlq_reasons"])
        requeued = await cli(stack, "dlq", "requeue", "--reason", "clock_skew")
        assert json.loads(requeued.stdout) == {"requeued": 2}  # the untagged one, the stale one

        async def second_round() -> bool:
            st = await queue_state(stack.redis_url)
            return st["length"] == 0 and st["pending"] == 0 and st["dlq"] == 1

        await eventually(second_round, 60, "the requeued letters processed")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    records = {r["manifest"]["seq"] for r in await s3.records(stack.out_bucket)}
    final = await queue_state(stack.redis_url)
    report_figures(
        "replay_any_age",
        {"first_round_dlq": reasons, "records": sorted(records), "left": final["dlq_reasons"]},
    )
    assert reasons == ["bad_replay_tag", "clock_skew", "clock_skew"]
    assert records == {0, 1, 2, refused.seq}
    assert final["dlq_reasons"] == ["bad_replay_tag"]


async def test_admin_dlq_acts_on_every_letter_not_only_a_first_page(
    stack: Stack, edge: Edge
) -> None:
    """12,100 dead letters (more than any page or old default limit): `dlq list` counts
    them all, `dlq purge --reason stale` removes every one of its 12,000 and only those."""
    async with edge.redis.pipeline(transaction=False) as pipe:
        for n in range(12_100):
            reason = b"stale" if n % 121 else b"other"
            pipe.xadd("chunks:dlq", {"manifest": b"{}", "reason": reason, "deliveries": b"1"})
        await pipe.execute()
    listed = await cli(stack, "dlq", "list")
    summary = json.loads(listed.stderr.strip().splitlines()[-1])
    purged = json.loads((await cli(stack, "dlq", "purge", "--reason", "stale")).stdout)
    left = await edge.redis.xrange("chunks:dlq")
    assert summary == {"dead_letters": 12_100, "by_reason": {"stale": 12_000, "other": 100}}
    assert len(listed.stdout.splitlines()) == 12_100
    assert purged == {"purged": 12_000}
    assert {f[b"reason"] for _, f in left} == {b"other"} and len(left) == 100


async def test_admin_replay_key_stops_a_device_backdating_its_own_footage(
    stack: Stack, s3: S3, edge: Edge, chunks: list[ClosedChunk], tmp_path: Path
) -> None:
    """With a cloud-only replay key (INGEST_REPLAY_KEY_FILE for `reconcile`, the systemd
    credential `replay_key` for the deployment), replay tags are the cloud's. Footage an
    hour old against INGEST_MAX_MANIFEST_AGE_S=600: the device tags its own manifest with
    its own signing key (as a replay tag was made before) and announces it: refused
    `bad_replay_tag`. The same chunk rebuilt from the bucket by reconcile is processed."""
    old = await edge.send(chunks[0], 0, sidecar=True, announce=False)
    signed = {k.encode(): v for k, v in sign(old, KEY_ID, SECRET.encode()).to_fields().items()}
    forged = tag_replay(signed, KEYRING, time.time())  # the device's own key is all it takes
    await publish(edge.redis, "chunks", {k.decode(): v for k, v in forged.items()})
    key_file = tmp_path / "replay.key"
    key_file.write_text(secrets.token_hex(16) + "\n")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "replay_key").write_text(key_file.read_text())
    result = await cli(
        stack, "reconcile", INGEST_MAX_MANIFEST_AGE_S="600", INGEST_REPLAY_KEY_FILE=str(key_file)
    )
    assert json.loads(result.stdout)["requeued"] == 1, result.stderr
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_MAX_MANIFEST_AGE_S="600",
        CREDENTIALS_DIRECTORY=str(credentials),
    )
    try:

        async def settled() -> bool:
            st = await queue_state(stack.redis_url)
            return (st["length"], st["pending"], st["dlq"]) == (0, 0, 1) and bool(
                await s3.records(stack.out_bucket)
            )

        await eventually(settled, 90, "the forged tag refused, the reconciled entry processed")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    [(_, letter)] = await edge.redis.xrange("chunks:dlq")
    [record] = await s3.records(stack.out_bucket)
    report_figures(
        "replay_key",
        {"refused": letter[b"reason"].decode(), "detail": letter[b"detail"].decode()},
    )
    assert letter[b"reason"] == b"bad_replay_tag"
    assert letter[b"replay_sig"] == forged[b"replay_sig"]  # the device's tag, not reconcile's
    assert b"replay key" in letter[b"detail"]
    assert record["chunk_id"] == old.chunk_id
