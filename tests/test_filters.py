"""Filters and preprocessing on real encoded clips, then through the real consumers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import pyarrow.parquet as pq
import pytest

from cloud_ingest.filters import Thresholds, analyse, verdict
from cloud_ingest.preprocess import Options, frames_to_shard
from devstack.media import make_clip
from edge_agent.segmenter import ClosedChunk
from shared.manifest import Manifest, Rejected
from tests.support import S3, Edge, Stack, cloud_ingest, eventually, queue_state, segment_file


def chunk_of(tmp_path: Path, pattern: str, seconds: float = 2.0) -> ClosedChunk:
    clip = make_clip(tmp_path / f"{pattern}.mp4", seconds, pattern=pattern)
    [chunk] = segment_file(clip, tmp_path / f"{pattern}-out", seconds)
    return chunk


def manifest_like(c: ClosedChunk, **overrides: object) -> Manifest:
    doc = {
        "chunk_id": "0" * 32,
        "device_id": "d",
        "site_id": "s",
        "camera_id": "c",
        "seq": 0,
        "bucket": "raw-bucket",
        "key": "k.mp4",
        "size_bytes": c.size_bytes,
        "sha256": c.sha256,
        "container": "mp4",
        "codec": c.codec,
        "width": c.width,
        "height": c.height,
        "frame_count": c.frame_count,
        "keyframe_count": c.keyframe_count,
        "start_time": c.wall_start,
        "end_time": c.wall_end,
        "media_start_s": 0.0,
        "media_duration_s": 2.0,
        "discontinuity": False,
        "gap_before_s": 0.0,
        "agent_version": "t",
    }
    doc.update(overrides)
    return Manifest.model_validate(doc)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("moving", None),
        ("dark", "dark"),
        ("bright", "overexposed"),
        ("blurred", "blurred"),
        ("static", "static"),
    ],
)
def test_filters_reject_each_kind_of_useless_footage(
    tmp_path: Path, pattern: str, reason: str | None
) -> None:
    c = chunk_of(tmp_path, pattern)
    result = analyse(c.path.read_bytes(), manifest_like(c), Thresholds())
    assert result.keyframes_decoded == 2  # keyframes only: the cheap pass
    assert verdict(result, Thresholds(), recent=[]) == reason, result.scores
    assert {"luma", "blur_var", "motion"} <= set(result.scores)


def test_filters_near_duplicate_of_a_recent_chunk(tmp_path: Path) -> None:
    c = chunk_of(tmp_path, "moving")
    first = analyse(c.path.read_bytes(), manifest_like(c), Thresholds())
    again = analyse(c.path.read_bytes(), manifest_like(c), Thresholds())
    other = analyse(
        chunk_of(tmp_path, "blurred").path.read_bytes(),
        manifest_like(chunk_of(tmp_path, "blurred")),
        Thresholds(),
    )
    assert verdict(again, Thresholds(), recent=[other.dhash]) is None
    assert verdict(again, Thresholds(), recent=[other.dhash, first.dhash]) == "duplicate"
    assert again.scores["duplicate_distance"] == 0


def test_filters_integrity_rejects_disallowed_codec_and_absurd_duration(tmp_path: Path) -> None:
    c = chunk_of(tmp_path, "moving")
    with pytest.raises(Rejected) as info:
        analyse(c.path.read_bytes(), manifest_like(c), Thresholds(codecs=("hevc",)))
    assert info.value.reason == "codec_not_allowed"
    with pytest.raises(Rejected) as info:
        analyse(c.path.read_bytes(), manifest_like(c, media_duration_s=10_000.0), Thresholds())
    assert info.value.reason == "implausible_duration"


def test_preprocess_samples_resizes_and_is_deterministic(tmp_path: Path) -> None:
    c = chunk_of(tmp_path, "moving")
    m = manifest_like(c)
    options = Options(sample_fps=2.0, short_side=120, jpeg_quality=4)
    body, frames = frames_to_shard(c.path.read_bytes(), m, options, '{"luma": 1}')
    assert frames == 4  # 2 s at 2 frames/s
    table = pq.read_table(io.BytesIO(body))
    assert table.num_rows == 4
    assert table.column("frame_index").to_pylist() == [0, 8, 15, 23]
    assert table.column("pts_s").to_pylist() == pytest.approx([0.0, 8 / 15, 1.0, 23 / 15])
    for jpeg in table.column("jpeg").to_pylist():
        with av.open(io.BytesIO(jpeg)) as img:
            frame = next(img.decode(video=0))
            assert (frame.width, frame.height) == (160, 120)
    again, _ = frames_to_shard(c.path.read_bytes(), m, options, '{"luma": 1}')
    assert again == body  # a redo overwrites the shard with identical bytes


async def test_filters_through_the_consumers_record_verdicts_and_shards(
    stack: Stack, s3: S3, edge: Edge, tmp_path: Path
) -> None:
    good = chunk_of(tmp_path, "moving")
    dark = chunk_of(tmp_path, "dark")
    await edge.send(good, 0)
    await edge.send(dark, 1)
    await edge.send(good, 0)  # the same manifest again: at-least-once delivery
    cloud = cloud_ingest(stack, stack.workdir / "cloud.log", INGEST_RESIZE_SHORT_SIDE="120")
    try:

        async def settled() -> bool:
            st = await queue_state(stack.redis_url)
            return st["length"] == 0 and len(await s3.records(stack.out_bucket)) == 2

        await eventually(settled, 90, "both chunks recorded and the queue empty")
        assert cloud.terminate() == 0
    finally:
        cloud.kill()
    records = {r["manifest"]["seq"]: r for r in await s3.records(stack.out_bucket)}
    assert records[0]["status"] == "accepted" and records[0]["reason"] is None
    assert records[1]["status"] == "rejected" and records[1]["reason"] == "dark"
    assert records[1]["scores"]["luma"] < 20 and records[1]["shard"] is None
    shard = records[0]["shard"]
    table = pq.read_table(io.BytesIO(await s3.get(stack.out_bucket, shard["key"])))
    assert table.num_rows == shard["frames"] == 4
    assert json.loads(table.column("scores")[0].as_py()) == records[0]["scores"]
    [stopped] = cloud.events("deployment.stopped")
    assert stopped["processed"] == 2
    assert stopped["duplicate"] == 1  # redelivered, acknowledged without redoing the work


def test_preprocess_samples_more_than_25_frames_a_second(tmp_path: Path) -> None:
    """A 30 fps chunk sampled at INGEST_SAMPLE_FPS=30: every frame becomes a JPEG. (The
    frames' pts, rescaled to the JPEG encoder's 1/25 s, used to repeat, and the encoder
    refused the chunk as undecodable: with such a setting, every chunk went to the DLQ.)"""
    clip = make_clip(tmp_path / "30fps.mp4", 2, fps=30)
    [c] = segment_file(clip, tmp_path / "30fps-out", 2.0)
    options = Options(sample_fps=30.0, short_side=120, jpeg_quality=4)
    body, frames = frames_to_shard(c.path.read_bytes(), manifest_like(c), options, "{}")
    assert frames == c.frame_count == 60
    assert pq.read_table(io.BytesIO(body)).column("frame_index").to_pylist() == list(range(60))
