"""Timestamp repair between the demuxer and the segmenter.

Cameras send packets without DTS, with DTS that step backwards, with MPEG-TS
timestamps that wrap at 33 bits (every ~26.5 h), or with jumps after a clock
reset. The muxer refuses all of these, so each packet leaves here with a DTS
that strictly increases, or with a ``reset`` flag telling the segmenter to close
the chunk so the jump lands between chunks (where the manifest records it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from fractions import Fraction
from typing import Any

MPEGTS_WRAP = 1 << 33


class TimestampRepair:
    def __init__(
        self, time_base: Fraction, frame_ticks: int, *, wrap: int | None, jump_s: float = 5.0
    ) -> None:
        self.frame_ticks = frame_ticks
        self.wrap = wrap
        self.jump_ticks = int(Fraction(jump_s) / time_base)
        self.last_raw: int | None = None
        self.last_dts: int | None = None
        self.offset = 0
        self.counts: Counter[str] = Counter()

    def run(self, packets: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
        """Yield (packet, reset). A first packet without timestamps is held one step
        and given the next packet's DTS minus one frame (RTSP often starts that way)."""
        held: list[Any] = []
        for pkt in packets:
            if pkt.dts is None and pkt.pts is None and self.last_dts is None:
                held.append(pkt)
                continue
            reset = self._fix(pkt)
            for i, early in enumerate(held):
                early.dts = early.pts = pkt.dts - (len(held) - i) * self.frame_ticks
                self.counts["interpolated"] += 1
                yield early, False
            held = []
            yield pkt, reset
        self.counts["dropped_untimed"] += len(held)

    def _fix(self, pkt: Any) -> bool:
        if pkt.dts is None:
            if pkt.pts is None:  # mid-stream and untimed: one frame after the last one
                pkt.pts = self.last_dts + self.frame_ticks  # type: ignore[operator]
                self.counts["interpolated"] += 1
            pkt.dts = pkt.pts
        raw = pkt.dts
        if self.wrap and self.last_raw is not None and self.last_raw - raw > self.wrap // 2:
            self.offset += self.wrap  # 33-bit MPEG-TS wrap: keep counting upwards
            self.counts["wrapped"] += 1
        self.last_raw = raw
        if self.offset:
            pkt.dts += self.offset
            pkt.pts = None if pkt.pts is None else pkt.pts + self.offset
        return self._monotonic(pkt)

    def _monotonic(self, pkt: Any) -> bool:
        last = self.last_dts
        self.last_dts = pkt.dts
        if last is None:
            return False
        step = pkt.dts - last
        if step > self.jump_ticks or -step > 2 * self.frame_ticks:
            self.counts["jumps"] += 1
            return True  # a clock reset or a hole: cut here, the manifest flags it
        if step <= 0:  # a duplicate or a frame or two out of order: nudge forward
            pkt.dts = last + 1
            if pkt.pts is not None and pkt.pts < pkt.dts:
                pkt.pts = pkt.dts
            self.last_dts = pkt.dts
            self.counts["reordered"] += 1
        return False
