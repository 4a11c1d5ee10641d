"""Scene windows on real servers: windows that complete on unaligned, filtered and gappy
footage, revisions for late footage, crash-safe closes, a window dead-letter, and the
window MCAP read back with the ``mcap`` reader and decoded with PyAV."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from mcap.reader import make_reader
from mcap_protobuf.decoder import DecoderFactory

from cloud_ingest.scene_mcap import write_mcap
from devstack.media import make_clip
from devstack.servers import free_port
from edge_agent.segmenter import ClosedChunk
from shared.params import parameter_sets
from tests.support import (
    BASE_TIME,
    S3,
    Edge,
    Stack,
    cloud_ingest,
    edge_agent,
    eventually,
    holds,
    ingest_settings,
    report_figures,
    segment_file,
)

ROOT = Path(__file__).resolve().parent.parent
W = 10  # INGEST_WINDOW_S in these tests
WS = int(BASE_TIME.timestamp()) + W  # the window under test: [WS, WS + 10)
CODECS = {"h264": "h264", "h265": "hevc"}
CALIBRATION = {
    "site-1": {
        "cam1": {
            "width": 320,
            "height": 240,
            "K": [300.0, 0.0, 160.0, 0.0, 300.0, 120.0, 0.0, 0.0, 1.0],
            "D": [0.01, -0.02, 0.0, 0.0, 0.0],
            "translation": [1.0, 2.0, 3.0],
            "rotation": [0.0, 0.0, 0.0, 1.0],
        }
    }
}


def calibration() -> dict[str, Any]:
    from cloud_ingest.config import Calibration

    return {c: Calibration.model_validate(v) for c, v in CALIBRATION["site-1"].items()}


def at(offset: float) -> Any:
    return BASE_TIME + timedelta(seconds=W + offset)


async def closed_windows(edge: Edge) -> list[dict[str, Any]]:
    return [json.loads(f[b"window"]) for _, f in await edge.redis.xrange("windows.closed")]


async def window(edge: Edge, revision_id: str, timeout: float = 120) -> dict[str, Any]:
    async def published() -> bool:
        return any(w["revision_id"] == revision_id for w in await closed_windows(edge))

    await eventually(published, timeout, f"window {revision_id} handed off")
    [doc] = [w for w in await closed_windows(edge) if w["revision_id"] == revision_id]
    return doc


def read_mcap(data: bytes) -> tuple[dict[str, Any], dict[str, list[Any]], dict[str, str]]:
    """(channels by topic, messages by topic as (log_time, publish_time, decoded), metadata)."""
    reader = make_reader(io.BytesIO(data), decoder_factories=[DecoderFactory()])
    summary = reader.get_summary()
    assert summary is not None
    channels = {c.topic: c for c in summary.channels.values()}
    messages: dict[str, list[Any]] = {}
    for _, channel, message, decoded in reader.iter_decoded_messages(log_time_order=False):
        messages.setdefault(channel.topic, []).append(
            (message.log_time, message.publish_time, decoded)
        )
    [meta] = [m.metadata for m in reader.iter_metadata() if m.name == "window"]
    return channels, messages, dict(meta)


def decode_channel(items: list[Any]) -> int:
    """Decode every message of one video channel with PyAV; the frames it gave."""
    ctx: Any = av.CodecContext.create(CODECS[items[0][2].format], "r")
    frames = 0
    for _, _, video in items:
        frames += len(ctx.decode(av.Packet(video.data)))
    return frames + len(ctx.decode(None))


def source_frames(chunks: list[tuple[float, bytes]], start: float, end: float) -> int:
    """From the raw chunks themselves: frames from the last keyframe at or before ``start``
    (decode time on the edge clock: chunk start plus DTS offset) to before ``end``."""
    times: list[tuple[float, bool]] = []
    for begin, data in chunks:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            tb = Fraction(stream.time_base)
            packets = [p for p in container.demux(stream) if p.dts is not None]
            first = packets[0].dts
            times += [(begin + float((p.dts - first) * tb), p.is_keyframe) for p in packets]
    keys = [t for t, key in times if key and t <= start]
    origin = max(keys) if keys else min(t for t, _ in times)
    return sum(1 for t, _ in times if origin <= t < end)


async def raw_chunks(s3: S3, stack: Stack, notes: list[dict[str, Any]]) -> list[Any]:
    return [(n["start"], await s3.get(stack.raw_bucket, n["key"])) for n in notes]


def by_camera(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["camera_id"]: c for c in doc["cameras"]}


def seconds(doc: dict[str, Any]) -> dict[str, tuple[float, float, float, float]]:
    return {
        c: (v["accepted_s"], v["rejected_s"], v["gap_s"], v["unexplained_s"])
        for c, v in by_camera(doc).items()
    }


async def test_windows_unaligned_filtered_and_gappy_views_complete_and_their_mcap_decodes(
    stack: Stack,
    s3: S3,
    edge: Edge,
    chunks: list[ClosedChunk],
    webhook: tuple[str, list[dict[str, Any]], list[int]],
    tmp_path: Path,
) -> None:
    """Three views of one window, none aligned to it: cam1 (H.264 with an AAC track)
    starts 1 s before the window, cam2 (a static view: every chunk rejected `static`)
    1.5 s before, cam3 (H.265) 0.5 s before, with a 2 s gap its edge declared. A chunk
    counts towards every window it overlaps, a filtered view still covers, the declared
    gap explains the rest: the window closes `complete`, with each camera's seconds
    exact. Its MCAP opens with the mcap reader: one video channel per camera (h264,
    h264, h265), calibration and /tf for cam1, every message decodes with PyAV, log
    times within the window plus one GOP of pre-roll and never going back, the frame
    count per camera equal to the raw chunks' over that span, and no audio. The example
    reconstruction job reads it and makes a background plate per view."""
    url, received, _ = webhook
    still = segment_file(
        make_clip(tmp_path / "still.mp4", 6, pattern="static"), tmp_path / "still", 2.0
    )
    hevc = segment_file(
        make_clip(tmp_path / "hevc.mp4", 6, codec="libx265"), tmp_path / "hevc", 2.0
    )
    assert hevc[0].codec == "hevc"
    seq = 0
    for k in range(6):  # cam1 [WS-1, WS+11), cam2 [WS-1.5, WS+10.5)
        await edge.send(chunks[k % 3], seq, camera_id="cam1", start_time=at(-1 + 2 * k))
        await edge.send(still[k % 3], seq + 1, camera_id="cam2", start_time=at(-1.5 + 2 * k))
        seq += 2
    for offset in (-0.5, 1.5, 5.5, 7.5, 9.5):  # cam3: nothing in [WS+3.5, WS+5.5), declared
        gap = offset == 5.5
        await edge.send(
            hevc[seq % 3],
            seq,
            camera_id="cam3",
            start_time=at(offset),
            discontinuity=gap,
            gap_before_s=2.0 if gap else 0.0,
        )
        seq += 1
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_WINDOW_S=str(W),
        INGEST_WINDOW_TIMEOUT_S="600",
        INGEST_SITE_CAMERAS=json.dumps({"site-1": ["cam1", "cam2", "cam3"]}),
        INGEST_FILTER_RECENT_CHUNKS="0",
        INGEST_CAMERA_CALIBRATION=json.dumps(CALIBRATION),
        INGEST_HANDOFF_SINKS='["stream", "webhook"]',
        INGEST_WEBHOOK_URL=url,
        INGEST_WEBHOOK_SECRET="webhook-secret",
    )
    try:
        doc = await window(edge, f"site-1-{WS}-r1")

        async def hooked() -> bool:
            return bool(received)

        await eventually(hooked, 60, "the webhook call")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    assert doc["closed_because"] == "complete" and doc["missing_cameras"] == []
    assert seconds(doc) == {
        "cam1": (10.0, 0.0, 0.0, 0.0),
        "cam2": (0.0, 10.0, 0.0, 0.0),
        "cam3": (8.0, 0.0, 2.0, 0.0),
    }
    assert doc["gaps"] == {"cam3": [{"start": WS + 3.5, "end": WS + 5.5}]}
    assert {c: len(v) for c, v in doc["chunks"].items()} == {"cam1": 6, "cam2": 6, "cam3": 5}
    assert {n["verdict"] for n in doc["chunks"]["cam2"]} == {"static"}
    assert (doc["start"], doc["end"]) == (WS, WS + W)
    assert doc["mcap_key"] == f"processed/windows/site-1/{WS}/site-1-{WS}-r1.mcap"
    payload = json.loads(received[0]["body"])
    assert payload["mcap"]["channels"]["cam3"]["b_frames"] is False

    data = await s3.get(stack.out_bucket, doc["mcap_key"])
    channels, messages, meta = read_mcap(data)
    videos = {f"/{c}/video" for c in ("cam1", "cam2", "cam3")}
    assert set(channels) == videos | {"/cam1/calibration", "/tf"}
    formats = {t: channels[t].metadata["format"] for t in videos}
    assert formats == {"/cam1/video": "h264", "/cam2/video": "h264", "/cam3/video": "h265"}
    assert {channels[t].metadata["b_frames"] for t in videos} == {"false"}
    for camera in ("cam1", "cam2", "cam3"):
        items = messages[f"/{camera}/video"]
        logs = [log for log, _, _ in items]
        assert logs == sorted(logs)  # decode order, never back
        assert all(log == publish for log, publish, _ in items)
        assert WS - 1.0 <= logs[0] / 1e9 <= WS and logs[-1] / 1e9 < WS + W  # one GOP pre-roll
        assert items[0][2].format == formats[f"/{camera}/video"]
        assert decode_channel(items) == len(items)  # every message decodes
        expected = source_frames(await raw_chunks(s3, stack, doc["chunks"][camera]), WS, WS + W)
        assert len(items) == expected, camera
    # 10 s at 15 fps; cam1 has a keyframe right at the window's start, cam2 0.5 s before.
    assert len(messages["/cam1/video"]) == 150 and messages["/cam1/video"][0][0] == WS * 10**9
    assert messages["/cam2/video"][0][0] == (WS - 0.5) * 10**9
    [(_, _, cal)] = messages["/cam1/calibration"]
    assert list(cal.K) == CALIBRATION["site-1"]["cam1"]["K"] and cal.width == 320
    [(_, _, pose)] = messages["/tf"]
    assert (pose.parent_frame_id, pose.child_frame_id) == ("site", "cam1")
    assert (pose.translation.x, pose.translation.z, pose.rotation.w) == (1.0, 3.0, 1.0)
    assert "not carried" in meta["audio"] and json.loads(meta["calibration"]) == ["cam1"]
    assert meta["revision_id"] == doc["revision_id"]
    raws = {
        n["key"]: data
        for c in doc["chunks"].values()
        for n, (_, data) in zip(c, await raw_chunks(s3, stack, c), strict=True)
    }
    again = io.BytesIO()  # a second consumer writing the same revision: the same bytes
    write_mcap(again, doc, calibration(), lambda note: raws[note["key"]])
    assert again.getvalue() == data
    assert {c["chunk_id"] for c in json.loads(meta["chunks"])["cam3"]} == {
        n["chunk_id"] for n in doc["chunks"]["cam3"]
    }

    env = {**stack.ingest_env(), "PYTHONPATH": str(ROOT)}
    job = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "examples/reconstruct_background.py",
            "--bucket",
            stack.out_bucket,
            "--revision-id",
            doc["revision_id"],
            "--mcap-key",
            doc["mcap_key"],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    result = json.loads(job.stdout.strip().splitlines()[-1])
    assert result["cameras"] == ["cam1", "cam2", "cam3"]
    assert result["frames"] == {c: len(messages[f"/{c}/video"]) for c in result["cameras"]}
    assert result["alignment"]["common_s"] > 9.0  # every view spans the window
    for key in result["outputs"]:
        plate = np.load(io.BytesIO(await s3.get(stack.out_bucket, key)))
        assert plate.shape == (240, 320, 3) and plate.dtype == np.uint8


async def test_windows_a_camera_that_stopped_and_backfilled_makes_revision_2(
    stack: Stack,
    s3: S3,
    edge: Edge,
    chunks: list[ClosedChunk],
    webhook: tuple[str, list[dict[str, Any]], list[int]],
) -> None:
    """cam2 stops 4 s into each of two windows; both close by timeout with its 6 missing
    seconds reported. Its box comes back and backfills: each window gets revision 2
    (supersedes r1, closed complete, the late footage in its MCAP), handed off once more
    to every sink; revision 1 is not handed off again. Window B's Redis hash is deleted
    before the backfill (as its day-long expiry would): its revision 2 is made from the
    state kept in S3 and still holds revision 1's chunks."""
    url, received, _ = webhook
    a, b = WS, WS + W

    async def cam2(begin: int, offsets: list[int], seq0: int) -> None:
        for i, off in enumerate(offsets):
            start = BASE_TIME + timedelta(seconds=begin - BASE_TIME.timestamp() + off)
            await edge.send(chunks[i % 3], seq0 + i, camera_id="cam2", start_time=start)

    for k in range(10):  # cam1 covers both windows
        await edge.send(chunks[k % 3], k, camera_id="cam1", start_time=at(2 * k))
    await cam2(a, [0, 2], 100)
    await cam2(b, [0, 2], 200)
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_WINDOW_S=str(W),
        INGEST_WINDOW_TIMEOUT_S="20",
        INGEST_SITE_CAMERAS=json.dumps({"site-1": ["cam1", "cam2"]}),
        INGEST_FILTER_RECENT_CHUNKS="0",
        INGEST_HANDOFF_SINKS='["stream", "webhook"]',
        INGEST_WEBHOOK_URL=url,
        INGEST_WEBHOOK_SECRET="webhook-secret",
    )
    try:
        first = [await window(edge, f"site-1-{s}-r1") for s in (a, b)]
        for doc in first:
            assert doc["closed_because"] == "timeout" and doc["supersedes"] is None
            assert seconds(doc)["cam2"] == (4.0, 0.0, 0.0, 6.0)
            assert not by_camera(doc)["cam2"]["accounted"] and doc["missing_cameras"] == []
        assert await edge.redis.delete(f"ingest:window:site-1:{b}") == 1
        await cam2(a, [4, 6, 8], 102)  # the backfill
        await cam2(b, [4, 6, 8], 202)
        second = [await window(edge, f"site-1-{s}-r2") for s in (a, b)]

        async def all_hooked() -> bool:
            return len(received) == 4

        await eventually(all_hooked, 60, "four webhook calls")
        await holds(all_hooked, 3, "no further webhook call")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    for old, new in zip(first, second, strict=True):
        assert new["revision"] == 2 and new["supersedes"] == old["revision_id"]
        assert new["window_id"] == old["window_id"] and new["closed_because"] == "complete"
        assert seconds(new)["cam2"] == (10.0, 0.0, 0.0, 0.0)
        assert {c: len(v) for c, v in new["chunks"].items()} == {"cam1": 5, "cam2": 5}
        assert new["mcap_key"].endswith(f"{new['revision_id']}.mcap")
        _, before, _ = read_mcap(await s3.get(stack.out_bucket, old["mcap_key"]))
        _, after, _ = read_mcap(await s3.get(stack.out_bucket, new["mcap_key"]))
        assert len(before["/cam2/video"]) == 60 and len(after["/cam2/video"]) == 150
        assert len(after["/cam1/video"]) == 150
    keys = sorted(call["headers"]["Idempotency-Key"] for call in received)
    assert keys == sorted(f"site-1-{s}-r{r}" for s in (a, b) for r in (1, 2))
    report_figures(
        "backfill_revisions",
        {
            w["revision_id"]: f"{w['closed_because']} {w['mcap']['bytes']} B "
            f"{w['mcap']['write_s']} s"
            for w in first + second
        },
    )
    assert len(await closed_windows(edge)) == 4


async def test_windows_a_consumer_killed_around_the_close_hands_each_revision_off_once(
    stack: Stack,
    s3: S3,
    edge: Edge,
    chunks: list[ClosedChunk],
    webhook: tuple[str, list[dict[str, Any]], list[int]],
    tmp_path: Path,
) -> None:
    """The consumer is SIGKILLed right before the close script (window A) and, in a
    second run, right after it, before anything is acknowledged (window B). Each window
    is still handed off, exactly once: one entry downstream, one webhook call."""
    url, received, _ = webhook
    windows = {"before_close": WS, "after_close": WS + W}
    for n, (point, start) in enumerate(windows.items()):
        for k in range(5):
            offset = start - WS + 2 * k
            await edge.send(chunks[k % 3], 10 * n + k, camera_id="cam1", start_time=at(offset))
        marker = tmp_path / f"{point}.parked"
        cloud = cloud_ingest(
            stack,
            stack.workdir / f"cloud-{point}.log",
            INGEST_CONSUMERS="1",
            INGEST_WINDOW_S=str(W),
            INGEST_WINDOW_TIMEOUT_S="600",
            INGEST_SITE_CAMERAS=json.dumps({"site-1": ["cam1"]}),
            INGEST_FILTER_RECENT_CHUNKS="0",
            INGEST_HANDOFF_SINKS='["stream", "webhook"]',
            INGEST_WEBHOOK_URL=url,
            INGEST_WEBHOOK_SECRET="webhook-secret",
            INGEST_TEST_HOOK=f"window.{point}@{marker}",
        )
        try:

            async def parked(cloud: Any = cloud) -> bool:
                return bool(cloud.events("test_hook.parked"))

            await eventually(parked, 90, f"the consumer parked at {point}")
            [event] = cloud.events("test_hook.parked")
            with contextlib.suppress(ProcessLookupError):  # the supervisor may be first
                os.kill(int(event["pid"]), signal.SIGKILL)
            doc = await window(edge, f"site-1-{start}-r1", timeout=150)

            async def hooked(n: int = n) -> bool:
                return len(received) == n + 1

            await eventually(hooked, 60, "the webhook call")
            await holds(hooked, 3, "no second webhook call")
            assert cloud.terminate() == 0
        finally:
            cloud.kill()
        assert doc["closed_because"] == "complete" and marker.exists()
    docs = await closed_windows(edge)
    assert sorted(d["revision_id"] for d in docs) == [f"site-1-{s}-r1" for s in windows.values()]
    keys = [call["headers"]["Idempotency-Key"] for call in received]
    assert sorted(keys) == [f"site-1-{s}-r1" for s in windows.values()]


async def test_windows_a_hand_off_that_keeps_failing_is_dead_lettered_with_its_reason(
    stack: Stack,
    s3: S3,
    edge: Edge,
    chunks: list[ClosedChunk],
    webhook: tuple[str, list[dict[str, Any]], list[int]],
) -> None:
    """The labeling platform refuses every call (422: it will not take this window):
    after INGEST_MAX_DELIVERIES attempts the revision moves to `chunks:windows:dlq` with
    reason `handoff_failed` and the webhook's answer; the stream sink before it ran once;
    nothing stays pending. (A 5xx or 429 is an outage: retried, not counted.)"""
    url, received, status = webhook
    status[0] = 422
    for k in range(5):
        await edge.send(chunks[k % 3], k, camera_id="cam1", start_time=at(2 * k))
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_WINDOW_S=str(W),
        INGEST_WINDOW_TIMEOUT_S="600",
        INGEST_SITE_CAMERAS=json.dumps({"site-1": ["cam1"]}),
        INGEST_FILTER_RECENT_CHUNKS="0",
        INGEST_HANDOFF_SINKS='["stream", "webhook"]',
        INGEST_WEBHOOK_URL=url,
        INGEST_WEBHOOK_SECRET="webhook-secret",
        INGEST_MAX_DELIVERIES="2",
        INGEST_HANDOFF_CLAIM_S="1",
    )
    try:

        async def dead() -> bool:
            return bool(await edge.redis.xlen("chunks:windows:dlq"))

        await eventually(dead, 120, "the window dead-lettered")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    [(_, letter)] = await edge.redis.xrange("chunks:windows:dlq")
    assert letter[b"reason"] == b"handoff_failed"
    assert b"webhook answered 422" in letter[b"detail"]
    assert json.loads(letter[b"window"])["revision_id"] == f"site-1-{WS}-r1"
    assert len(received) == 2  # one failed call per delivery, no more
    assert len(await closed_windows(edge)) == 1  # the stream sink ran once
    [group] = await edge.redis.xinfo_groups("chunks:windows")
    assert group["pending"] == 0 and await edge.redis.xlen("chunks:windows") == 0
    shown = await asyncio.to_thread(
        subprocess.run,
        [str(ROOT / ".venv/bin/cloud-ingest"), "status", "--json"],
        env=stack.ingest_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(shown.stdout)["windows"] == {"open": 0, "to_hand_off": 0, "dead_lettered": 1}


async def test_windows_three_live_rtsp_cameras_close_a_complete_window_with_a_decodable_mcap(
    stack: Stack, s3: S3, edge: Edge, tmp_path: Path
) -> None:
    """Three live RTSP cameras of one site on three edge boxes, started at different
    moments, with keyframes every 15, 22 and 37 frames (so chunks of about 2, 2.9 and
    2.5 s), the third sending its parameter sets only in the SDP. While they run a
    window closes `complete`; its MCAP has one h264 channel per camera, every keyframe
    carries its parameter sets in-band, every message decodes with a decoder that was
    given nothing else, log times lie within the window plus the keyframe pre-roll,
    and each camera's frame count equals its raw chunks' over that span."""
    from devstack.servers import RtspServer

    cams = {"cam1": 15, "cam2": 22, "cam3": 37}
    rtsp = RtspServer(tmp_path, dict.fromkeys(cams), gops=cams, sdp_only=("cam3",))
    rtsp.start()
    keyring = {f"k-{c}": {"secret": "s" * 16 + c, "device_id": f"dev-{c}"} for c in cams}
    cloud = cloud_ingest(
        stack,
        stack.workdir / "cloud.log",
        INGEST_WINDOW_S=str(W),
        INGEST_WINDOW_TIMEOUT_S="120",
        INGEST_SITE_CAMERAS=json.dumps({"site-1": sorted(cams)}),
        INGEST_FILTER_RECENT_CHUNKS="0",
        INGEST_KEYRING=json.dumps(keyring),
    )
    agents = []
    try:
        for camera in cams:
            agents.append(
                edge_agent(
                    stack,
                    [{"id": camera, "url": rtsp.url(camera)}],
                    stack.workdir / f"edge-{camera}.log",
                    EDGE_DEVICE_ID=f"dev-{camera}",
                    EDGE_SIGNING_KEY_ID=f"k-{camera}",
                    EDGE_SIGNING_KEY=keyring[f"k-{camera}"]["secret"],
                    EDGE_SPOOL_DIR=str(stack.workdir / f"spool-{camera}"),
                    EDGE_HTTP_BIND=f"127.0.0.1:{free_port()}",
                )
            )
            await asyncio.sleep(1.5)  # the boxes start at different moments

        async def complete() -> bool:
            return any(w["closed_because"] == "complete" for w in await closed_windows(edge))

        await eventually(complete, 150, "a complete window")
        doc = next(w for w in await closed_windows(edge) if w["closed_because"] == "complete")
    finally:
        for agent in agents:
            agent.kill()
        cloud.kill()
        rtsp.stop()
    assert doc["missing_cameras"] == [] and sorted(doc["chunks"]) == sorted(cams)
    assert all(c["unexplained_s"] <= 0.05 and c["gap_s"] == 0 for c in doc["cameras"])
    lengths = {
        c: round(sum(n["end"] - n["start"] for n in notes) / len(notes), 1)
        for c, notes in doc["chunks"].items()
    }
    assert len(set(lengths.values())) == 3, lengths  # three segment lengths
    windows_seen = await closed_windows(edge)
    report_figures(
        "live_three_camera_window",
        {
            "windows_complete": sum(w["closed_because"] == "complete" for w in windows_seen),
            "windows_timeout": sum(w["closed_because"] == "timeout" for w in windows_seen),
            "chunk_s": lengths,
            "mcap_bytes": doc["mcap"]["bytes"],
            "mcap_write_s": doc["mcap"]["write_s"],
            "messages": {c: v["messages"] for c, v in doc["mcap"]["channels"].items()},
        },
    )
    channels, messages, _ = read_mcap(await s3.get(stack.out_bucket, doc["mcap_key"]))
    assert {t for t in channels if t.endswith("/video")} == {f"/{c}/video" for c in cams}
    start, end = doc["start"], doc["end"]
    for camera, gop in cams.items():
        items = messages[f"/{camera}/video"]
        assert {v.format for _, _, v in items} == {"h264"}
        keyframes = [v for _, _, v in items if v.data and _is_idr(v.data)]
        assert keyframes and all(parameter_sets(v.data[:4096], "h264") for v in keyframes)
        logs = [log / 1e9 for log, _, _ in items]
        assert logs == sorted(logs) and logs[-1] < end
        assert start - gop / 15 - 0.5 <= logs[0] <= start + 0.5, (camera, logs[0] - start)
        assert decode_channel(items) == len(items), camera
        notes = doc["chunks"][camera]
        assert len(items) == source_frames(await raw_chunks(s3, stack, notes), start, end)


def _is_idr(data: bytes) -> bool:
    """An H.264 access unit (Annex B) with an IDR slice."""
    return any(
        data[i + 3] & 0x1F == 5 for i in range(len(data) - 3) if data[i : i + 3] == b"\x00\x00\x01"
    )


def test_windows_a_view_with_b_frames_is_flagged_and_still_decodes_in_order(
    tmp_path: Path,
) -> None:
    """H.264 with B-frames (High profile, two B-frames per P): the channel says
    `b_frames: true` (Foxglove's player cannot show them; a reconstruction job can), its
    messages are in decode order with presentation times out of order, and all decode."""
    path = tmp_path / "bframes.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=15, options={"bframes": "2", "g": "15"})
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(45):
            image = np.full((240, 320, 3), (i * 5) % 255, np.uint8)
            image[(i * 4) % 200 :][:40, :40] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    [chunk] = segment_file(path, tmp_path / "chunks", 10.0)
    note = {
        "chunk_id": "0" * 32,
        "key": str(chunk.path),
        "verdict": "accepted",
        "scores": {},
        "start": 100.0,
        "end": 103.0,
        "seq": 0,
        "codec": "h264",
    }
    doc = {
        "window_id": "s-100",
        "revision": 1,
        "revision_id": "s-100-r1",
        "supersedes": None,
        "site_id": "s",
        "start": 100,
        "end": 110,
        "closed_because": "timeout",
        "cameras": [],
        "chunks": {"cam1": [note]},
        "gaps": {},
    }
    buf = io.BytesIO()
    figures = write_mcap(buf, doc, {}, lambda n: Path(n["key"]).read_bytes())
    channels, messages, meta = read_mcap(buf.getvalue())
    items = messages["/cam1/video"]
    assert channels["/cam1/video"].metadata["b_frames"] == "true"
    assert figures["cam1"]["b_frames"] is True and json.loads(meta["b_frames"]) == {"cam1": True}
    logs = [log for log, _, _ in items]
    stamps = [v.timestamp.seconds * 10**9 + v.timestamp.nanos for _, _, v in items]
    assert logs == sorted(logs) and stamps != sorted(stamps)
    assert len(items) == 45 and decode_channel(items) == 45


# -- the window logic in this process, on the real Redis and S3 ---------------------------


@pytest.fixture
def captured_logs() -> Iterator[list[dict[str, Any]]]:
    """What the window code logs in this process, captured: an earlier test may have
    configured structlog to print to its own (by now closed) captured stdout. Loggers
    are not cached meanwhile, so they see the capture."""
    import structlog
    import structlog.testing

    structlog.configure(cache_logger_on_first_use=False)
    with structlog.testing.capture_logs() as captured:
        yield captured


def windows_here(stack: Stack, s3: S3, edge: Edge, **overrides: Any) -> Any:
    from cloud_ingest.windows import Windows

    settings = ingest_settings(
        stack,
        window_s=W,
        window_timeout_s=0,
        site_cameras={"site-1": ["cam1", "cam2"]},
        **overrides,
    )
    return Windows(settings, edge.redis, s3.client)


async def published(edge: Edge) -> list[dict[str, Any]]:
    """Closed revisions waiting for their hand-off (no consumer runs here)."""
    return [json.loads(f[b"window"]) for _, f in await edge.redis.xrange("chunks:windows")]


async def note_chunks(
    windows: Any,
    edge: Edge,
    chunks: list[ClosedChunk],
    camera: str,
    offsets: list[float],
    seq0: int,
) -> None:
    for i, offset in enumerate(offsets):
        m = await edge.send(
            chunks[i % 3], seq0 + i, camera_id=camera, start_time=at(offset), announce=False
        )
        await windows.note(m, "accepted", None, {})


async def test_windows_a_state_saved_ahead_of_a_failed_close_of_a_merged_hash_is_not_revision_1(
    stack: Stack,
    s3: S3,
    edge: Edge,
    chunks: list[ClosedChunk],
    captured_logs: list[dict[str, Any]],
) -> None:
    """Revision 1 closes; its Redis hash expires; late footage starts a fresh hash, whose
    close saves state (revision 2) and then does not happen (killed, or outrun by a
    note). The next close publishes revision 2, superseding 1, with every chunk: not a
    second revision 1 that the hand-off would take as done."""
    windows = windows_here(stack, s3, edge)
    key = f"ingest:window:site-1:{WS}"
    await note_chunks(windows, edge, chunks, "cam1", [0, 2, 4, 6, 8], 0)
    assert await windows.settle(key, due=True)
    await edge.redis.delete(key)  # its day-long expiry
    await note_chunks(windows, edge, chunks, "cam2", [0], 100)
    fields = await edge.redis.hgetall(key)
    notes = {k.decode(): v.decode() for k, v in fields.items() if k.startswith(b"c:")}
    prior = await windows._prior("site-1", WS)
    await windows._save_state("site-1", WS, 2, {**prior.notes, **notes}, fields[b"born"].decode())
    assert await windows.settle(key, due=True)
    first, second = await published(edge)
    assert (first["revision_id"], second["revision_id"]) == (f"site-1-{WS}-r1", f"site-1-{WS}-r2")
    assert second["supersedes"] == first["revision_id"]
    assert {c: len(v) for c, v in second["chunks"].items()} == {"cam1": 5, "cam2": 1}


async def test_windows_a_window_that_cannot_close_does_not_hold_up_the_others(
    stack: Stack,
    s3: S3,
    edge: Edge,
    chunks: list[ClosedChunk],
    captured_logs: list[dict[str, Any]],
) -> None:
    """Window A's state in S3 is unreadable (garbage), window B's is fine; both are due,
    A first. B closes; A's failure is counted and logged, and A is tried again later
    instead of being retried at once for ever."""
    import time

    windows = windows_here(stack, s3, edge)
    await note_chunks(windows, edge, chunks, "cam1", [0], 0)  # window A: [WS, WS+10)
    await note_chunks(windows, edge, chunks, "cam1", [W], 10)  # window B
    state = f"processed/windows/site-1/{WS}/state.json"
    await s3.put(stack.out_bucket, state, b"{not json")
    assert await windows.close_due() == 1
    [doc] = await published(edge)
    assert doc["window_id"] == f"site-1-{WS + W}"
    retry_at = await edge.redis.zscore("ingest:windows:open", f"ingest:window:site-1:{WS}")
    assert retry_at is not None and retry_at > time.time() + 20
    assert windows.tally.run["window_close_failures"] == 1
    [failed] = [e for e in captured_logs if e["event"] == "window.close_failed"]
    assert failed["window"] == f"ingest:window:site-1:{WS}" and "JSONDecodeError" in failed["error"]


async def test_windows_a_chunk_that_ends_a_few_milliseconds_into_the_next_window_skips_it(
    stack: Stack, s3: S3, edge: Edge
) -> None:
    """Chunk boundaries jitter: a chunk ending 10 ms into the next window is not noted
    there (it would reopen a complete window for 10 ms of footage), one that starts 10
    ms before its window's end still belongs to the window it starts in, and a long one
    is noted in every window it covers."""
    windows = windows_here(stack, s3, edge)
    assert windows.starts(WS + 8, WS + 10.01) == [WS]
    assert windows.starts(WS + 9.99, WS + 12) == [WS + W]
    assert windows.starts(WS + 9.999, WS + 10.001) == [WS]
    assert windows.starts(WS - 1, WS + 21) == [WS - W, WS, WS + W, WS + 2 * W]


async def test_windows_a_revision_whose_raw_chunk_is_gone_is_dead_lettered_at_once(
    stack: Stack,
    s3: S3,
    edge: Edge,
    chunks: list[ClosedChunk],
    captured_logs: list[dict[str, Any]],
) -> None:
    """Two closed windows; the raw chunk of the first was deleted (retention, by hand).
    Its MCAP can never be written: it is dead-lettered `mcap_failed` on its first
    attempt, naming the chunk, and the second window is handed off meanwhile."""
    from cloud_ingest.handoff import Handoff
    from cloud_ingest.totals import Tally

    windows = windows_here(stack, s3, edge, handoff_sinks=["stream"])
    await note_chunks(windows, edge, chunks, "cam1", [0], 0)
    await note_chunks(windows, edge, chunks, "cam1", [W], 10)
    assert await windows.close_due() == 2
    a, _ = await published(edge)
    gone = a["chunks"]["cam1"][0]["key"]
    await s3.client.delete_object(Bucket=stack.raw_bucket, Key=gone)
    handoff = Handoff(windows.settings, edge.redis, s3.client, "handoff-test", Tally())
    await handoff.setup()
    assert await handoff.step() == 1 and await handoff.step() == 1
    [(_, letter)] = await edge.redis.xrange("chunks:windows:dlq")
    assert letter[b"reason"] == b"mcap_failed" and gone.encode() in letter[b"detail"]
    assert letter[b"deliveries"] == b"1"
    [doc] = await closed_windows(edge)
    assert doc["window_id"] == f"site-1-{WS + W}"
    await handoff.close()


async def test_windows_a_labeling_platform_that_is_down_is_waited_for_then_given_up_on(
    stack: Stack,
    s3: S3,
    edge: Edge,
    chunks: list[ClosedChunk],
    webhook: tuple[str, list[dict[str, Any]], list[int]],
    captured_logs: list[dict[str, Any]],
) -> None:
    """The webhook answers 503 (down) to more attempts than INGEST_MAX_DELIVERIES allows:
    an outage, not the window's fault, so nothing is dead-lettered for that; once it has
    kept failing for INGEST_HANDOFF_GIVE_UP_S the revision moves to the DLQ as
    `handoff_stalled`, the webhook's answer as its detail."""
    import time

    from cloud_ingest.handoff import Handoff
    from cloud_ingest.totals import Tally

    url, received, status = webhook
    status[0] = 503
    windows = windows_here(
        stack,
        s3,
        edge,
        handoff_sinks=["webhook"],
        webhook_url=url,
        webhook_secret="webhook-secret",
        handoff_claim_s=0.05,
        handoff_give_up_s=4.0,
    )
    await note_chunks(windows, edge, chunks, "cam1", [0], 0)
    assert await windows.close_due() == 1
    handoff = Handoff(windows.settings, edge.redis, s3.client, "handoff-test", Tally())
    await handoff.setup()
    started = time.monotonic()
    try:

        async def retried() -> bool:
            await handoff.step()
            return len(received) >= 6 or bool(await edge.redis.xlen("chunks:windows:dlq"))

        await eventually(retried, 30, "six calls (twice INGEST_MAX_DELIVERIES)")
        assert not await edge.redis.xlen("chunks:windows:dlq")
        assert time.monotonic() - started < 4.0  # still within the give-up time

        async def given_up() -> bool:
            await handoff.step()
            return bool(await edge.redis.xlen("chunks:windows:dlq"))

        await eventually(given_up, 30, "the revision given up on")
    finally:
        await handoff.close()
    [(_, letter)] = await edge.redis.xrange("chunks:windows:dlq")
    assert letter[b"reason"] == b"handoff_stalled"
    assert b"webhook answered 503" in letter[b"detail"]
    assert int(letter[b"deliveries"]) > 3
