"""Hostile media for tests: ISO BMFF box surgery, H.264 SPS rewriting, and a crash-isolated
worker that runs media code on untrusted bytes in a child process under a time limit.

Nothing here decides what a test expects; it only builds inputs and runs code.
"""

from __future__ import annotations

import multiprocessing
import struct
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

# Boxes whose payload is nothing but child boxes, and the sample entries / full boxes whose
# children start after a fixed header.
_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"moof", b"traf", b"mvex", b"dinf"}
_CHILD_OFFSET = {b"stsd": 8, b"avc1": 78, b"avc3": 78, b"hvc1": 78, b"hev1": 78}


@dataclass(frozen=True, slots=True)
class Box:
    kind: bytes
    start: int  # offset of the header
    payload: int  # offset of the payload
    end: int


def boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[Box]:
    """Top-level boxes of ``data[start:end]``; stops at the first box that does not fit."""
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1:
            if pos + 16 > end:
                return
            size, header = struct.unpack(">Q", data[pos + 8 : pos + 16])[0], 16
        if size < header or pos + size > end:
            return
        yield Box(kind, pos, pos + header, pos + size)
        pos += size


def walk(data: bytes, start: int = 0, end: int | None = None) -> Iterator[Box]:
    """Every box, depth first, descending into the containers this project writes."""
    for box in boxes(data, start, end):
        yield box
        if box.kind in _CONTAINERS:
            yield from walk(data, box.payload, box.end)
        elif box.kind in _CHILD_OFFSET:
            yield from walk(data, box.payload + _CHILD_OFFSET[box.kind], box.end)


def find(data: bytes, kind: bytes) -> list[Box]:
    return [b for b in walk(data) if b.kind == kind]


def rewrite(data: bytes, kind: bytes, fn: Callable[[bytes], bytes]) -> bytes:
    """Replace the payload of every ``kind`` box with ``fn(payload)``, fixing every size."""

    def level(start: int, end: int) -> bytes:
        out = bytearray()
        pos = start
        for box in boxes(data, start, end):
            out += data[pos : box.start]
            if box.kind == kind:
                body = fn(data[box.payload : box.end])
            elif box.kind in _CONTAINERS:
                body = level(box.payload, box.end)
            elif box.kind in _CHILD_OFFSET:
                skip = box.payload + _CHILD_OFFSET[box.kind]
                body = data[box.payload : skip] + level(skip, box.end)
            else:
                body = data[box.payload : box.end]
            out += struct.pack(">I4s", len(body) + 8, box.kind) + body
            pos = box.end
        return bytes(out + data[pos:end])

    return level(0, len(data))


def patch_sample_entry_size(data: bytes, width: int, height: int) -> bytes:
    """Claim another size in the visual sample entry and the track header (same length)."""
    out = bytearray(data)
    for box in find(data, b"avc1") + find(data, b"hvc1") + find(data, b"hev1"):
        struct.pack_into(">HH", out, box.payload + 24, width & 0xFFFF, height & 0xFFFF)
    for box in find(data, b"tkhd"):
        version = data[box.payload]
        at = box.payload + (88 if version == 1 else 76)
        struct.pack_into(">II", out, at, (width & 0xFFFF) << 16, (height & 0xFFFF) << 16)
    return bytes(out)


# -- H.264 sequence parameter sets -------------------------------------------------------


def _unescape(nal: bytes) -> bytes:
    out, zeros = bytearray(), 0
    for b in nal:
        if zeros >= 2 and b == 3:
            zeros = 0
            continue
        out.append(b)
        zeros = zeros + 1 if b == 0 else 0
    return bytes(out)


def _escape(rbsp: bytes) -> bytes:
    out, zeros = bytearray(), 0
    for b in rbsp:
        if zeros >= 2 and b <= 3:
            out.append(3)
            zeros = 0
        out.append(b)
        zeros = zeros + 1 if b == 0 else 0
    return bytes(out)


class _Bits:
    def __init__(self, data: bytes) -> None:
        self.bits = "".join(f"{b:08b}" for b in data)
        self.pos = 0

    def u(self, n: int) -> int:
        value = int(self.bits[self.pos : self.pos + n], 2)
        self.pos += n
        return value

    def ue(self) -> int:
        zeros = 0
        while self.bits[self.pos] == "0":
            zeros += 1
            self.pos += 1
        self.pos += 1
        return (1 << zeros) - 1 + (self.u(zeros) if zeros else 0)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k % 2 else -(k // 2)


def _ue(value: int) -> str:
    code = f"{value + 1:b}"
    return "0" * (len(code) - 1) + code


_HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


def rewrite_sps(nal: bytes, width_mbs: int, height_mbs: int) -> bytes:
    """The same SPS NAL unit claiming a picture of ``width_mbs`` x ``height_mbs`` macroblocks."""
    bits = _Bits(_unescape(nal[1:]))
    profile = bits.u(8)
    bits.u(16)  # constraint flags, level
    bits.ue()  # seq_parameter_set_id
    if profile in _HIGH_PROFILES:
        if bits.ue() == 3:  # chroma_format_idc
            bits.u(1)
        bits.ue()
        bits.ue()
        bits.u(1)
        if bits.u(1):
            raise ValueError("SPS with scaling matrices: not supported here")
    bits.ue()  # log2_max_frame_num_minus4
    poc_type = bits.ue()
    if poc_type == 0:
        bits.ue()
    elif poc_type == 1:
        bits.u(1)
        bits.se()
        bits.se()
        for _ in range(bits.ue()):
            bits.se()
    bits.ue()  # max_num_ref_frames
    bits.u(1)  # gaps_in_frame_num_value_allowed_flag
    head = bits.bits[: bits.pos]
    bits.ue()
    bits.ue()
    tail = bits.bits[bits.pos :].rstrip("0")[:-1]  # drop rbsp_stop_one_bit and padding
    body = head + _ue(width_mbs - 1) + _ue(height_mbs - 1) + tail + "1"
    body += "0" * (-len(body) % 8)
    rbsp = bytes(int(body[i : i + 8], 2) for i in range(0, len(body), 8))
    return nal[:1] + _escape(rbsp)


def sps_dimensions(nal: bytes) -> tuple[int, int]:
    """(width, height) in pixels before cropping, as a frame_mbs_only SPS states them."""
    bits = _Bits(_unescape(nal[1:]))
    profile = bits.u(8)
    bits.u(16)
    bits.ue()
    if profile in _HIGH_PROFILES:
        if bits.ue() == 3:
            bits.u(1)
        bits.ue()
        bits.ue()
        bits.u(2)
    bits.ue()
    if (poc_type := bits.ue()) == 0:
        bits.ue()
    elif poc_type == 1:
        bits.u(1)
        bits.se()
        bits.se()
        for _ in range(bits.ue()):
            bits.se()
    bits.ue()
    bits.u(1)
    return 16 * (bits.ue() + 1), 16 * (bits.ue() + 1)


def patch_avcc_sps(avcc: bytes, width_mbs: int, height_mbs: int) -> bytes:
    """An avcC payload whose every SPS claims another size (PPS untouched)."""
    out = bytearray(avcc[:5])
    count = avcc[5] & 0x1F
    out.append(avcc[5])
    pos = 6
    for _ in range(count):
        (n,) = struct.unpack(">H", avcc[pos : pos + 2])
        sps = rewrite_sps(avcc[pos + 2 : pos + 2 + n], width_mbs, height_mbs)
        out += struct.pack(">H", len(sps)) + sps
        pos += 2 + n
    return bytes(out + avcc[pos:])


def avcc_sps(avcc: bytes) -> bytes:
    (n,) = struct.unpack(">H", avcc[6:8])
    return avcc[8 : 8 + n]


def map_samples(data: bytes, fn: Callable[[bytes], bytes]) -> bytes:
    """Apply ``fn`` to every length-prefixed NAL unit payload (after its header byte) in
    every ``mdat``, keeping every length: a valid container around another bitstream."""
    out = bytearray(data)
    for box in find(data, b"mdat"):
        pos = box.payload
        while pos + 5 <= box.end:
            (n,) = struct.unpack(">I", data[pos : pos + 4])
            if n < 2 or pos + 4 + n > box.end:
                break
            body = data[pos + 5 : pos + 4 + n]
            new = fn(body)
            assert len(new) == len(body)
            out[pos + 5 : pos + 4 + n] = new
            pos += 4 + n
    return bytes(out)


# -- crash-isolated execution -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str  # "ok", "rejected", "error" (another exception), "crash", "timeout"
    detail: str  # the Rejected reason, the traceback, or why no answer came
    value: Any = None
    seconds: float = 0.0
    peak_mb: float = 0.0  # the worker's peak resident memory while running this call


def _peak_reset() -> None:
    """Reset the kernel's resident-memory high-water mark (VmHWM) for this process."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _serve(conn: Connection, preload: tuple[str, ...]) -> None:
    import importlib

    from shared.manifest import Rejected

    for name in preload:
        importlib.import_module(name)
    conn.send("ready")
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:
            return
        _peak_reset()
        t0 = time.monotonic()
        try:
            value = fn(*args)
            kind, detail = "ok", ""
        except Rejected as exc:
            kind, detail, value = "rejected", exc.reason, exc.detail
        except BaseException as exc:  # anything else is what the tests look for
            text = "".join(traceback.format_exception(exc))[-3000:]
            kind, detail, value = "error", f"{type(exc).__name__}: {text}", None
        conn.send(Outcome(kind, detail, value, time.monotonic() - t0, _peak_mb()))


class Isolated:
    """A child process that runs module-level functions on hostile input, one at a time.

    A segfault or an abort in C code ends the child, not pytest: the call reports "crash"
    and the next call starts a fresh child. A call past ``limit_s`` reports "timeout" (the
    child is killed). ``preload``: modules imported before the first call is timed.
    """

    def __init__(self, limit_s: float, preload: tuple[str, ...] = ()) -> None:
        self.limit_s = limit_s
        self.preload = preload
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: Connection | None = None

    def _start(self) -> Connection:
        if self._conn is None or self._proc is None or not self._proc.is_alive():
            self.close()
            parent, child = self._ctx.Pipe()
            self._proc = self._ctx.Process(target=_serve, args=(child, self.preload), daemon=True)
            self._proc.start()
            child.close()
            self._conn = parent
            if not parent.poll(120) or parent.recv() != "ready":
                raise RuntimeError("the isolated worker did not start")
        return self._conn

    def call(self, fn: Callable[..., Any], *args: Any) -> Outcome:
        conn = self._start()
        conn.send((fn, args))
        if not conn.poll(self.limit_s):
            self.close()
            return Outcome("timeout", f"no answer within {self.limit_s}s", seconds=self.limit_s)
        try:
            reply: Outcome = conn.recv()
            return reply
        except EOFError:
            pass
        self._proc.join(5)
        code = self._proc.exitcode
        self.close()
        return Outcome("crash", f"worker died with exit code {code}")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(5)
            self._proc = None


# -- what the workers run ------------------------------------------------------------------


def cloud_job(data: bytes, manifest: Any) -> dict[str, Any]:
    """The cloud's media work on one chunk: ``analyse``, then ``frames_to_shard`` whatever the
    content verdict."""
    import json

    from cloud_ingest.filters import Thresholds, analyse
    from cloud_ingest.preprocess import Options, frames_to_shard

    result = analyse(data, manifest, Thresholds())
    scores = json.dumps(result.scores)
    body, frames = frames_to_shard(data, manifest, Options(short_side=64), scores)
    return {"analysis": result.as_dict(), "frames": frames, "shard_bytes": len(body)}


def demuxed_packets_job(data: bytes) -> int | None:
    """How many video packets FFmpeg's MP4 demuxer finds in ``data`` (None: it cannot open
    it): what an edge that faithfully described a damaged file would declare."""
    import io

    import av

    c: Any
    try:
        with av.open(io.BytesIO(data), format="mp4", options={"max_pixels": "1000000"}) as c:
            if not c.streams.video:
                return None
            return len([p for p in c.demux(c.streams.video[0]) if p.size])
    except (av.FFmpegError, ValueError):
        return None


def shard_job(data: bytes, manifest: Any) -> int:
    """``frames_to_shard`` alone, as the processor calls it after an accepting analyse."""
    from cloud_ingest.preprocess import Options, frames_to_shard

    return frames_to_shard(data, manifest, Options(short_side=64), "{}")[1]


def crash_job() -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)


def sleep_job(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


# -- the edge ------------------------------------------------------------------------------


def recover_job(root: str, name: str, data: bytes) -> dict[str, Any]:
    """Start-up recovery of a spool whose tmp dir holds one partial chunk file ``data``."""
    from pathlib import Path

    from edge_agent.config import EdgeSettings
    from edge_agent.publisher import build_manifest
    from edge_agent.spool import Spool

    config: dict[str, Any] = {
        "device_id": "dev-1",
        "site_id": "site-1",
        "s3_bucket": "raw-bucket",
        "signing_key": "k",
        "cameras": [{"id": "cam1", "url": "file:///x.mp4"}],
    }
    settings = EdgeSettings(**config)
    spool = Spool(Path(root))
    (spool.tmp_dir / name).write_bytes(data)
    try:
        result = spool.recover(
            lambda c, seq, prev: build_manifest(settings, c, seq, prev)
        ).as_dict()
        records = [spool.get(i) for i in spool.unfinished()]
        return {
            "result": result,
            "records": [(r.state, str(r.path), r.manifest) for r in records if r is not None],
            "quarantined": sorted(p.name for p in spool.quarantine_dir.iterdir()),
            "tmp": sorted(p.name for p in spool.tmp_dir.iterdir()),
        }
    finally:
        spool.close()


def segment_job(src: str, out: str, segment_s: float) -> dict[str, Any]:
    """A camera connection through the agent's own capture path
    (``CameraWorker.capture_from``: timestamp repair, segmenter, flush whatever happens),
    from a source opened without real-time pacing. The errors the worker documents as
    camera errors are returned; anything else propagates."""
    from edge_agent.camera import CAPTURE_ERRORS
    from edge_agent.segmenter import ClosedChunk
    from tests.support import capture_file

    chunks: list[ClosedChunk] = []
    error = None
    try:
        capture_file(Path(src), Path(out), segment_s, chunks.append)
    except CAPTURE_ERRORS as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {"error": error, "chunks": chunks}


def chunk_facts_job(path: str) -> dict[str, Any]:
    """What a chunk file holds, demuxed and fully decoded (decode errors are reported)."""
    import av

    facts: dict[str, Any] = {}
    with av.open(path, format="mp4") as f:
        stream = f.streams.video[0]
        ctx = stream.codec_context
        facts["codec"], facts["size"] = str(ctx.name), (int(ctx.width), int(ctx.height))
        packets = [p for p in f.demux(stream) if p.size]
    facts["keyflags"] = [bool(p.is_keyframe) for p in packets]
    sizes: list[tuple[int, int]] = []
    try:
        with av.open(path, format="mp4") as f:
            sizes = [(fr.width, fr.height) for fr in f.decode(video=0)]
        facts["decode_error"] = None
    except av.FFmpegError as exc:
        facts["decode_error"] = str(exc)
    facts["frame_sizes"] = sizes
    try:
        with av.open(path, format="mp4") as f:
            stream = f.streams.video[0]
            stream.codec_context.skip_frame = "NONKEY"
            keys = [(fr.width, fr.height) for fr in f.decode(stream)]
        facts["keyframe_sizes"] = keys
    except av.FFmpegError:
        facts["keyframe_sizes"] = []
    return facts
