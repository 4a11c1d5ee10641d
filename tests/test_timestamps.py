"""Timestamp repair on real PyAV packets, and an MPEG-TS clip that wraps its 33-bit clock."""

from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path

import av

from devstack.media import make_clip
from edge_agent.segmenter import ClosedChunk
from edge_agent.timestamps import MPEGTS_WRAP, TimestampRepair
from tests.support import capture_file

TB = Fraction(1, 90000)
FRAME = 6000  # 15 fps at 90 kHz


def packets(stamps: list[tuple[int | None, int | None]], key_every: int = 15) -> list[av.Packet]:
    out = []
    for i, (pts, dts) in enumerate(stamps):
        p = av.Packet(b"\x00\x00\x01\x65")
        p.pts, p.dts = pts, dts
        p.is_keyframe = i % key_every == 0
        out.append(p)
    return out


def run(
    stamps: list[tuple[int | None, int | None]], **kw: object
) -> tuple[list[int], list[bool], TimestampRepair]:
    repair = TimestampRepair(TB, FRAME, wrap=kw.get("wrap"))  # type: ignore[arg-type]
    result = list(repair.run(packets(stamps)))
    return [p.dts for p, _ in result], [r for _, r in result], repair


def test_timestamps_first_untimed_packets_get_interpolated_dts() -> None:
    dts, resets, repair = run([(None, None), (None, None), (12000, 12000), (18000, 18000)])
    assert dts == [0, 6000, 12000, 18000]
    assert repair.counts["interpolated"] == 2
    assert not any(resets)


def test_timestamps_missing_dts_mid_stream_is_filled() -> None:
    dts, _, _ = run([(0, 0), (6000, None), (None, None), (18000, 18000)])
    assert dts == [0, 6000, 12000, 18000]


def test_timestamps_small_step_back_is_made_monotonic() -> None:
    dts, resets, repair = run([(0, 0), (6000, 6000), (5000, 5000), (12000, 12000)])
    assert dts == sorted(set(dts))  # strictly increasing
    assert repair.counts["reordered"] == 1
    assert not any(resets)


def test_timestamps_clock_jump_resets_the_chunk() -> None:
    jump = 90000 * 3600
    _dts, resets, repair = run([(0, 0), (6000, 6000), (jump, jump), (jump + 6000, jump + 6000)])
    assert resets == [False, False, True, False]
    assert repair.counts["jumps"] == 1


def test_timestamps_mpegts_wrap_keeps_counting_up() -> None:
    near = MPEGTS_WRAP - 2 * FRAME
    stamps = [(t % MPEGTS_WRAP, t % MPEGTS_WRAP) for t in range(near, near + 5 * FRAME, FRAME)]
    dts, resets, repair = run(stamps, wrap=MPEGTS_WRAP)
    assert dts == list(range(near, near + 5 * FRAME, FRAME))
    assert repair.counts["wrapped"] == 1
    assert not any(resets)


def wrapping_ts_clip(tmp_path: Path) -> Path:
    """An MPEG-TS recording whose timestamps cross 2**33 in the middle."""
    src = make_clip(tmp_path / "src.mp4", 6)
    dst = tmp_path / "wrap.ts"
    offset = MPEGTS_WRAP - 3 * 90000  # wraps 3 s in
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mpegts") as out:
        vin = inp.streams.video[0]
        vout = out.add_stream_from_template(vin)
        vout.time_base = TB
        for pkt in inp.demux(vin):
            if pkt.dts is None:
                continue
            pts = int(pkt.pts * vin.time_base / TB) + offset
            dts = int(pkt.dts * vin.time_base / TB) + offset
            pkt.stream = vout
            pkt.time_base = TB
            pkt.pts, pkt.dts = pts, dts  # the muxer writes them modulo 2**33
            out.mux(pkt)
    return dst


def test_timestamps_wrapping_mpegts_recording_is_chunked_contiguously(tmp_path: Path) -> None:
    """Through the agent's own capture path (CameraWorker.capture_from): the timestamp
    repair unwraps the 33-bit clock, so the segmenter never sees the jump back."""
    clip = wrapping_ts_clip(tmp_path)
    chunks: list[ClosedChunk] = []
    capture_file(clip, tmp_path / "out", 2.0, chunks.append)
    assert sum(c.frame_count for c in chunks) == 90
    assert len(chunks) == 3
    for before, after in itertools.pairwise(chunks):
        assert abs(after.media_start_s - before.media_end_s) < 0.1  # no jump across the wrap
