"""In-band parameter sets, to notice a resolution or codec-profile change mid-stream.

Cameras that change resolution without a new session send new SPS/PPS (H.264)
or VPS/SPS/PPS (HEVC) with the next keyframe. The container's header still
describes the old stream, so the change must start a new chunk whose header
carries the new parameter sets and dimensions.
"""

from __future__ import annotations

from typing import Any

import av

HEAD_BYTES = 4096  # parameter sets sit before the first slice; SEI can push them back a little

_PARAM_TYPES = {"h264": {7, 8}, "hevc": {32, 33, 34}}
_VCL = {"h264": set(range(1, 6)), "hevc": set(range(0, 32))}


def _nal_type(codec: str, header: int) -> int:
    return header & 0x1F if codec == "h264" else (header >> 1) & 0x3F


def parameter_sets(data: bytes, codec: str) -> bytes | None:
    """The Annex B parameter-set NAL units before the first slice, or None (none in-band)."""
    wanted = _PARAM_TYPES.get(codec)
    if wanted is None:
        return None
    found: list[bytes] = []
    starts = _start_codes(data)
    for i, (pos, size) in enumerate(starts):
        begin = pos + size
        if begin >= len(data):
            break
        kind = _nal_type(codec, data[begin])
        if kind in _VCL[codec]:
            break
        if kind in wanted:
            end = starts[i + 1][0] if i + 1 < len(starts) else len(data)
            found.append(b"\x00\x00\x00\x01" + data[begin:end].rstrip(b"\x00"))
    return b"".join(found) or None


def _start_codes(data: bytes) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = data.find(b"\x00\x00\x01")
    while pos >= 0:
        if pos > 0 and data[pos - 1] == 0:
            out.append((pos - 1, 4))
        else:
            out.append((pos, 3))
        pos = data.find(b"\x00\x00\x01", pos + 3)
    return out


def dimensions(codec: str, keyframe: Any) -> tuple[int, int]:
    """Decode one keyframe (with its in-band parameter sets) to learn the new size."""
    ctx: Any = av.CodecContext.create(codec, "r")
    ctx.thread_count = 1
    frames = ctx.decode(keyframe) + ctx.decode(None)
    if not frames:
        raise ValueError("keyframe did not decode")
    return int(frames[0].width), int(frames[0].height)
