"""One MCAP file per window revision: every view's original packets, ready to reconstruct.

One ``foxglove.CompressedVideo`` channel per camera (``/{camera_id}/video``) carries the
camera's H.264/H.265 packets as they were recorded, neither decoded nor re-encoded: each
raw chunk's video stream (never its audio) is passed through ``h264_mp4toannexb`` /
``hevc_mp4toannexb``, and a keyframe that still lacks its parameter sets gets the last
ones seen, so every keyframe decodes on its own. Messages are in decode order;
``log_time`` is the frame's decode time on the edge's wall clock (chunk start plus DTS
offset, never decreasing per channel), the message's ``timestamp`` its presentation
time. Each channel starts at the keyframe at or before the window's start (the pre-roll)
and ends before the window's end. Calibration, when configured, goes on
``/{camera_id}/calibration`` and ``/tf``; a ``window`` metadata record says what the
file holds and how it was judged.

Memory is bounded: the writer runs in a thread, holds one chunk per camera (fetched from
S3 on the loop, in turn) and writes to a temporary file that is then uploaded in parts.
The bytes depend only on the window document and the raw chunks, so two consumers that
race write the same object.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import heapq
import io
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
from av.bitstream import BitStreamFilterContext
from botocore.exceptions import ClientError
from foxglove_schemas_protobuf.CameraCalibration_pb2 import CameraCalibration
from foxglove_schemas_protobuf.CompressedVideo_pb2 import CompressedVideo
from foxglove_schemas_protobuf.FrameTransform_pb2 import FrameTransform
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from mcap.writer import CompressionType, Writer
from mcap_protobuf.schema import register_schema

from cloud_ingest.config import Calibration, IngestSettings
from cloud_ingest.objects import SizeError, get_bounded
from shared.params import HEAD_BYTES, parameter_sets
from shared.s3 import error_code, is_not_found
from shared.uploader import Uploader

FORMATS = {"h264": "h264", "hevc": "h265"}  # the manifest's codec -> CompressedVideo.format
ANNEX_B = {"h264": "h264_mp4toannexb", "hevc": "hevc_mp4toannexb"}
LIBRARY = "cctv-ingest scene-mcap 1"  # in the header: a constant, so the bytes are too
SITE_FRAME = "site"
FETCH_TIMEOUT_S = 300.0
STOP_WAIT_S = 5.0  # a cancelled write waits this long for its thread (one chunk's demux)
NO_AUDIO = (
    "not carried: audio is never demuxed, and recording it is unlawful for CCTV in many places"
)


class SceneError(Exception):
    """A raw chunk of the window cannot be read back as it was processed."""


@dataclass(slots=True)
class Frame:
    log_ns: int
    pts_ns: int
    data: bytes
    keyframe: bool


@dataclass(slots=True)
class Chunk:
    codec: str
    width: int
    height: int
    b_frames: bool
    frames: list[Frame]


def annex_b_frames(data: bytes, start_s: float, params: list[bytes | None]) -> Chunk:
    """A raw chunk's video packets in decode order as Annex B frames on the wall clock.
    ``params`` carries the last parameter sets seen from one chunk to the next."""
    with av.open(io.BytesIO(data), "r") as container:
        stream = container.streams.video[0]
        codec = str(stream.codec_context.name)
        if codec not in ANNEX_B:
            raise SceneError(f"codec {codec!r} cannot be carried as CompressedVideo")
        bsf = BitStreamFilterContext(ANNEX_B[codec], stream)
        tb = Fraction(stream.time_base or Fraction(1, 90000))
        frames: list[Frame] = []
        base: int | None = None
        last_pts: int | None = None
        b_frames = bool(stream.codec_context.has_b_frames)
        for packet in container.demux(stream):
            if packet.dts is None:
                continue
            for out in bsf.filter(packet):
                dts = int(out.dts if out.dts is not None else packet.dts)
                pts = int(out.pts if out.pts is not None else dts)
                base = dts if base is None else base
                b_frames = b_frames or (last_pts is not None and pts < last_pts)
                last_pts = pts if last_pts is None else max(last_pts, pts)
                body = bytes(out)
                if out.is_keyframe:
                    body = _with_parameter_sets(body, codec, params)
                frames.append(
                    Frame(
                        log_ns=_ns(start_s + float((dts - base) * tb)),
                        pts_ns=_ns(start_s + float((pts - base) * tb)),
                        data=body,
                        keyframe=bool(out.is_keyframe),
                    )
                )
        ctx = stream.codec_context
        return Chunk(codec, int(ctx.width), int(ctx.height), b_frames, frames)


def _with_parameter_sets(body: bytes, codec: str, params: list[bytes | None]) -> bytes:
    found = parameter_sets(body[:HEAD_BYTES], codec)
    if found is not None:
        params[0] = found
        return body
    return body if params[0] is None else params[0] + body


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def _stamp(ns: int) -> Timestamp:
    return Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


@dataclass
class Track:
    """One camera's frames over the window: pre-roll from the last keyframe at or before
    the start, nothing at or after the end, one raw chunk in memory at a time."""

    camera: str
    notes: list[dict[str, Any]]
    fetch: Callable[[dict[str, Any]], bytes]
    start_ns: int
    end_ns: int
    first: Chunk | None = None
    params: list[bytes | None] = field(default_factory=lambda: [None])
    codec: str = ""
    messages: int = 0
    keyframes: int = 0
    b_frames: bool = False
    first_log_ns: int | None = None
    last_log_ns: int | None = None

    def open(self) -> Chunk | None:
        """The first chunk's stream facts (codec, size, B-frames) for the channel."""
        if self.notes and self.first is None:
            self.first = self._load(self.notes[0])
        return self.first

    def _load(self, note: dict[str, Any]) -> Chunk:
        if note["codec"] != self.codec:  # parameter sets of one codec never go on another
            self.codec, self.params = str(note["codec"]), [None]
        data = self.fetch(note)
        try:
            chunk = annex_b_frames(data, float(note["start"]), self.params)
        except (av.FFmpegError, IndexError) as exc:  # it processed fine once: it changed
            raise SceneError(f"raw chunk {note['key']} does not demux: {exc}") from None
        self.b_frames = self.b_frames or chunk.b_frames
        return chunk

    def frames(self) -> Iterator[Frame]:
        preroll: list[Frame] = []  # the GOP in progress at the window's start
        for i, note in enumerate(self.notes):
            chunk = self.first if i == 0 and self.first is not None else self._load(note)
            self.first = None  # released once consumed
            for frame in chunk.frames:
                if frame.log_ns >= self.end_ns:
                    return
                if frame.log_ns <= self.start_ns:
                    if frame.keyframe:
                        preroll = [frame]
                    elif preroll:
                        preroll.append(frame)
                    continue
                if preroll:
                    yield from self._emit(preroll)
                    preroll = []
                if self.messages or frame.keyframe:  # else nothing to decode it from
                    yield from self._emit([frame])

    def _emit(self, frames: list[Frame]) -> Iterator[Frame]:
        for frame in frames:
            if self.last_log_ns is not None and frame.log_ns < self.last_log_ns:
                frame.log_ns = self.last_log_ns  # a chunk boundary's jitter: never backwards
            self.first_log_ns = frame.log_ns if self.first_log_ns is None else self.first_log_ns
            self.last_log_ns = frame.log_ns
            self.messages += 1
            self.keyframes += int(frame.keyframe)
            yield frame


def write_mcap(
    out: Any,
    doc: dict[str, Any],
    calibration: dict[str, Calibration],
    fetch: Callable[[dict[str, Any]], bytes],
) -> dict[str, dict[str, Any]]:
    """Write the window's MCAP to the binary file ``out``; per channel figures."""
    start_ns, end_ns = _ns(doc["start"]), _ns(doc["end"])
    tracks = [
        Track(camera, notes, fetch, start_ns, end_ns)
        for camera, notes in sorted(doc["chunks"].items())
    ]
    writer = Writer(out, chunk_size=1 << 20, compression=CompressionType.ZSTD)
    writer.start(profile="", library=LIBRARY)
    schemas: dict[str, int] = {}

    def channel(topic: str, message: type[Message], metadata: dict[str, str]) -> int:
        name = message.DESCRIPTOR.full_name
        if name not in schemas:
            schemas[name] = register_schema(writer, message)
        return writer.register_channel(topic, "protobuf", schemas[name], metadata)

    channels: dict[str, int] = {}
    for track in tracks:
        first = track.open()
        codec = first.codec if first else str(track.notes[0]["codec"])
        channels[track.camera] = channel(
            f"/{track.camera}/video",
            CompressedVideo,
            {
                "camera_id": track.camera,
                "format": FORMATS.get(codec, codec),
                "width": str(first.width if first else 0),
                "height": str(first.height if first else 0),
                "b_frames": "true" if first and first.b_frames else "false",
            },
        )
    _write_calibration(writer, channel, tracks, calibration, start_ns)
    merged = heapq.merge(*[_keyed(i, t) for i, t in enumerate(tracks)], key=lambda x: x[:2])
    sequence: dict[str, int] = {}
    for log_ns, i, frame in merged:
        track = tracks[i]
        seq = sequence[track.camera] = sequence.get(track.camera, 0) + 1
        message = CompressedVideo(
            timestamp=_stamp(frame.pts_ns),
            frame_id=track.camera,
            data=frame.data,
            format=FORMATS[str(track.notes[0]["codec"])],
        )
        writer.add_message(channels[track.camera], log_ns, message.SerializeToString(), log_ns, seq)
    writer.add_metadata("window", _metadata(doc, calibration, tracks))
    writer.finish()  # type: ignore[no-untyped-call]
    return {
        t.camera: {
            "topic": f"/{t.camera}/video",
            "messages": t.messages,
            "keyframes": t.keyframes,
            "b_frames": t.b_frames,
            "first_log_ns": t.first_log_ns,
            "last_log_ns": t.last_log_ns,
        }
        for t in tracks
    }


def _keyed(index: int, track: Track) -> Iterator[tuple[int, int, Frame]]:
    """A track's frames keyed for the merge: by log time, then camera (deterministic)."""
    for frame in track.frames():
        yield frame.log_ns, index, frame


def _write_calibration(
    writer: Writer,
    channel: Callable[[str, type[Message], dict[str, str]], int],
    tracks: list[Track],
    calibration: dict[str, Calibration],
    start_ns: int,
) -> None:
    configured = [t for t in tracks if t.camera in calibration]
    if not configured:
        return
    at = min([start_ns] + [f.log_ns for t in tracks if t.first for f in t.first.frames[:1]])
    tf = channel("/tf", FrameTransform, {"parent_frame_id": SITE_FRAME})
    for t in configured:
        cal = calibration[t.camera]
        topic = channel(f"/{t.camera}/calibration", CameraCalibration, {"camera_id": t.camera})
        message = CameraCalibration(
            timestamp=_stamp(at),
            frame_id=t.camera,
            width=cal.width,
            height=cal.height,
            distortion_model=cal.distortion_model,
            D=cal.D,
            K=cal.K,
            R=cal.R,
            P=cal.projection(),
        )
        writer.add_message(topic, at, message.SerializeToString(), at, 1)
        if cal.translation is not None and cal.rotation is not None:
            pose = FrameTransform(
                timestamp=_stamp(at), parent_frame_id=SITE_FRAME, child_frame_id=t.camera
            )
            pose.translation.x, pose.translation.y, pose.translation.z = cal.translation
            r = pose.rotation
            r.x, r.y, r.z, r.w = cal.rotation
            writer.add_message(tf, at, pose.SerializeToString(), at, 1)


def _metadata(
    doc: dict[str, Any], calibration: dict[str, Calibration], tracks: list[Track]
) -> dict[str, str]:
    def text(value: Any) -> str:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)

    chunks = {
        camera: [
            {k: n[k] for k in ("chunk_id", "key", "verdict", "scores", "start", "end", "seq")}
            for n in notes
        ]
        for camera, notes in doc["chunks"].items()
    }
    calibrated = sorted(c for c in calibration if c in doc["chunks"])
    return {
        "window_id": doc["window_id"],
        "revision": str(doc["revision"]),
        "revision_id": doc["revision_id"],
        "supersedes": doc["supersedes"] or "",
        "site_id": doc["site_id"],
        "start": str(doc["start"]),
        "end": str(doc["end"]),
        "closed_because": doc["closed_because"],
        "cameras": text(doc["cameras"]),
        "chunks": text(chunks),
        "gaps": text(doc["gaps"]),
        "b_frames": text({t.camera: t.b_frames for t in tracks}),
        "calibration": text(calibrated) if calibrated else "none configured",
        "audio": NO_AUDIO,
        "clock": "log_time and timestamp on each edge's wall clock; see cameras[].clock_drift_s",
    }


class Stopped(Exception):
    """The hand-off was cancelled (a drain): the writer thread gives up."""


def work_dir() -> Path:
    """Where MCAPs are written before their upload; files left by a killed consumer (an
    hour old: no write takes that long) are removed when the next one starts."""
    path = Path(tempfile.gettempdir()) / "cloud-ingest-mcap"
    path.mkdir(mode=0o700, exist_ok=True)
    cutoff = time.time() - 3600
    for old in path.glob("window-*.mcap"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < cutoff:
                old.unlink()
    return path


async def publish_mcap(s3: Any, settings: IngestSettings, doc: dict[str, Any]) -> dict[str, Any]:
    """Write the window revision's MCAP and upload it to ``doc["mcap_key"]``; a summary."""
    loop = asyncio.get_running_loop()
    calibration = settings.calibration_for(doc["site_id"])
    stop = threading.Event()

    def fetch(note: dict[str, Any]) -> bytes:
        """In the writer thread: one raw chunk, read by the loop's S3 client."""
        if stop.is_set():
            raise Stopped
        coro = get_bounded(
            s3, settings.raw_bucket, note["key"], int(note["size_bytes"]), exact=True
        )
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the loop is closed: nobody waits for this MCAP
            coro.close()
            raise Stopped from None
        try:
            data = future.result(FETCH_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"raw chunk {note['key']} took over {FETCH_TIMEOUT_S:g}s") from None
        except ClientError as exc:
            if is_not_found(exc) or error_code(exc) == "InvalidObjectState":  # gone, archived
                raise SceneError(f"raw chunk {note['key']}: {error_code(exc)}") from None
            raise
        except SizeError as exc:
            raise SceneError(f"raw chunk {note['key']} changed size: {exc}") from None
        if hashlib.sha256(data).hexdigest() != note["sha256"]:
            raise SceneError(f"raw chunk {note['key']} no longer hashes to its manifest")
        return data

    t0 = time.monotonic()
    directory = await asyncio.to_thread(work_dir)
    fd, name = tempfile.mkstemp(prefix="window-", suffix=".mcap", dir=directory)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            writing = asyncio.ensure_future(
                asyncio.to_thread(write_mcap, out, doc, calibration, fetch)
            )
            try:
                channels = await asyncio.shield(writing)
            except asyncio.CancelledError:
                stop.set()  # the thread stops at its next chunk; wait for it, briefly
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(writing, STOP_WAIT_S)
                raise
        digest, size = await asyncio.to_thread(_hash_file, path)
        written = time.monotonic() - t0
        await Uploader(s3).put_file(
            path,
            settings.output_bucket,
            doc["mcap_key"],
            size,
            "application/x-mcap",
            {"sha256": digest, "revision-id": doc["revision_id"]},
        )
    finally:
        await asyncio.to_thread(path.unlink, missing_ok=True)
    return {
        "key": doc["mcap_key"],
        "bytes": size,
        "sha256": digest,
        "write_s": round(written, 3),
        "upload_s": round(time.monotonic() - t0 - written, 3),
        "channels": channels,
    }


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size
