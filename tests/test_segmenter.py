"""Chunking: keyframe-aligned, no re-encode, every source frame exactly once."""

from __future__ import annotations

import hashlib
from pathlib import Path

import av
import pytest

from devstack.media import make_clip, remux
from edge_agent.segmenter import ClosedChunk
from tests.support import segment_file


def video_packets(path: Path) -> list[tuple[str, bool]]:
    """(sha256 of payload, is_keyframe) of every video packet, in decode order."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        return [
            (hashlib.sha256(bytes(p)).hexdigest(), bool(p.is_keyframe))
            for p in c.demux(v)
            if p.size
        ]


def segment(
    clip: Path, out: Path, seconds: float, loop: bool = False, limit: int = 0
) -> list[ClosedChunk]:
    chunks: list[ClosedChunk] = segment_file(clip, out, seconds, loop=loop, limit=limit)
    return chunks


def test_segmenter_cuts_on_keyframes_and_covers_every_frame_once(
    clip: Path, tmp_path: Path
) -> None:
    chunks = segment(clip, tmp_path, 2.0)
    assert len(chunks) == 3
    source = video_packets(clip)
    joined: list[tuple[str, bool]] = []
    for c in chunks:
        pkts = video_packets(c.path)
        assert pkts[0][1], f"{c.path} does not start with a keyframe"
        assert len(pkts) == c.frame_count
        assert sum(k for _, k in pkts) == c.keyframe_count
        joined.extend(pkts)
    assert (
        joined == source
    )  # byte-identical packets: remuxed, not re-encoded; none lost or repeated


def test_segmenter_chunks_decode_and_carry_media_times(clip: Path, tmp_path: Path) -> None:
    chunks = segment(clip, tmp_path, 2.0)
    assert [c.media_start_s for c in chunks] == [0.0, 2.0, 4.0]
    assert chunks[-1].media_end_s == pytest.approx(6.0)
    for c in chunks:
        with av.open(str(c.path)) as f:
            assert len(list(f.decode(video=0))) == c.frame_count == 30
        assert (c.codec, c.width, c.height) == ("h264", 320, 240)


def test_segmenter_never_cuts_inside_a_gop_longer_than_the_segment(tmp_path: Path) -> None:
    long_gop = make_clip(tmp_path / "gop.mp4", 9, gop=45)  # 3 s GOPs
    chunks = segment(long_gop, tmp_path / "out", 1.0)
    assert [c.frame_count for c in chunks] == [45, 45, 45]
    assert all(c.keyframe_count == 1 for c in chunks)


def test_segmenter_loop_replay_keeps_media_time_monotonic(clip: Path, tmp_path: Path) -> None:
    chunks = segment(clip, tmp_path, 2.0, loop=True, limit=200)
    starts = [c.media_start_s for c in chunks]
    assert starts == sorted(starts)
    assert starts[:6] == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]


def test_segmenter_handles_hevc(tmp_path: Path) -> None:
    hevc = make_clip(tmp_path / "hevc.mp4", 4, codec="libx265")
    chunks = segment(hevc, tmp_path / "out", 2.0)
    assert [c.codec for c in chunks] == ["hevc", "hevc"]
    joined = [p for c in chunks for p in video_packets(c.path)]
    assert joined == video_packets(hevc)


def test_segmenter_resolution_change_mid_stream_starts_a_new_chunk(tmp_path: Path) -> None:
    """An MPEG-TS stream switches from 320x240 to 640x480 in-band (new SPS, no new session)."""
    small = remux(
        make_clip(tmp_path / "a.mp4", 3, width=320, height=240), tmp_path / "a.ts", "mpegts"
    )
    large = remux(
        make_clip(tmp_path / "b.mp4", 3, width=640, height=480), tmp_path / "b.ts", "mpegts"
    )
    joined = tmp_path / "switch.ts"
    joined.write_bytes(small.read_bytes() + large.read_bytes())
    chunks = segment(joined, tmp_path / "out", 2.0)
    sizes = [(c.width, c.height) for c in chunks]
    assert sizes[0] == (320, 240) and sizes[-1] == (640, 480)
    assert sizes == sorted(sizes)  # no chunk goes back, none mixes the two
    assert sum(c.frame_count for c in chunks) == 90
    for c in chunks:
        with av.open(str(c.path)) as f:
            frames = list(f.decode(video=0))
        assert len(frames) == c.frame_count
        assert {(fr.width, fr.height) for fr in frames} == {(c.width, c.height)}


def test_segmenter_chunks_tile_the_wall_clock_and_a_stall_is_not_footage(
    clip: Path, tmp_path: Path
) -> None:
    """Each cut ends one chunk and starts the next at one instant (nothing between them
    for the coverage audit to call unexplained). A chunk flushed after its stream went
    silent ends a frame after its last packet, not when the silence was noticed: the
    stall is the next connection's declared gap, not footage."""
    import itertools
    import threading
    import time
    from datetime import UTC, datetime

    from edge_agent.capture import Source, SourceSpec
    from edge_agent.segmenter import Segmenter

    chunks: list[ClosedChunk] = []
    source = Source(f"file://{clip}", threading.Event())
    source.spec = SourceSpec(source.spec.target, {}, realtime=False, loop=False)
    seg = Segmenter("cam1", source.stream, tmp_path, 2.0, chunks.append, cause="reconnect")
    for pkt in source.packets():
        seg.feed(pkt)
    source.close()
    time.sleep(0.5)  # the stall itself (what is measured), not a wait for a condition
    stalled_at = datetime.now(UTC)
    seg.flush(seg.ended())
    assert len(chunks) == 3
    for before, after in itertools.pairwise(chunks):
        assert after.wall_start == before.wall_end
    assert (stalled_at - chunks[-1].wall_end).total_seconds() >= 0.4
    # The connection's cause goes with its first chunk only.
    assert [c.cause for c in chunks] == ["reconnect", None, None]
