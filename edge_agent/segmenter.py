"""Keyframe-aligned chunking by remux only (no decode, no re-encode).

A chunk opens on a keyframe and closes at the first keyframe at or past the
segment length, so a long GOP makes a longer chunk rather than a cut mid-GOP.
Chunks are fragmented MP4 (a fragment per GOP), written to a temp file and
fsync'd; the spool then gives the file its final name.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from edge_agent.capture import CameraError
from edge_agent.durable import fsync_and_hash
from shared.params import HEAD_BYTES, dimensions, parameter_sets

FMP4_OPTIONS = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}


@dataclass(frozen=True, slots=True)
class ClosedChunk:
    """A finished, durable chunk file and what the manifest needs to know about it."""

    camera_id: str
    path: Path
    sha256: str
    size_bytes: int
    codec: str
    width: int
    height: int
    frame_count: int
    keyframe_count: int
    media_start_s: float
    media_end_s: float
    wall_start: datetime
    wall_end: datetime
    session_start: bool  # first chunk since the camera (re)connected
    clock_drift_s: float = 0.0  # wall time minus media time elapsed since the connection began
    # Why this chunk does not follow on from the one before, if it does not (a GapCause:
    # the connection's cause for a session's first chunk, else what cut the timeline).
    cause: str | None = None


class ParameterChangeError(ValueError):
    """The stream changed in-band in a way we cannot describe; reconnecting re-probes it."""


@dataclass(frozen=True, slots=True)
class StreamParams:
    extradata: bytes
    width: int
    height: int


def partial_name(camera_id: str, wall_start: datetime) -> str:
    """``{camera}+{start µs}+{random}.mp4.partial``: '+' never occurs in a camera id."""
    micros = int(wall_start.timestamp() * 1_000_000)
    return f"{camera_id}+{micros}+{uuid.uuid4().hex[:12]}.mp4.partial"


def parse_partial_name(name: str) -> tuple[str, datetime] | None:
    """(camera, wall start) from a partial's name; None for a name we did not write (a
    start time out of datetime's range included: it used to crash every start-up)."""
    parts = name.split("+")
    if len(parts) != 3 or not parts[1].isdigit() or len(parts[1]) > 18:
        return None
    try:
        return parts[0], datetime.fromtimestamp(int(parts[1]) / 1_000_000, UTC)
    except (OverflowError, OSError, ValueError):
        return None


class _Writer:
    """One open chunk file."""

    def __init__(
        self,
        path: Path,
        template: Any,
        first: Any,
        time_base: Fraction,
        wall_start: datetime,
        params: StreamParams | None,
        cause: str | None,
    ) -> None:
        self.path = path
        self.cause = cause
        self.container: Any = av.open(str(path), "w", format="mp4", options=FMP4_OPTIONS)
        try:
            self.out = self.container.add_stream_from_template(template)
        except ValueError as exc:  # e.g. a codec MP4 cannot carry, from a damaged header
            self.container.close()
            path.unlink(missing_ok=True)
            raise CameraError(f"cannot write this stream to an MP4 chunk: {exc}") from exc
        if params is not None:  # the stream changed in-band since the header was read
            ctx = self.out.codec_context
            ctx.extradata, ctx.width, ctx.height = params.extradata, params.width, params.height
        self.base = first.dts
        self.time_base = time_base
        self.start = first.pts if first.pts is not None else first.dts
        self.end = self.start
        self.frames = 0
        self.keyframes = 0
        self.wall_start = wall_start

    def write(self, pkt: Any, frame_ticks: int) -> None:
        pts = pkt.pts if pkt.pts is not None else pkt.dts
        self.end = max(self.end, pts + (pkt.duration or frame_ticks))
        self.frames += 1
        self.keyframes += int(pkt.is_keyframe)
        pkt.pts, pkt.dts = pts - self.base, pkt.dts - self.base
        pkt.stream = self.out
        self.container.mux(pkt)

    def close(self) -> None:
        self.container.close()


class Segmenter:
    """Feed it packets in order; it calls ``on_chunk`` with each closed chunk."""

    def __init__(
        self,
        camera_id: str,
        stream: Any,
        tmp_dir: Path,
        segment_s: float,
        on_chunk: Callable[[ClosedChunk], None],
        room: Callable[[], bool] | None = None,
        cause: str | None = None,
    ) -> None:
        self.camera_id = camera_id
        # Why the next chunk may not follow on from the last: this connection's cause
        # first, then whatever cuts the timeline (a jump, new parameters, no disk space).
        self.cause = cause
        self.room = room  # may a new chunk file be opened (is there disk space)?
        self.stream = stream
        self.tmp_dir = tmp_dir
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.time_base = Fraction(stream.time_base)
        self.segment_ticks = Fraction(segment_s) / self.time_base
        rate = stream.average_rate or stream.guessed_rate or 15
        self.frame_ticks = max(1, int(1 / (Fraction(rate) * self.time_base)))
        self.on_chunk = on_chunk
        self.writer: _Writer | None = None
        self.session_start = True
        self.origin: tuple[datetime, int] | None = None  # (wall, media ticks) at first packet
        self.skipped = 0  # packets before the first keyframe (after a start or a cut)
        self.refused = 0  # keyframes that found no room to open a chunk (their GOP dropped)
        self.codec = str(stream.codec_context.name)
        self.baseline: bytes | None = None  # in-band parameter sets seen so far
        self.params: StreamParams | None = None  # set once they changed
        self.param_changes = 0
        self.last_at: datetime | None = None  # when the last packet written arrived

    def feed(self, pkt: Any, reset: bool = False) -> None:
        """Add a packet (with a DTS). ``reset``: the timeline jumped; close the chunk here."""
        changed = self._param_change(pkt) if pkt.is_keyframe else None
        if reset or changed is not None:
            self.cause = self.cause or ("parameter_change" if changed else "clock_jump")
        w = self.writer
        now = None
        if w is not None and (
            reset
            or changed is not None
            or (pkt.is_keyframe and pkt.dts - w.base >= self.segment_ticks)
        ):
            # One instant ends this chunk and starts the next: on the wall clock a camera's
            # chunks then tile its timeline with no sliver between them to explain.
            now = datetime.now(UTC)
            self.flush(now)
            w = None
        if changed is not None:
            self.params = changed  # after the flush: the closed chunk keeps its own size
        if w is None:
            if not pkt.is_keyframe or not self._has_room():
                self.skipped += 1
                return
            now = now or datetime.now(UTC)
            if self.origin is None:
                self.origin = (now, pkt.dts)
            path = self.tmp_dir / partial_name(self.camera_id, now)
            w = self.writer = _Writer(
                path, self.stream, pkt, self.time_base, now, self.params, self.cause
            )
            self.cause = None
        w.write(pkt, self.frame_ticks)
        self.last_at = now or datetime.now(UTC)

    def _has_room(self) -> bool:
        if self.room is None or self.room():
            return True
        self.refused += 1
        self.cause = self.cause or "eviction"  # the spool's limits: footage not kept
        return False

    def _param_change(self, pkt: Any) -> StreamParams | None:
        """New parameters when this keyframe's in-band parameter sets differ from before."""
        found = parameter_sets(bytes(memoryview(pkt)[:HEAD_BYTES]), self.codec)
        if found is None or found == self.baseline:
            return None
        first, self.baseline = self.baseline is None, found
        if first:
            return None
        try:
            width, height = dimensions(self.codec, pkt)
        except (av.FFmpegError, ValueError) as exc:
            raise ParameterChangeError(f"new parameter sets do not decode: {exc}") from exc
        self.param_changes += 1
        return StreamParams(found, width, height)

    def ended(self) -> datetime:
        """When the footage of the open chunk ends on the wall clock: a frame after its
        last packet arrived (not later: a stalled stream's silence is no footage)."""
        now = datetime.now(UTC)
        if self.last_at is None:
            return now
        return min(now, self.last_at + timedelta(seconds=float(self.frame_ticks * self.time_base)))

    def _drift(self, w: _Writer, wall_end: datetime) -> float:
        assert self.origin is not None
        wall = (wall_end - self.origin[0]).total_seconds()
        media = float((w.end - self.origin[1]) * self.time_base)
        return round(wall - media, 3)

    def flush(self, wall_end: datetime | None = None) -> None:
        """Close the open chunk (if any), ending it at ``wall_end`` (now by default), and
        hand it on."""
        w, self.writer = self.writer, None
        if w is None:
            return
        w.close()
        sha, size = fsync_and_hash(w.path)
        ctx = self.stream.codec_context
        width, height = (
            (self.params.width, self.params.height) if self.params else (ctx.width, ctx.height)
        )
        wall_end = wall_end or datetime.now(UTC)
        chunk = ClosedChunk(
            camera_id=self.camera_id,
            path=w.path,
            sha256=sha,
            size_bytes=size,
            codec=str(ctx.name),
            width=int(width),
            height=int(height),
            frame_count=w.frames,
            keyframe_count=w.keyframes,
            media_start_s=float(w.start * self.time_base),
            media_end_s=float(w.end * self.time_base),
            wall_start=w.wall_start,
            wall_end=wall_end,
            session_start=self.session_start,
            clock_drift_s=self._drift(w, wall_end),
            cause=w.cause,
        )
        self.session_start = False
        self.on_chunk(chunk)
