"""Training-ready frames: decode an accepted chunk, sample, resize, JPEG, one Parquet shard.

Deterministic for the same chunk and settings (same frames, same JPEG bytes,
same Parquet bytes), so a redo after a redelivery overwrites the shard with an
identical one.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from datetime import timedelta
from fractions import Fraction
from typing import Any

import av
import pyarrow as pa
import pyarrow.parquet as pq

from cloud_ingest.filters import (
    DECODE_THREADS,
    MAX_SIDE,
    MEDIA_ERRORS,
    Analysis,
    Thresholds,
    analyse,
    check_container,
    check_frame,
    check_parsed_size,
    open_chunk,
    verdict,
    video_stream,
)
from shared.manifest import Manifest, Rejected

# A frame this long after the chunk's first is a broken timeline (and past datetime's range
# for a hostile one), whatever the manifest says.
MAX_FRAME_OFFSET_S = 86400.0

SCHEMA = pa.schema(
    [
        ("camera_id", pa.string()),
        ("site_id", pa.string()),
        ("chunk_id", pa.string()),
        ("frame_index", pa.int32()),
        ("pts_s", pa.float64()),
        ("utc_time", pa.timestamp("us", tz="UTC")),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("jpeg", pa.binary()),
        ("scores", pa.string()),
    ]
)


@dataclass(frozen=True, slots=True)
class Options:
    sample_fps: float = 2.0
    short_side: int = 256
    jpeg_quality: int = 4  # mjpeg qscale: 2 (best) .. 31


def _size(width: int, height: int, short_side: int) -> tuple[int, int]:
    scale = short_side / min(width, height)
    if scale >= 1:
        return width - width % 2, height - height % 2
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _encoder(width: int, height: int, quality: int) -> Any:
    enc: Any = av.CodecContext.create("mjpeg", "w")
    enc.width, enc.height, enc.pix_fmt = width, height, "yuvj420p"
    enc.time_base = Fraction(1, 25)
    enc.options = {"qmin": str(quality), "qmax": str(quality)}
    enc.thread_count = 1
    return enc


@dataclass(slots=True)
class MediaResult:
    analysis: Analysis  # its ``reason`` is the verdict: None when accepted
    shard: bytes | None  # Parquet, for accepted chunks only
    frames: int
    timings: dict[str, float] = field(default_factory=dict)


def warm_up() -> None:
    """What a fresh process pays on its first chunk, paid ahead (in a media worker, before
    it says it is ready, so the time limit never counts it): Parquet's first write alone
    costs ~0.2 s, ten times a small chunk's whole media work."""
    frame = av.VideoFrame(16, 16, "yuvj420p")
    b"".join(bytes(p) for p in _encoder(16, 16, 4).encode(frame))
    pq.write_table(pa.table({name: [] for name in SCHEMA.names}, schema=SCHEMA), io.BytesIO())


def scores_json(analysis: Analysis) -> str:
    """The scores as the shard's ``scores`` column holds them: strict JSON (no NaN)."""
    return json.dumps(analysis.scores, sort_keys=True, allow_nan=False)


def media_work(
    data: bytes, manifest: Manifest, limits: Thresholds, recent: list[str], options: Options
) -> MediaResult:
    """A chunk's whole media work in one call (what a media worker runs under the time
    limit): integrity and scores, the verdict against the camera's ``recent`` hashes, and
    the shard of an accepted chunk."""
    t0 = time.monotonic()
    analysis = analyse(data, manifest, limits)
    analysis.reason = verdict(analysis, limits, recent)
    result = MediaResult(analysis, None, 0, {"filter_s": time.monotonic() - t0})
    if analysis.reason is None:
        t0 = time.monotonic()
        result.shard, result.frames = frames_to_shard(
            data, manifest, options, scores_json(analysis)
        )
        result.timings["preprocess_s"] = time.monotonic() - t0
    return result


def frames_to_shard(
    data: bytes, manifest: Manifest, options: Options, scores_json: str
) -> tuple[bytes, int]:
    """Returns (Parquet bytes, number of frames). Raises Rejected for a chunk that is not the
    MP4 its manifest describes; no decoder may allocate a frame bigger than the declared one,
    and a frame of another size is never processed."""
    check_container(data, manifest)
    if not (0 < manifest.width <= MAX_SIDE and 0 < manifest.height <= MAX_SIDE):
        raise Rejected("absurd_dimensions", f"manifest declares {manifest.width}x{manifest.height}")
    try:
        rows = _frames(data, manifest, options, scores_json)
    except MEDIA_ERRORS as exc:
        raise Rejected("undecodable", str(exc)[:500]) from None
    table = pa.table(rows, schema=SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="none", write_statistics=False)
    return sink.getvalue(), table.num_rows


def _frames(
    data: bytes, manifest: Manifest, options: Options, scores_json: str
) -> dict[str, list[Any]]:
    rows: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    declared = manifest.width * manifest.height
    with open_chunk(data, manifest) as container:
        stream = video_stream(container, manifest, None, declared)
        stream.codec_context.thread_count = DECODE_THREADS
        tb = Fraction(stream.time_base or Fraction(1, 90000))
        origin: int | None = None
        next_t = 0.0
        enc = None
        for index, frame in enumerate(container.decode(stream)):
            check_frame(frame, manifest)
            pts = frame.pts if frame.pts is not None else 0
            origin = pts if origin is None else origin
            t = float((pts - origin) * tb)
            if t + 1e-6 < next_t:
                continue
            if t > MAX_FRAME_OFFSET_S:
                raise Rejected("implausible_duration", f"a frame {t:.0f}s after the first")
            next_t += 1.0 / options.sample_fps
            w, h = _size(frame.width, frame.height, options.short_side)
            enc = enc or _encoder(w, h, options.jpeg_quality)
            small = frame.reformat(width=w, height=h, format="yuvj420p")
            # Numbered in the encoder's own 1/25 s time base: the frame's pts, rescaled to
            # it, repeats when more than 25 frames a second are sampled, and the encoder
            # refuses a repeated pts (EINVAL: every such chunk was "undecodable").
            small.pts, small.time_base = len(rows["jpeg"]), enc.time_base
            jpeg = b"".join(bytes(p) for p in enc.encode(small))
            _append(rows, manifest, index, t, w, h, jpeg, scores_json)
        if not rows["frame_index"]:  # nothing decoded: perhaps a size it may not allocate
            check_parsed_size(stream.codec_context, manifest, declared)
    return rows


def _append(
    rows: dict[str, list[Any]],
    m: Manifest,
    index: int,
    t: float,
    w: int,
    h: int,
    jpeg: bytes,
    scores_json: str,
) -> None:
    rows["camera_id"].append(m.camera_id)
    rows["site_id"].append(m.site_id)
    rows["chunk_id"].append(m.chunk_id)
    rows["frame_index"].append(index)
    rows["pts_s"].append(round(m.media_start_s + t, 6))
    rows["utc_time"].append(m.start_time + timedelta(seconds=t))
    rows["width"].append(w)
    rows["height"].append(h)
    rows["jpeg"].append(jpeg)
    rows["scores"].append(scores_json)
