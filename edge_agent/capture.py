"""Camera input: open a stream with PyAV and yield its video packets, in order.

Blocking C work; each camera runs this in its own thread. ``file://`` URLs are
replayed at their real-time rate (``?loop=1`` loops, keeping media time
monotonic across the loop) so recorded footage behaves like a live camera.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import av


class CameraError(Exception):
    """The camera could not be opened or read; the supervisor retries with back-off."""


class CameraStalled(CameraError):
    """No packet within the watchdog period although the connection stayed open."""


@dataclass(frozen=True, slots=True)
class SourceSpec:
    target: str
    options: dict[str, str]
    realtime: bool
    loop: bool


def parse_url(url: str, timeout_s: float) -> SourceSpec:
    """How to open ``url``; ``timeout_s`` bounds every socket read (the RTSP/HTTP stall limit)."""
    parsed = urlparse(url)
    micros = str(int(timeout_s * 1_000_000))
    if parsed.scheme in ("rtsp", "rtsps"):
        # TCP interleaving: no UDP loss; "timeout" bounds every socket read.
        return SourceSpec(url, {"rtsp_transport": "tcp", "timeout": micros}, False, False)
    if parsed.scheme in ("http", "https"):
        return SourceSpec(url, {"rw_timeout": micros}, False, False)
    query = parse_qs(parsed.query)
    loop = query.get("loop", ["0"])[0].lower() in ("1", "true", "yes")
    return SourceSpec(unquote(parsed.path), {}, True, loop)


class Source:
    """One connection to one camera. Iterate ``packets()``; ``close()`` when done."""

    def __init__(
        self,
        url: str,
        stop: threading.Event,
        *,
        open_timeout_s: float = 10.0,
        watchdog_s: float = 5.0,
    ) -> None:
        # Reads are bounded by FFmpeg's own socket timeout (parse_url: "timeout" for RTSP,
        # "rw_timeout" for HTTP), half the watchdog period because a stalled RTSP stream
        # surfaces after two timed-out reads (measured: ~2x the timeout). PyAV's interrupt
        # callback bounds the open (connect, handshake, probe) only: with a read limit set,
        # it takes the GIL on every one of FFmpeg's socket reads (thousands a second per
        # 4 Mb/s camera), which made demuxing ~2.5x dearer than ffmpeg's and had the
        # camera threads queue for the GIL.
        self.spec = parse_url(url, watchdog_s / 2)
        self.watchdog_s = watchdog_s
        self.timeouts = (open_timeout_s, None)
        self.stop = stop
        self.container: Any = None
        self.stream: Any = None
        self.dropped_torn = 0  # last packets cut short by the end of the input
        self._open()

    def _open(self) -> None:
        try:
            self.container = av.open(
                self.spec.target,
                options=self.spec.options,
                timeout=self.timeouts,
                metadata_errors="replace",  # a camera's tags are not ours to validate
            )
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise CameraError(f"cannot open: {exc}") from exc
        if not self.container.streams.video:
            self.close()
            raise CameraError("no video stream")
        self.stream = self.container.streams.video[0]
        if self.stream.codec_context is None:
            self.close()
            raise CameraError("no decoder for the video stream's codec")
        if not self.stream.time_base or self.stream.time_base <= 0:
            self.close()
            raise CameraError(f"unusable time base {self.stream.time_base}")

    @property
    def time_base(self) -> Fraction:
        return Fraction(self.stream.time_base)

    @property
    def is_mpegts(self) -> bool:
        return "mpegts" in str(self.container.format.name)

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None

    def packets(self) -> Iterator[Any]:
        """Video packets in demux order; other streams (audio, data) are never demuxed."""
        if not (self.spec.realtime or self.spec.loop):
            for pkt in self._demux():
                yield pkt
                if self.stop.is_set():
                    return
            return
        yield from self._replay()

    def _replay(self) -> Iterator[Any]:
        """A recording at its real-time rate; looping shifts timestamps so time never rewinds."""
        offset = 0
        while True:
            first, end = None, 0
            clock = _Pacer(self.time_base, self.stop) if self.spec.realtime else None
            for pkt in self._demux():
                ts = pkt.dts if pkt.dts is not None else pkt.pts
                if ts is not None:
                    first = ts if first is None else first
                    end = max(end, ts + (pkt.duration or 0))
                    if clock is not None and not clock.wait_for(ts):
                        return
                if offset:
                    pkt.dts = None if pkt.dts is None else pkt.dts + offset
                    pkt.pts = None if pkt.pts is None else pkt.pts + offset
                yield pkt
                if self.stop.is_set():
                    return
            if not self.spec.loop or first is None or self.stop.is_set():
                return
            offset += end - first
            # Seek rather than reopen: the stream object (the segmenter's template) must live on.
            self.container.seek(0)

    def _demux(self) -> Iterator[Any]:
        """Packets with a payload. One the demuxer flagged corrupt is held back: mid-stream
        (an MPEG-TS continuity error) it is passed on, but as the very last packet it was
        torn by the end of the input, and a chunk holding it would not decode."""
        held = None
        try:
            for pkt in self.container.demux(self.stream):
                if not pkt.size:  # the demuxer's empty flush packet
                    continue
                if held is not None:
                    yield held
                    held = None
                if pkt.is_corrupt:
                    held = pkt
                    continue
                yield pkt
        except (av.ExitError, av.error.TimeoutError) as exc:  # the socket read timed out
            raise CameraStalled(f"no data for {self.watchdog_s:.1f}s") from exc
        except av.FFmpegError as exc:
            raise CameraError(f"read failed: {exc}") from exc
        finally:
            self.dropped_torn += int(held is not None)


class _Pacer:
    """Holds packets back to the media clock, for real-time file replay."""

    def __init__(self, time_base: Fraction, stop: threading.Event) -> None:
        self.time_base = time_base
        self.stop = stop
        self.origin: tuple[float, int] | None = None

    def wait_for(self, ts: int) -> bool:
        now = time.monotonic()
        if self.origin is None:
            self.origin = (now, ts)
        due = self.origin[0] + float((ts - self.origin[1]) * self.time_base)
        return not (due > now and self.stop.wait(due - now))
