"""Chunk filters, cheapest first.

1. Integrity (demux every packet, decode keyframes only): a chunk that fails it
   can never succeed and is dead-lettered.
2. Content, from the decoded keyframes only: too dark or overexposed (mean
   luma), blurred or occluded (variance of the Laplacian), static (motion
   energy between keyframes), near-duplicate of a recent chunk of the same
   camera (difference hash). A chunk that fails one is *rejected*: recorded
   with its reason and every score, acknowledged, never silently dropped.
Only chunks that pass are fully decoded (``preprocess``).
"""

from __future__ import annotations

import io
import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import av
import numpy as np

from shared.manifest import Manifest, Rejected

GRAY_WIDTH = 256  # analysis resolution: enough for blur, cheap for everything


@dataclass(frozen=True, slots=True)
class Thresholds:
    dark_luma: float = 20.0
    bright_luma: float = 235.0
    blur_var: float = 15.0
    static_motion: float = 0.5
    duplicate_bits: int = 3  # of 256 per sampled keyframe
    max_seconds: float = 600.0
    codecs: tuple[str, ...] = ("h264", "hevc")


@dataclass(slots=True)
class Analysis:
    codec: str
    width: int
    height: int
    packets: int
    keyframes: int
    keyframes_decoded: int
    scores: dict[str, float] = field(default_factory=dict)
    dhash: str = ""
    reason: str | None = None  # None: accepted

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def analyse(data: bytes, manifest: Manifest, limits: Thresholds) -> Analysis:
    """Integrity (raises Rejected) and content scores from the keyframes alone."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise Rejected("undecodable", "no video stream")
            stream = container.streams.video[0]
            stream.codec_context.skip_frame = "NONKEY"
            packets = keyframes = 0
            grays: list[np.ndarray] = []
            for pkt in container.demux(stream):
                packets += int(bool(pkt.size))
                keyframes += int(bool(pkt.size) and pkt.is_keyframe)
                for frame in stream.codec_context.decode(pkt if pkt.size else None):
                    grays.append(_gray(frame))
            ctx = stream.codec_context
            result = Analysis(
                str(ctx.name), int(ctx.width), int(ctx.height), packets, keyframes, len(grays)
            )
    except av.FFmpegError as exc:
        raise Rejected("undecodable", str(exc)[:500]) from None
    _check_integrity(result, manifest, limits)
    _score(result, grays)
    return result


def _gray(frame: Any) -> np.ndarray:
    height = max(2, round(frame.height * GRAY_WIDTH / max(1, frame.width)))
    small = frame.reformat(width=GRAY_WIDTH, height=height, format="gray")
    return np.asarray(small.to_ndarray(), dtype=np.float32)


def _check_integrity(result: Analysis, manifest: Manifest, limits: Thresholds) -> None:
    if result.keyframes_decoded == 0:
        raise Rejected("undecodable", "no keyframe could be decoded")
    if result.codec not in limits.codecs:
        raise Rejected("codec_not_allowed", f"{result.codec} not in {list(limits.codecs)}")
    if result.packets != manifest.frame_count:
        raise Rejected(
            "frame_count_mismatch",
            f"{result.packets} packets, manifest says {manifest.frame_count}",
        )
    if (result.width, result.height) != (manifest.width, manifest.height):
        raise Rejected(
            "dimension_mismatch",
            f"{result.width}x{result.height}, manifest says {manifest.width}x{manifest.height}",
        )
    if not 0 < manifest.media_duration_s <= limits.max_seconds:
        raise Rejected("implausible_duration", f"{manifest.media_duration_s}s")


def _score(result: Analysis, grays: list[np.ndarray]) -> None:
    luma = float(np.mean([g.mean() for g in grays]))
    blur = float(np.median([_laplacian_var(g) for g in grays]))
    motion = (
        float(np.mean([np.abs(a - b).mean() for a, b in itertools.pairwise(grays)]))
        if len(grays) > 1
        else float("nan")
    )
    result.scores = {"luma": round(luma, 3), "blur_var": round(blur, 3), "motion": round(motion, 3)}
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
    if s["luma"] < limits.dark_luma:
        return "dark"
    if s["luma"] > limits.bright_luma:
        return "overexposed"
    if s["blur_var"] < limits.blur_var:
        return "blurred"
    if not np.isnan(s["motion"]) and s["motion"] < limits.static_motion:
        return "static"
    distances = [d for other in recent if (d := distance(result.dhash, other)) is not None]
    if distances:
        s["duplicate_distance"] = min(distances)
        if min(distances) <= limits.duplicate_bits:
            return "duplicate"
    return None
