"""Chunk filters, cheapest first.

1. Integrity, hostile input first: the bytes must be the fMP4 the edge writes (not
   another container, sample tables no bigger than the manifest's frame count), the
   manifest's and the stream header's size within ``Thresholds.max_pixels`` and equal,
   every packet demuxed and counted, then at most three keyframes (first, middle, last)
   decoded by a decoder that may not allocate a frame bigger than the declared one. A
   chunk that fails it can never succeed and is dead-lettered (``Rejected``).
2. Content, from those decoded keyframes only: too dark or overexposed (mean
   luma), blurred or occluded (variance of the Laplacian), static (motion
   energy between keyframes), near-duplicate of a recent chunk of the same
   camera (difference hash). A chunk that fails one is *rejected*: recorded
   with its reason and every score, acknowledged, never silently dropped.
Only chunks that pass are fully decoded (``preprocess``).
"""

from __future__ import annotations

import io
import itertools
import math
import struct
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

import av
import numpy as np

from shared.manifest import Manifest, Rejected

GRAY_WIDTH = 256  # analysis resolution: enough for blur, cheap for everything
# Keyframes the filters decode per chunk: the first, the last and one between. The
# duplicate hash already used exactly these three views.
SAMPLED_KEYFRAMES = 3
MAX_SIDE = 16384  # the largest width or height a manifest may declare
# Rows and columns a decoder may add to a frame's allocation (coded size, stride alignment).
DECODER_MARGIN = 64
# What another container looks like from its first bytes. (A chunk is fMP4: ``ftyp`` first.)
_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "png",
    b"\xff\xd8\xff": "jpeg",
    b"\x1a\x45\xdf\xa3": "matroska/webm",
    b"GIF8": "gif",
    b"RIFF": "riff (avi/wav/webp)",
    b"FLV": "flv",
    b"OggS": "ogg",
    b"\x00\x00\x01\xba": "mpeg-ps",
    b"\x00\x00\x00\x01": "h264/hevc elementary stream",
}
# Threads per decoder. An actor's parallelism is its chunks in flight (the decoder releases
# the GIL) and the number of actors; decoder threads on top of that only cost CPU (frame
# threads ~8% more per frame) and make an actor use more cores than Ray reserved for it.
DECODE_THREADS = 1
# Failures of the media libraries on hostile input, beyond their own FFmpegError.
MEDIA_ERRORS = (av.FFmpegError, ValueError, OverflowError, EOFError)


@dataclass(frozen=True, slots=True)
class Thresholds:
    dark_luma: float = 20.0
    bright_luma: float = 235.0
    blur_var: float = 15.0
    static_motion: float = 0.5
    duplicate_bits: int = 3  # of 256 per sampled keyframe
    max_seconds: float = 600.0
    codecs: tuple[str, ...] = ("h264", "hevc")
    # Largest frame (width x height) a chunk may declare: 8K UHD. Checked on the manifest and
    # the stream header before any decoding, and no decoder may allocate a bigger frame.
    max_pixels: int = 7680 * 4320
    # Most frames per second of media a chunk may declare (frame_count / media_duration_s).
    max_fps: float = 300.0


@dataclass(slots=True)
class Analysis:
    codec: str
    width: int
    height: int
    packets: int
    keyframes: int
    keyframes_decoded: int
    # None for a score the chunk cannot give (motion needs two keyframes), with the why in
    # score_notes: outputs are strict JSON, never NaN.
    scores: dict[str, float | None] = field(default_factory=dict)
    score_notes: dict[str, str] = field(default_factory=dict)
    dhash: str = ""
    reason: str | None = None  # None: accepted

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def analyse(data: bytes, manifest: Manifest, limits: Thresholds) -> Analysis:
    """Integrity (raises Rejected) and content scores from the keyframes alone.

    Cheapest and most hostile-proof first: the bytes must be MP4, the manifest's numbers
    plausible, the stream header must match the manifest within ``limits``, the packets must
    match the manifest (demux only), and only then are keyframes decoded, by a decoder that
    cannot allocate a frame bigger than the declared one. Any failure is a ``Rejected``.
    """
    _check_declared(manifest, limits)
    check_container(data, manifest)
    try:
        with open_chunk(data, manifest) as container:
            stream = video_stream(container, manifest, limits.codecs, limits.max_pixels)
            packets = _demux_checked(container, stream, manifest, limits.max_seconds)
            grays = _decode_keyframes(stream, packets, manifest)
            ctx = stream.codec_context
            if not grays:
                check_parsed_size(ctx, manifest, limits.max_pixels)
            result = Analysis(
                str(ctx.name),
                int(ctx.width),
                int(ctx.height),
                len(packets),
                sum(1 for p in packets if p.is_keyframe),
                len(grays),
            )
    except MEDIA_ERRORS as exc:
        raise Rejected("undecodable", str(exc)[:500]) from None
    _check_integrity(result, manifest)
    _score(result, grays)
    return result


def check_container(data: bytes, manifest: Manifest) -> None:
    """Rejected unless ``data`` is what the edge writes: ISO BMFF boxes, ``ftyp`` first, that
    tile the file exactly, and sample tables declaring no more samples than the manifest.

    The demuxer trusts a sample count that costs no bytes (a ``trun`` without per-sample
    fields, an ``stsz`` with one size for all) and builds an index entry for each: a 36 kB
    chunk claiming 15 million samples costs ~250 MB before any check of ours could run.
    """
    if len(data) < 8 or data[4:8] != b"ftyp":
        if len(data) >= 189 and data[0] == data[188] == 0x47:
            raise Rejected("wrong_container", "mpeg-ts, not mp4")
        for magic, name in _SIGNATURES.items():
            if data.startswith(magic):
                raise Rejected("wrong_container", f"{name}, not mp4")
        raise Rejected("undecodable", f"not an mp4 file (starts {data[:8].hex()})")
    fragments, tables = _walk_tables(memoryview(data), 0, len(data), 0)
    samples = max(fragments, tables)
    if samples > manifest.frame_count:
        raise Rejected(
            "frame_count_mismatch",
            f"sample tables declare {samples} samples, manifest says {manifest.frame_count}",
        )


_CONTAINER_BOXES = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"mvex", b"moof", b"traf"}
# Where a box's sample count sits in its payload: after version/flags (and a fixed size).
_SAMPLE_COUNT_AT = {b"trun": 4, b"stsz": 8, b"stz2": 8}
_MAX_DEPTH = 8  # moof/traf/trun, moov/trak/mdia/minf/stbl/stsz: 3 to 6 levels


def _walk_tables(data: memoryview, start: int, end: int, depth: int) -> tuple[int, int]:
    """(samples all the fragments' ``trun`` boxes declare, the most any ``stsz`` declares)
    in ``data[start:end]``, checking on the way that the boxes tile their parent exactly."""
    if depth > _MAX_DEPTH:
        raise Rejected("undecodable", f"boxes nested deeper than {_MAX_DEPTH}")
    pos, fragments, tables = start, 0, 0
    while pos < end:
        if end - pos < 8:
            raise Rejected("undecodable", f"{end - pos} stray bytes at {pos}")
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1 and end - pos >= 16:
            size, header = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:  # to the end of the parent
            size = end - pos
        if size < header or size > end - pos:
            raise Rejected("undecodable", f"box {kind!r} at {pos}: {size} of {end - pos} bytes")
        body, at = pos + header, _SAMPLE_COUNT_AT.get(kind)
        if kind in _CONTAINER_BOXES:
            more, most = _walk_tables(data, body, pos + size, depth + 1)
            fragments, tables = fragments + more, max(tables, most)
        elif at is not None and size - header >= at + 4:
            count = struct.unpack_from(">I", data, body + at)[0]
            if kind == b"trun":
                fragments += count
            else:
                tables = max(tables, count)
        pos += size
    return fragments, tables


def _check_declared(manifest: Manifest, limits: Thresholds) -> None:
    """The manifest's own numbers, before a byte of media is parsed."""
    if not 0 < manifest.media_duration_s <= limits.max_seconds:
        raise Rejected("implausible_duration", f"{manifest.media_duration_s}s")
    w, h = manifest.width, manifest.height
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE and w * h <= limits.max_pixels):
        raise Rejected("absurd_dimensions", f"manifest declares {w}x{h}")
    if manifest.frame_count > max(1.0, manifest.media_duration_s * limits.max_fps):
        raise Rejected(
            "implausible_frame_rate",
            f"{manifest.frame_count} frames in {manifest.media_duration_s}s",
        )


def decoder_max_pixels(width: int, height: int) -> int:
    """The largest frame a decoder may allocate for a stream declared ``width`` x ``height``."""
    return (width + DECODER_MARGIN) * (height + DECODER_MARGIN)


def open_chunk(data: bytes, manifest: Manifest) -> Any:
    """The chunk opened with the MP4 demuxer only, its stream probed without decoding.

    Left alone, the probe decodes up to seven frames (FFmpeg guesses H.264's reorder delay
    that way) that nobody looks at: a quarter of the keyframe pass of a 10 s 1080p chunk, and
    as much again in ``preprocess``. ``skip_frame=all`` keeps it from decoding any, so the
    stream header is the sample description alone; a size that only the parameter sets claim
    is named after decoding (``check_parsed_size``). ``max_pixels`` still bounds what the
    probe's decoder may allocate."""
    bound = decoder_max_pixels(manifest.width, manifest.height)
    return av.open(
        io.BytesIO(data),
        mode="r",
        format="mp4",
        options={"max_pixels": str(bound), "skip_frame": "all"},
        metadata_errors="replace",
    )


def video_stream(
    container: Any, manifest: Manifest, codecs: tuple[str, ...] | None, max_pixels: int
) -> Any:
    """The chunk's video stream, checked from its header alone: a decoder exists, the codec
    is allowed (``codecs``; None: any), the size is within bounds and is the declared one.
    Its decoder is then bounded to frames of that size."""
    if not container.streams.video:
        raise Rejected("undecodable", "no video stream")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if ctx is None:
        raise Rejected("undecodable", "no decoder for the video stream's codec")
    if codecs is not None and str(ctx.name) not in codecs:
        raise Rejected("codec_not_allowed", f"{ctx.name} not in {list(codecs)}")
    w, h = int(ctx.width), int(ctx.height)
    check_dimensions(w, h, manifest, max_pixels, "stream header")
    ctx.options = {"max_pixels": str(decoder_max_pixels(w, h))}
    return stream


def check_dimensions(w: int, h: int, manifest: Manifest, max_pixels: int, source: str) -> None:
    """``source`` says the frames are ``w`` x ``h``: within bounds and the declared size."""
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE and w * h <= max_pixels):
        raise Rejected("absurd_dimensions", f"{source} says {w}x{h}")
    if (w, h) != (manifest.width, manifest.height):
        raise Rejected(
            "dimension_mismatch",
            f"{w}x{h}, manifest says {manifest.width}x{manifest.height}",
        )


def check_parsed_size(ctx: Any, manifest: Manifest, max_pixels: int) -> None:
    """For a decoder that produced no frame: the size its parameter sets claim.

    Parameter sets (the SPS in ``avcC``) claiming another size than the sample description
    make every frame bigger than the decoder may allocate, so nothing decodes; name that, as
    the stream header check does. (The probe at open used to surface that size in the
    header; it no longer decodes, see ``open_chunk``.)"""
    w, h = int(ctx.width), int(ctx.height)
    if w and h:
        check_dimensions(w, h, manifest, max_pixels, "the parameter sets")


def _demux_checked(
    container: Any, stream: Any, manifest: Manifest, max_seconds: float
) -> list[Any]:
    """Every packet, without decoding: as many as declared (never more are read), spanning
    no more media time than a chunk may last."""
    packets: list[Any] = []
    tb = Fraction(stream.time_base or Fraction(1, 90000))
    stamps: list[int] = []
    for pkt in container.demux(stream):
        if not pkt.size:
            continue
        packets.append(pkt)
        if len(packets) > manifest.frame_count:
            break
        ts = pkt.pts if pkt.pts is not None else pkt.dts
        if ts is not None:
            stamps.append(ts)
    if len(packets) != manifest.frame_count:
        more = "more than " if len(packets) > manifest.frame_count else ""
        raise Rejected(
            "frame_count_mismatch",
            f"{more}{len(packets)} packets, manifest says {manifest.frame_count}",
        )
    span = float((max(stamps) - min(stamps)) * tb) if stamps else 0.0
    if span > max_seconds:
        raise Rejected("implausible_duration", f"packets span {span:.3f}s > {max_seconds}s")
    return packets


def sample_keyframes(packets: list[Any], most: int = SAMPLED_KEYFRAMES) -> list[Any]:
    """At most ``most`` keyframe packets, evenly spread and always the first and the last:
    the content scores need a few views of the scene, not every GOP. (Decoding 1080p
    keyframes is most of the filter's cost; the accepted chunks are decoded in full by
    the preprocessing anyway.)"""
    keys = [p for p in packets if p.is_keyframe]
    if len(keys) <= most:
        return keys
    picks = sorted({round(i * (len(keys) - 1) / (most - 1)) for i in range(most)})
    return [keys[i] for i in picks]


def _decode_keyframes(stream: Any, packets: list[Any], manifest: Manifest) -> list[np.ndarray]:
    ctx = stream.codec_context
    ctx.skip_frame = "NONKEY"
    ctx.thread_count = DECODE_THREADS
    grays: list[np.ndarray] = []
    for pkt in [*sample_keyframes(packets), None]:
        for frame in ctx.decode(pkt):
            check_frame(frame, manifest)
            grays.append(_gray(frame))
    return grays


def check_frame(frame: Any, manifest: Manifest) -> None:
    """A decoded frame must be the declared size: never processed otherwise."""
    if (frame.width, frame.height) != (manifest.width, manifest.height):
        raise Rejected(
            "dimension_mismatch",
            f"a frame decodes to {frame.width}x{frame.height}, "
            f"manifest says {manifest.width}x{manifest.height}",
        )


def _gray(frame: Any) -> np.ndarray:
    # At least 3 rows, so the Laplacian has one (a 16384x2 frame would otherwise give none).
    height = max(3, round(frame.height * GRAY_WIDTH / max(1, frame.width)))
    small = frame.reformat(width=GRAY_WIDTH, height=height, format="gray")
    return np.asarray(small.to_ndarray(), dtype=np.float32)


def _check_integrity(result: Analysis, manifest: Manifest) -> None:
    """What only decoding could tell (the rest was checked before any decoding)."""
    if result.keyframes_decoded == 0:
        raise Rejected("undecodable", "no keyframe could be decoded")
    if (result.width, result.height) != (manifest.width, manifest.height):
        raise Rejected(
            "dimension_mismatch",
            f"{result.width}x{result.height}, manifest says {manifest.width}x{manifest.height}",
        )


def _score(result: Analysis, grays: list[np.ndarray]) -> None:
    luma = float(np.mean([g.mean() for g in grays]))
    blur = float(np.median([_laplacian_var(g) for g in grays]))
    motion = None
    if len(grays) > 1:
        motion = float(np.mean([np.abs(a - b).mean() for a, b in itertools.pairwise(grays)]))
    else:
        result.score_notes["motion"] = "one keyframe decoded: no motion between keyframes"
    for name, value in (("luma", luma), ("blur_var", blur), ("motion", motion)):
        if value is not None and not math.isfinite(value):
            result.score_notes[name] = f"not a finite number ({value})"
            value = None
        result.scores[name] = None if value is None else round(value, 3)
    picks = sorted({0, len(grays) // 2, len(grays) - 1})
    result.dhash = "|".join(_dhash(grays[i]) for i in picks)


def _laplacian_var(g: np.ndarray) -> float:
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


def _dhash(g: np.ndarray, size: int = 16) -> str:
    """256-bit difference hash: is each cell of a 16x17 grid brighter than its right
    neighbour. Fine enough that a person crossing part of a fixed view changes it."""
    h, w = g.shape
    ys = (np.arange(size) * h) // size
    xs = (np.arange(size + 1) * w) // (size + 1)
    cells = np.add.reduceat(np.add.reduceat(g, ys, axis=0), xs, axis=1)
    bits = (cells[:, 1:] > cells[:, :-1]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):0{size * size // 4}x}"


def hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def distance(a: str, b: str) -> int | None:
    """The largest per-frame distance between two chunks' hashes; None if not comparable."""
    fa, fb = a.split("|"), b.split("|")
    if len(fa) != len(fb) or any(len(x) != len(y) for x, y in zip(fa, fb, strict=True)):
        return None
    return max(hamming(x, y) for x, y in zip(fa, fb, strict=True))


def verdict(result: Analysis, limits: Thresholds, recent: list[str]) -> str | None:
    """The first content reason to reject, or None. Order: cheapest evidence first."""
    s = result.scores
    luma, blur, motion = s.get("luma"), s.get("blur_var"), s.get("motion")
    if luma is not None and luma < limits.dark_luma:
        return "dark"
    if luma is not None and luma > limits.bright_luma:
        return "overexposed"
    if blur is not None and blur < limits.blur_var:
        return "blurred"
    if motion is not None and motion < limits.static_motion:  # None: one keyframe, unknown
        return "static"
    distances = [d for other in recent if (d := distance(result.dhash, other)) is not None]
    if distances:
        s["duplicate_distance"] = min(distances)
        if min(distances) <= limits.duplicate_bits:
            return "duplicate"
    return None
