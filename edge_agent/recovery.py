"""Salvage chunks cut short by a crash or power loss.

A chunk file is fragmented MP4: ``ftyp``, ``moov``, then one ``moof``+``mdat``
pair per GOP, each written whole when the next keyframe arrives. After a
``kill -9`` the file ends after its last complete fragment or inside one; after
a power loss its tail may also read back as zeros or stale blocks. We walk the
top-level boxes, keep the file up to the last complete ``mdat``, then decode
that prefix and cut it back to the last fragment before anything that does not
decode (or carries a broken timeline). A file with no such fragment is
quarantined as it was found, never uploaded.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from edge_agent.durable import fsync_and_hash
from edge_agent.segmenter import ClosedChunk, parse_partial_name

MAX_SIDE = 16384  # the largest width or height a manifest may declare
MAX_CHUNK_S = 3600.0  # chunks last EDGE_SEGMENT_SECONDS (<= 600) plus a GOP: more is broken
# The timestamp repair closes a chunk at any jump over 5 s: a bigger step inside a chunk
# file is damage (a flipped tfdt), not footage.
MAX_DTS_STEP_S = 5.0
# What PyAV raises on hostile bytes, besides its own FFmpegError.
_MEDIA_ERRORS = (av.FFmpegError, ValueError, OverflowError, EOFError)


def _top_boxes(path: Path) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of the whole top-level boxes, up to the first one that is not."""
    out: list[tuple[bytes, int, int]] = []
    size = path.stat().st_size
    pos = 0
    with path.open("rb") as fh:
        while pos + 8 <= size:
            fh.seek(pos)
            head = fh.read(16)
            length, kind = struct.unpack_from(">I4s", head)
            if length == 1:  # 64-bit size follows
                if len(head) < 16:
                    break
                length = struct.unpack_from(">Q", head, 8)[0]
            if length < 8 or pos + length > size:
                break
            out.append((kind, pos, pos + length))
            pos += length
    return out


def _fragments(path: Path) -> list[tuple[int, int]]:
    """(start, end) of each complete fragment after the ``moov``: from the end of what came
    before (the ``moov`` or the previous ``mdat``) to the end of its own ``mdat``."""
    out: list[tuple[int, int]] = []
    start: int | None = None
    for kind, _, end in _top_boxes(path):
        if kind == b"moov":
            start = end
        elif kind == b"mdat" and start is not None:
            out.append((start, end))
            start = end
    return out


def complete_prefix(path: Path) -> int:
    """Bytes of ``path`` that form whole boxes ending with a complete fragment (0: none)."""
    fragments = _fragments(path)
    return fragments[-1][1] if fragments else 0


@dataclass(slots=True)
class _Facts:
    codec: str
    width: int
    height: int
    time_base: Fraction
    frames: int = 0
    keyframes: int = 0
    start: int | None = None
    end: int = 0
    last_dts: int | None = None


def salvage(path: Path) -> ClosedChunk | None:
    """Cut to the complete fragments that decode and describe the result; None if nothing
    is usable (the file is then left exactly as it was found, for the quarantine).

    Every kept packet is decoded: a salvage happens only after a crash, and a tail of
    zeros or stale blocks must not be uploaded as footage.
    """
    parsed = parse_partial_name(path.name)
    if parsed is None:
        return None
    camera_id, wall_start = parsed
    fragments = _fragments(path)
    if not fragments:
        return None
    try:
        keep, facts = _usable_prefix(path, fragments)
    except _MEDIA_ERRORS:
        return None
    if keep == 0 or facts is None:
        return None
    with path.open("rb+") as fh:
        fh.truncate(keep)
        os.fsync(fh.fileno())
    return _chunk(path, camera_id, wall_start, facts)


def _usable_prefix(path: Path, fragments: list[tuple[int, int]]) -> tuple[int, _Facts | None]:
    """Decode the complete fragments; at the first packet that is not good (does not
    decode, is flagged corrupt, has no or a non-increasing DTS, decodes to another size),
    cut back to the start of its fragment; otherwise keep up to the end of the last
    fragment that held a packet. (Bytes to keep, what they hold.)"""
    end = fragments[-1][1]
    with av.open(str(path), format="mp4", options={"max_pixels": str(MAX_SIDE**2)}) as src:
        if not src.streams.video or src.streams.video[0].codec_context is None:
            return 0, None
        stream = src.streams.video[0]
        ctx = stream.codec_context
        size = (int(ctx.width), int(ctx.height))
        if not (0 < size[0] <= MAX_SIDE and 0 < size[1] <= MAX_SIDE):
            return 0, None
        ctx.thread_count = 1  # an error surfaces at the packet that caused it
        tb = Fraction(stream.time_base or Fraction(1, 90000))
        facts = _Facts(str(ctx.name), size[0], size[1], tb)
        good, current = replace(facts), 0
        try:
            for pkt in src.demux(stream):
                if not pkt.size:
                    continue
                pos = -1 if pkt.pos is None else int(pkt.pos)
                if pos >= end:  # the torn fragment after the complete ones
                    break
                at = _fragment_of(pos, fragments)
                if at is not None and at != current:
                    good, current = replace(facts), at  # the fragments before this one are good
                if at is None or at < current or not _decode_and_count(facts, pkt, ctx, size):
                    return fragments[current][0], _described(good)
            if any((f.width, f.height) != size for f in ctx.decode(None)):
                return fragments[current][0], _described(good)
        except _MEDIA_ERRORS:  # the demuxer or the decoder gave up inside this fragment
            return fragments[current][0], _described(good)
        return fragments[current][1], _described(facts)


def _fragment_of(pos: int, fragments: list[tuple[int, int]]) -> int | None:
    for i, (start, end) in enumerate(fragments):
        if start <= pos < end:
            return i
    return None


def _decode_and_count(facts: _Facts, pkt: Any, ctx: Any, size: tuple[int, int]) -> bool:
    """Check, decode and count one packet; False if it is not good."""
    if pkt.is_corrupt or pkt.dts is None:
        return False
    if facts.last_dts is not None and not (
        0 < pkt.dts - facts.last_dts <= MAX_DTS_STEP_S / facts.time_base
    ):
        return False
    try:
        frames = ctx.decode(pkt)
    except av.FFmpegError:
        return False
    if any((f.width, f.height) != size for f in frames):
        return False
    pts = pkt.pts if pkt.pts is not None else pkt.dts
    facts.start = pts if facts.start is None else min(facts.start, pts)
    facts.end = max(facts.end, pts + (pkt.duration or 0))
    facts.last_dts = pkt.dts
    facts.frames += 1
    facts.keyframes += int(pkt.is_keyframe)
    return True


def _described(facts: _Facts) -> _Facts | None:
    """``facts`` if a manifest can describe them: a keyframe, a plausible span of media
    time, a codec name the manifest accepts."""
    if facts.frames == 0 or facts.keyframes == 0 or facts.start is None:
        return None
    if not re.fullmatch(r"[a-z0-9_]{1,32}", facts.codec):
        return None
    duration = float((facts.end - facts.start) * facts.time_base)
    if not 0 < duration <= MAX_CHUNK_S:
        return None
    return facts


def _chunk(path: Path, camera_id: str, wall_start: datetime, facts: _Facts) -> ClosedChunk:
    assert facts.start is not None
    sha, size = fsync_and_hash(path)
    tb = facts.time_base
    return ClosedChunk(
        camera_id=camera_id,
        path=path,
        sha256=sha,
        size_bytes=size,
        codec=facts.codec,
        width=facts.width,
        height=facts.height,
        frame_count=facts.frames,
        keyframe_count=facts.keyframes,
        media_start_s=float(facts.start * tb),
        media_end_s=float(facts.end * tb),
        wall_start=wall_start,
        wall_end=wall_start + timedelta(seconds=float((facts.end - facts.start) * tb)),
        session_start=True,
        cause="agent_restart",  # the rest of its session died with the agent
    )
