"""Synthetic test footage, encoded in-process with PyAV."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def _frame(i: int, width: int, height: int, pattern: str = "moving") -> np.ndarray:
    """Synthetic content. ``moving`` (default): a moving gradient with a bright square, never
    static, dark or blurred. The others exist to trip one filter each."""
    y, x = np.mgrid[0:height, 0:width]
    if pattern in ("dark", "bright"):
        base = np.full((height, width, 3), 6 if pattern == "dark" else 248, dtype=np.uint8)
        texture: np.ndarray = _frame(i, width, height) // 40
        return base + texture.astype(np.uint8)
    if pattern == "blurred":  # smooth, low-frequency, moving: no edges at all
        v = 128 + 60 * np.sin((x + 3 * i) / 37.0) * np.cos((y - 2 * i) / 41.0)
        return np.repeat(v[..., None], 3, axis=2).astype(np.uint8)
    if pattern == "static":
        return _frame(0, width, height)
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[..., 0] = (x + i * 4) % 256
    img[..., 1] = (y + i * 2) % 256
    img[..., 2] = ((x + y) // 2 + i * 3) % 256
    side = max(8, min(width, height) // 6)
    cx = (i * 7) % max(1, width - side)
    cy = (i * 5) % max(1, height - side)
    img[cy : cy + side, cx : cx + side] = 255
    return img


def make_clip(
    path: Path,
    seconds: float,
    *,
    fps: int = 15,
    width: int = 320,
    height: int = 240,
    gop: int | None = None,
    codec: str = "libx264",
    audio: bool = False,
    bitrate: int | None = None,
    pattern: str = "moving",
) -> Path:
    """Write an MP4 (H.264 by default) with a fixed GOP; optionally an AAC track."""
    gop = gop or fps
    n_frames = round(seconds * fps)
    with av.open(str(path), "w") as out:
        vs = out.add_stream(codec, rate=fps)
        assert isinstance(vs, av.VideoStream)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        vs.time_base = Fraction(1, fps * 1000)
        opts: dict[str, object] = {
            "g": str(gop),
            "keyint_min": str(gop),
            "sc_threshold": "0",
            "bf": "0",
        }
        if codec == "libx264":
            opts.update(
                {"preset": "ultrafast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
            )
        elif codec == "libx265":
            opts.update(
                {
                    "preset": "ultrafast",
                    "x265-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:log-level=error",
                }
            )
        vs.options = opts
        if bitrate:
            vs.bit_rate = bitrate
        aus = out.add_stream("aac", rate=16000) if audio else None
        assert aus is None or isinstance(aus, av.AudioStream)
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(_frame(i, width, height, pattern), format="rgb24")
            frame.pts = i * 1000
            frame.time_base = Fraction(1, fps * 1000)
            out.mux(vs.encode(frame))
            if aus is not None:
                _write_audio(out, aus, i, fps)
        out.mux(vs.encode(None))
        if aus is not None:
            out.mux(aus.encode(None))
    return path


def _write_audio(
    out: av.container.OutputContainer, aus: av.audio.stream.AudioStream, i: int, fps: int
) -> None:
    samples = 16000 // fps
    t = (np.arange(samples) + i * samples) / 16000.0
    tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
    frame.sample_rate = 16000
    frame.pts = i * samples
    out.mux(aus.encode(frame))


def remux(src: Path, dst: Path, fmt: str) -> Path:
    """Copy the video stream into another container (e.g. ``mpegts``) without re-encoding."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format=fmt) as out:
        vin = inp.streams.video[0]
        vout = out.add_stream_from_template(vin)
        for pkt in inp.demux(vin):
            if pkt.dts is None:
                continue
            pkt.stream = vout
            out.mux(pkt)
    return dst
