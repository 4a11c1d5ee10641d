"""The cloud's media analysis on hostile chunks: corrupted, truncated, lying or not MP4 at all.

Every case runs in a separate worker process (tests/hostile.py): a segfault in FFmpeg or
PyAV fails the test instead of killing pytest, a hang fails it after PER_CASE_S, and the
worker's peak resident memory is measured per case. For every input, ``analyse`` (then
``frames_to_shard`` when it returns) must either return or raise ``Rejected``.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devstack.media import make_clip, remux
from shared.manifest import Manifest
from tests import hostile
from tests.hostile import Isolated, Outcome, cloud_job
from tests.support import segment_file

PER_CASE_S = 10.0  # generous: a shared 2-core machine; a normal case takes ~30 ms
# Memory a case may add to the idle worker (~160 MB with its libraries): a few frames of the
# declared 320x240 and a Parquet shard fit many times over; a 16000x16000 frame is 384 MB.
EXTRA_MB = 200.0
HEADERS = (b"moov", b"moof")
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Corpus:
    """The intact chunk and where its parts are. A plain class: hypothesis prints the
    arguments of a failing example, and a dataclass would print 36 kB of bytes."""

    def __init__(self, chunk: bytes, manifest: Manifest, clip: Path) -> None:
        self.chunk = chunk
        self.manifest = manifest
        self.clip = clip
        self.mdat = [(b.payload, b.end) for b in hostile.find(chunk, b"mdat")]
        self.headers = [(b.start, b.end) for b in hostile.walk(chunk) if b.kind in HEADERS]

    def __repr__(self) -> str:
        return f"Corpus({len(self.chunk)} bytes, {self.manifest.frame_count} frames)"


def manifest_for(data: bytes, codec: str, width: int, height: int, frames: int) -> Manifest:
    return Manifest.model_validate(
        {
            "chunk_id": "0" * 32,
            "device_id": "d",
            "site_id": "s",
            "camera_id": "c",
            "seq": 0,
            "bucket": "raw-bucket",
            "key": "k.mp4",
            "size_bytes": len(data),
            "sha256": "0" * 64,
            "container": "mp4",
            "codec": codec,
            "width": width,
            "height": height,
            "frame_count": frames,
            "keyframe_count": 2,
            "start_time": "2026-11-22T04:00:00Z",
            "end_time": "2026-11-22T04:00:02Z",
            "media_start_s": 0.0,
            "media_duration_s": 2.0,
            "discontinuity": False,
            "gap_before_s": 0.0,
            "agent_version": "t",
        }
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("fuzz")
    clip = make_clip(root / "clip.mp4", 2.0)
    [c] = segment_file(clip, root / "chunks", 2.0)
    data = c.path.read_bytes()
    manifest = manifest_for(data, c.codec, c.width, c.height, c.frame_count)
    return Corpus(data, manifest, clip)


@pytest.fixture(scope="module")
def worker(corpus: Corpus) -> Iterator[Isolated]:
    w = Isolated(PER_CASE_S, preload=("cloud_ingest.filters", "cloud_ingest.preprocess"))
    w.call(cloud_job, corpus.chunk, corpus.manifest)  # first use of everything, unmeasured
    yield w
    w.close()


def extra_mb(worker: Isolated, out: Outcome) -> float:
    """Peak memory of a call above the idle worker's."""
    return out.peak_mb - worker.call(hostile.sleep_job, 0.0).peak_mb


def survives(worker: Isolated, out: Outcome, what: str) -> None:
    """The contract: a result or Rejected; no other exception, no crash, no hang, bounded."""
    assert out.kind in ("ok", "rejected"), f"{what}: {out.kind}: {out.detail}"
    assert extra_mb(worker, out) < EXTRA_MB, f"{what}: peak {out.peak_mb:.0f} MB"


def flip(data: bytes, spans: list[tuple[int, int]], rnd: random.Random, count: int) -> bytes:
    out = bytearray(data)
    for _ in range(count):
        lo, hi = rnd.choice(spans)
        if hi > lo:
            out[rnd.randrange(lo, hi)] ^= rnd.randrange(1, 256)
    return bytes(out)


def mutate(c: Corpus, kind: str, seed: int, size: int) -> bytes:
    """One hostile variant of the chunk; ``seed`` and ``size`` drive the randomness."""
    rnd = random.Random(seed)
    data = c.chunk
    if kind == "truncate":
        return data[: seed % len(data)]
    if kind == "flip_mdat":
        return flip(data, c.mdat, rnd, 1 + size % 40)
    if kind == "flip_headers":
        return flip(data, c.headers, rnd, 1 + size % 6)
    if kind == "flip_anywhere":
        return flip(data, [(0, len(data))], rnd, 1 + size % 12)
    if kind == "splice":
        at = rnd.randrange(len(data))
        return data[:at] + rnd.randbytes(size % 2048) + data[at + rnd.randrange(2048) :]
    if kind == "random_after_ftyp":
        return data[:28] + rnd.randbytes(size % 8192)
    if kind == "random":
        return rnd.randbytes(size % 8192)
    if kind == "garbage_bitstream":
        return hostile.map_samples(data, lambda b: rnd.randbytes(len(b)))
    if kind == "sps_size":
        w, h = 1 + seed % 1100, 1 + size % 1100  # up to 17600 pixels a side
        return hostile.rewrite(data, b"avcC", lambda p: hostile.patch_avcc_sps(p, w, h))
    raise AssertionError(kind)


KINDS = [
    "truncate",
    "flip_mdat",
    "flip_headers",
    "flip_anywhere",
    "splice",
    "random_after_ftyp",
    "random",
    "garbage_bitstream",
    "sps_size",
]


@SETTINGS
@given(
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**32 - 1),
    size=st.integers(0, 2**16),
    honest=st.booleans(),
)
def test_fuzz_analyse_and_preprocess_return_or_reject(
    corpus: Corpus, worker: Isolated, kind: str, seed: int, size: int, honest: bool
) -> None:
    """200 corrupted chunks: never another exception, never a crash, never a hang, and never
    more memory than a few frames of the size the manifest declares."""
    data = mutate(corpus, kind, seed, size)
    manifest = corpus.manifest
    if honest:  # the manifest describes the damaged file (as an edge that salvaged it would)
        count = worker.call(hostile.demuxed_packets_job, data)
        assert count.kind == "ok", count  # FFmpeg itself survives it
        if count.value is not None:
            manifest = manifest.model_copy(update={"frame_count": count.value})
    out = worker.call(cloud_job, data, manifest)
    survives(worker, out, f"{kind} seed={seed} size={size} honest={honest}")
    if out.kind == "ok":  # accepted on integrity: what it found matches what was declared
        a = out.value["analysis"]
        assert (a["width"], a["height"]) == (corpus.manifest.width, corpus.manifest.height)
        assert a["keyframes_decoded"] >= 1
        assert out.value["frames"] >= 1


def test_fuzz_the_intact_chunk_is_accepted(corpus: Corpus, worker: Isolated) -> None:
    """The control: the unmutated chunk passes analyse and yields a shard."""
    out = worker.call(cloud_job, corpus.chunk, corpus.manifest)
    assert out.kind == "ok", out.detail
    assert out.value["analysis"]["keyframes_decoded"] == 2
    assert out.value["frames"] == 4


def _image(codec: str) -> bytes:
    """A still image encoded by FFmpeg's own encoder for ``codec`` (png, mjpeg)."""
    enc: Any = av.CodecContext.create(codec, "w")
    enc.width, enc.height = 64, 48
    enc.pix_fmt = "rgb24" if codec == "png" else "yuvj420p"
    enc.time_base = Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 90, np.uint8), format="rgb24")
    frame = frame.reformat(format=enc.pix_fmt)
    return b"".join(bytes(p) for p in [*enc.encode(frame), *enc.encode(None)])


@pytest.mark.parametrize("fmt", ["png", "mjpeg", "mpegts", "matroska", "flv"])
def test_wrong_container_is_rejected_as_such(
    corpus: Corpus, worker: Isolated, tmp_path: Path, fmt: str
) -> None:
    """Another format handed over as the chunk (same H.264 stream where it can carry it)."""
    if fmt in ("png", "mjpeg"):
        data = _image(fmt)
    else:
        data = remux(corpus.clip, tmp_path / f"clip.{fmt}", fmt).read_bytes()
    out = worker.call(cloud_job, data, corpus.manifest)
    assert (out.kind, out.detail) == ("rejected", "wrong_container"), out


def test_random_bytes_stay_undecodable(worker: Isolated, corpus: Corpus) -> None:
    """Bytes of no known format keep the reason the DLQ has always given them."""
    data = random.Random(5).randbytes(20_000)
    out = worker.call(cloud_job, data, corpus.manifest)
    assert (out.kind, out.detail) == ("rejected", "undecodable"), out


@pytest.mark.parametrize(("wmbs", "hmbs"), [(1000, 1000), (1024, 8), (480, 270)])
def test_header_claiming_huge_dimensions_is_rejected_before_allocation(
    corpus: Corpus, worker: Isolated, wmbs: int, hmbs: int
) -> None:
    """The SPS in avcC claims 16000x16000 (a 384 MB frame), 16384x128, or 8K UHD while the
    manifest says 320x240: refused from the header, in well under a second, and no frame of
    that size is ever allocated (before the fix: 6 s and 1.2 GB at open). What remains is
    the decoder parsing the SPS into per-macroblock tables, ~80 MB for the largest."""
    data = hostile.rewrite(corpus.chunk, b"avcC", lambda p: hostile.patch_avcc_sps(p, wmbs, hmbs))
    [avcc] = hostile.find(data, b"avcC")
    assert hostile.sps_dimensions(hostile.avcc_sps(data[avcc.payload : avcc.end])) == (
        16 * wmbs,
        16 * hmbs,
    )
    out = worker.call(cloud_job, data, corpus.manifest)
    expected = "dimension_mismatch" if wmbs * hmbs * 256 <= 7680 * 4320 else "absurd_dimensions"
    assert (out.kind, out.detail) == ("rejected", expected), out
    assert out.seconds < 2.0
    assert extra_mb(worker, out) < 120.0


def test_manifest_and_header_agreeing_on_absurd_dimensions_are_rejected(
    corpus: Corpus, worker: Isolated
) -> None:
    """A chunk whose signed manifest and SPS both claim 16384x16384: the manifest is
    consistent, the size is still beyond Thresholds.max_pixels."""
    data = hostile.rewrite(corpus.chunk, b"avcC", lambda p: hostile.patch_avcc_sps(p, 1024, 1024))
    data = hostile.patch_sample_entry_size(data, 16384, 16384)
    lying = corpus.manifest.model_copy(update={"width": 16384, "height": 16384})
    out = worker.call(cloud_job, data, lying)
    assert (out.kind, out.detail) == ("rejected", "absurd_dimensions"), out
    assert extra_mb(worker, out) < 50.0


def test_sample_count_bomb_is_rejected_before_the_demuxer_indexes_it(
    corpus: Corpus, worker: Isolated
) -> None:
    """A fragment whose trun declares 14.7 million samples (one flipped byte; the per-sample
    fields simply run out): FFmpeg would build an index entry for each, ~250 MB from a 36 kB
    file. The declared count is checked against the manifest first."""
    data = bytearray(corpus.chunk)
    trun = hostile.find(corpus.chunk, b"trun")[0]
    data[trun.payload + 5] = 0xE0
    out = worker.call(cloud_job, bytes(data), corpus.manifest)
    assert (out.kind, out.detail) == ("rejected", "frame_count_mismatch"), out
    assert extra_mb(worker, out) < 50.0
    out = worker.call(hostile.demuxed_packets_job, bytes(data))
    assert extra_mb(worker, out) > 100.0  # what the check spares: FFmpeg on its own


def test_sample_entry_lying_about_size_is_not_believed(corpus: Corpus, worker: Isolated) -> None:
    """tkhd and avc1 claim 65535x65535 but the SPS says 320x240: the decoder's size wins and
    the chunk is analysed as what it is."""
    data = hostile.patch_sample_entry_size(corpus.chunk, 65535, 65535)
    out = worker.call(cloud_job, data, corpus.manifest)
    assert out.kind == "ok", out
    assert (out.value["analysis"]["width"], out.value["analysis"]["height"]) == (320, 240)


def test_garbage_bitstream_in_a_valid_container_is_undecodable(
    corpus: Corpus, worker: Isolated
) -> None:
    """Every NAL unit's payload replaced by random bytes (lengths, NAL headers and the
    container intact): nothing decodes, so the chunk is rejected as undecodable."""
    rnd = random.Random(7)
    data = hostile.map_samples(corpus.chunk, lambda b: rnd.randbytes(len(b)))
    out = worker.call(cloud_job, data, corpus.manifest)
    assert (out.kind, out.detail) == ("rejected", "undecodable"), out


def test_frames_to_shard_rejects_a_chunk_the_manifest_does_not_describe(
    corpus: Corpus, worker: Isolated
) -> None:
    """Called on its own (as after an analyse with other limits): the decoded frames must be
    the manifest's size, or the whole chunk is rejected rather than half-processed."""
    lying = corpus.manifest.model_copy(update={"width": 640, "height": 480})
    out = worker.call(hostile.shard_job, corpus.chunk, lying)
    assert (out.kind, out.detail) == ("rejected", "dimension_mismatch"), out
    out = worker.call(hostile.shard_job, b"\x00" * 64, corpus.manifest)
    assert (out.kind, out.detail) == ("rejected", "undecodable"), out


def test_isolated_worker_reports_crash_and_timeout() -> None:
    """The harness itself: a segfault and a hang are reported, and the next call works."""
    w = Isolated(1.0)
    try:
        assert w.call(hostile.crash_job).kind == "crash"
        assert w.call(hostile.sleep_job, 5.0).kind == "timeout"
        out = w.call(hostile.sleep_job, 0.0)
        assert out.kind == "ok"
    finally:
        w.close()


def test_corpus_is_a_two_fragment_fmp4_chunk(corpus: Corpus) -> None:
    """Sanity of the corpus itself: the chunk is fMP4 with the boxes the mutations target."""
    kinds = [b.kind for b in hostile.boxes(corpus.chunk)]
    assert kinds[:3] == [b"ftyp", b"moov", b"moof"] and kinds.count(b"mdat") == 2
    f: Any
    with av.open(io.BytesIO(corpus.chunk)) as f:
        assert len([p for p in f.demux(video=0) if p.size]) == corpus.manifest.frame_count
