"""Salvage chunks cut short by a crash or power loss.

A chunk file is fragmented MP4: ``ftyp``, ``moov``, then one ``moof``+``mdat``
pair per GOP, each written whole when the next keyframe arrives. After a
``kill -9`` the file ends after its last complete fragment or inside one. We
walk the top-level boxes, cut the file after the last complete ``mdat``, and
check that what is left demuxes. A file with no complete fragment is
quarantined, never uploaded.
"""

from __future__ import annotations

import os
import struct
from datetime import datetime, timedelta
from fractions import Fraction
from pathlib import Path

import av

from edge_agent.segmenter import ClosedChunk, fsync_and_hash, parse_partial_name


def complete_prefix(path: Path) -> int:
    """Bytes of ``path`` that form whole boxes ending with a complete fragment (0: none)."""
    size = path.stat().st_size
    pos, good, seen_moov = 0, 0, False
    with path.open("rb") as fh:
        while pos + 8 <= size:
            fh.seek(pos)
            length, kind = struct.unpack(">I4s", fh.read(8))
            if length == 1:  # 64-bit size follows
                length = struct.unpack(">Q", fh.read(8))[0]
            if length < 8 or pos + length > size:
                break
            pos += length
            seen_moov = seen_moov or kind == b"moov"
            if kind == b"mdat" and seen_moov:
                good = pos
    return good


def salvage(path: Path) -> ClosedChunk | None:
    """Truncate to complete fragments and describe the result; None if nothing is usable."""
    parsed = parse_partial_name(path.name)
    if parsed is None:
        return None
    camera_id, wall_start = parsed
    keep = complete_prefix(path)
    if keep == 0:
        return None
    with path.open("rb+") as fh:
        fh.truncate(keep)
        os.fsync(fh.fileno())
    try:
        return _describe(path, camera_id, wall_start)
    except (av.FFmpegError, ValueError):
        return None


def _describe(path: Path, camera_id: str, wall_start: datetime) -> ClosedChunk | None:
    frames = keyframes = 0
    start: int | None = None
    end = 0
    with av.open(str(path)) as src:
        stream = src.streams.video[0]
        tb = Fraction(stream.time_base or Fraction(1, 90000))
        ctx = stream.codec_context
        codec, width, height = str(ctx.name), int(ctx.width), int(ctx.height)
        for pkt in src.demux(stream):
            if not pkt.size or pkt.dts is None or pkt.is_corrupt:
                continue
            pts = pkt.pts if pkt.pts is not None else pkt.dts
            start = pts if start is None else min(start, pts)
            end = max(end, pts + (pkt.duration or 0))
            frames += 1
            keyframes += int(pkt.is_keyframe)
    if frames == 0 or keyframes == 0 or start is None:
        return None
    sha, size = fsync_and_hash(path)
    duration = float((end - start) * tb)
    return ClosedChunk(
        camera_id=camera_id,
        path=path,
        sha256=sha,
        size_bytes=size,
        codec=codec,
        width=width,
        height=height,
        frame_count=frames,
        keyframe_count=keyframes,
        media_start_s=float(start * tb),
        media_end_s=float(end * tb),
        wall_start=wall_start,
        wall_end=wall_start + timedelta(seconds=duration),
        session_start=True,
    )
