"""The edge on hostile media: start-up recovery of damaged partial chunks, and capture +
segmentation of damaged sources. Every case runs in a crash-isolated worker with a time
limit (tests/hostile.py): the edge must quarantine what it cannot use and never crash.

(tests/test_spool.py covers the clean cases: a chunk cut short after whole fragments, a
file of zeros, an interrupted rename. These add hypothesis-driven damage.)
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devstack.media import make_clip, remux
from edge_agent.segmenter import partial_name
from tests import hostile
from tests.hostile import Isolated, Outcome
from tests.support import segment_file

PER_CASE_S = 15.0  # generous: a shared 2-core machine; a case takes 50-200 ms
SETTINGS = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_case = itertools.count()
WALL = datetime(2026, 11, 22, 4, tzinfo=UTC)
# Start-up recovery of one partial that found nothing else to do.
NOTHING = {"renamed": 0, "lost": 0, "salvaged": 0, "quarantined": 0, "removed": 0, "orphaned": 0}


class Media:
    """The intact inputs. A plain class: hypothesis prints a failing example's arguments."""

    def __init__(self, root: Path) -> None:
        self.root = root
        clip = make_clip(root / "clip.mp4", 3.0)  # 45 frames, a keyframe every second
        [chunk] = segment_file(clip, root / "chunk", 3.0)
        self.chunk = chunk.path.read_bytes()  # fMP4: ftyp, moov, 3 x (moof, mdat), mfra
        self.sources = {
            "mp4": clip.read_bytes(),  # moov after mdat
            "mp4_audio": make_clip(root / "av.mp4", 3.0, audio=True).read_bytes(),
            "mpegts": remux(clip, root / "clip.ts", "mpegts").read_bytes(),
            "fmp4": self.chunk,  # moov first: a cut keeps its head
        }

    def __repr__(self) -> str:
        return f"Media({len(self.chunk)}-byte chunk, sources {sorted(self.sources)})"

    def case_dir(self) -> Path:
        d = self.root / f"case{next(_case)}"
        d.mkdir()
        return d


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Media:
    return Media(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def worker() -> Iterator[Isolated]:
    w = Isolated(PER_CASE_S, preload=("edge_agent.spool", "edge_agent.camera", "av"))
    yield w
    w.close()


def answered(out: Outcome, what: str = "") -> object:
    """No exception but the documented ones (returned as values), no crash, no hang."""
    assert out.kind == "ok", f"{what}: {out.kind}: {out.detail}"
    return out.value


def _flip(data: bytes, rnd: random.Random, spans: list[tuple[int, int]], most: int) -> bytes:
    out = bytearray(data)
    for _ in range(rnd.randrange(1, most)):
        lo, hi = rnd.choice(spans)
        out[rnd.randrange(lo, hi)] ^= rnd.randrange(1, 256)
    return bytes(out)


def _box_size(data: bytes, rnd: random.Random) -> bytes:
    """A top-level box size of 0, 1 (64-bit follows), tiny or huge; maybe cut right after."""
    out = bytearray(data)
    box = rnd.choice(list(hostile.boxes(data)))
    size = rnd.choice([0, 1, 7, 8, 2**31, 2**32 - 1, rnd.randrange(2**32)])
    out[box.start : box.start + 4] = size.to_bytes(4, "big")
    return bytes(out[: rnd.choice([len(out), box.start + rnd.randrange(1, 24)])])


def _headers(data: bytes) -> list[tuple[int, int]]:
    return [(b.start, b.end) for b in hostile.walk(data) if b.kind in (b"moov", b"moof")]


_DAMAGE: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "truncate": lambda d, r: d[: r.randrange(len(d))],
    # power loss: the size grew, the blocks were never written (zeros) or are stale
    "zero_tail": lambda d, r: d[: r.randrange(len(d))] + bytes(r.randrange(1, 64 * 1024)),
    "random_tail": lambda d, r: d[: r.randrange(len(d))] + r.randbytes(r.randrange(1, 4096)),
    "flip": lambda d, r: _flip(d, r, [(0, len(d))], 12),
    "flip_headers": lambda d, r: _flip(d, r, _headers(d), 6),
    "box_size": _box_size,
    "random": lambda d, r: r.randbytes(r.randrange(0, 8192)),
    "garbage_bitstream": lambda d, r: hostile.map_samples(d, lambda b: r.randbytes(len(b))),
}


def damage(data: bytes, kind: str, seed: int) -> bytes:
    """One kind of damage to a file, driven by ``seed``."""
    return _DAMAGE[kind](data, random.Random(seed))


PARTIAL_DAMAGE = [
    "truncate",
    "zero_tail",
    "random_tail",
    "flip",
    "flip_headers",
    "box_size",
    "random",
    "garbage_bitstream",
]


@SETTINGS
@given(kind=st.sampled_from(PARTIAL_DAMAGE), seed=st.integers(0, 2**32 - 1))
def test_recovery_quarantines_or_salvages_a_valid_prefix_of_any_partial(
    media: Media, worker: Isolated, kind: str, seed: int
) -> None:
    """Start-up recovery of one damaged ``.partial`` chunk: it is either quarantined,
    byte for byte, or committed as a prefix of itself made of whole boxes ending on a
    fragment, whose manifest tells the truth (hash, size, frames, keyframes, size) and
    whose keyframes decode at that size. Never another exception, never a crash or hang."""
    data = damage(media.chunk, kind, seed)
    root = media.case_dir()
    name = partial_name("cam1", WALL)
    what = f"{kind} seed={seed}"
    value = answered(worker.call(hostile.recover_job, str(root), name, data), what)
    assert isinstance(value, dict)
    assert value["tmp"] == [], what
    if value["result"]["quarantined"]:
        assert value["result"] == {**NOTHING, "quarantined": 1}
        assert value["quarantined"] == [name] and value["records"] == [], what
        assert (root / "quarantine" / name).read_bytes() == data, f"{what}: evidence altered"
        return
    assert value["result"] == {**NOTHING, "salvaged": 1}, what
    [(state, path, manifest)] = value["records"]
    assert state == "written" and value["quarantined"] == []
    kept = Path(path).read_bytes()
    assert 0 < len(kept) <= len(data) and data[: len(kept)] == kept, f"{what}: not a prefix"
    boxes = list(hostile.boxes(kept))
    assert boxes[-1].end == len(kept) and boxes[-1].kind == b"mdat", what
    assert manifest.sha256 == hashlib.sha256(kept).hexdigest() and manifest.size_bytes == len(kept)
    facts = answered(worker.call(hostile.chunk_facts_job, path), what)
    assert isinstance(facts, dict)
    assert len(facts["keyflags"]) == manifest.frame_count, what
    assert sum(facts["keyflags"]) == manifest.keyframe_count >= 1, what
    assert (facts["codec"], facts["size"]) == (manifest.codec, (manifest.width, manifest.height))
    assert facts["keyframe_sizes"], f"{what}: no keyframe decodes"
    assert set(facts["keyframe_sizes"]) == {(manifest.width, manifest.height)}, what
    assert 0 < manifest.media_duration_s <= 600, what


def test_recovery_of_an_intact_partial_keeps_every_byte(media: Media, worker: Isolated) -> None:
    """The control: an undamaged partial is committed whole, up to its last fragment (the
    trailing ``mfra`` index is not needed to play it)."""
    root = media.case_dir()
    name = partial_name("cam1", WALL)
    value = answered(worker.call(hostile.recover_job, str(root), name, media.chunk), "intact")
    assert isinstance(value, dict)
    [(_, path, manifest)] = value["records"]
    last_mdat = hostile.find(media.chunk, b"mdat")[-1]
    assert Path(path).read_bytes() == media.chunk[: last_mdat.end]
    assert (manifest.frame_count, manifest.keyframe_count) == (45, 3)


SOURCE_DAMAGE = ["truncate", "flip", "random_tail", "random", "garbage_bitstream"]


@SETTINGS
@given(
    source=st.sampled_from(["mp4", "mp4_audio", "mpegts", "fmp4"]),
    kind=st.sampled_from(SOURCE_DAMAGE),
    seed=st.integers(0, 2**32 - 1),
)
def test_segmenting_a_damaged_source_never_crashes_and_chunks_are_valid(
    media: Media, worker: Isolated, source: str, kind: str, seed: int
) -> None:
    """A damaged recording read as a camera: capture + timestamp repair + segmenter raise
    nothing but the camera errors the worker documents (CAPTURE_ERRORS), never crash or
    hang, and every chunk they close is a valid fMP4 that demuxes to exactly the frames
    and keyframes it declares, starting on a keyframe. Where the bitstream itself is intact
    up to the damage (a cut), every chunk also decodes, at its declared size."""
    data = damage(media.sources[source], kind, seed)
    case = media.case_dir()
    src = case / f"src.{'ts' if source == 'mpegts' else 'mp4'}"
    src.write_bytes(data)
    what = f"{source} {kind} seed={seed}"
    value = answered(worker.call(hostile.segment_job, str(src), str(case / "out"), 1.0), what)
    assert isinstance(value, dict)
    for chunk in value["chunks"]:
        facts = answered(worker.call(hostile.chunk_facts_job, str(chunk.path)), what)
        assert isinstance(facts, dict)
        assert len(facts["keyflags"]) == chunk.frame_count >= 1, what
        assert facts["keyflags"][0], f"{what}: does not start on a keyframe"
        assert sum(facts["keyflags"]) == chunk.keyframe_count, what
        assert (facts["codec"], facts["size"]) == (chunk.codec, (chunk.width, chunk.height))
        assert chunk.media_end_s >= chunk.media_start_s, what
        if kind == "truncate":
            assert facts["decode_error"] is None, f"{what}: {facts['decode_error']}"
            assert set(facts["frame_sizes"]) == {(chunk.width, chunk.height)}, what
            assert len(facts["frame_sizes"]) >= chunk.frame_count - 1, what
    leftovers = [p for p in (case / "out").glob("*") if p not in {c.path for c in value["chunks"]}]
    assert leftovers == [], f"{what}: files the segmenter left behind: {leftovers}"


@pytest.mark.parametrize("source", ["mp4", "mpegts", "fmp4"])
def test_segmenting_random_bytes_is_a_camera_error(
    media: Media, worker: Isolated, source: str
) -> None:
    """Bytes of no format at all: the documented CameraError, no chunk."""
    case = media.case_dir()
    src = case / f"src.{'ts' if source == 'mpegts' else 'mp4'}"
    src.write_bytes(random.Random(3).randbytes(20_000))
    value = answered(worker.call(hostile.segment_job, str(src), str(case / "out"), 1.0), "random")
    assert isinstance(value, dict)
    assert value["chunks"] == [] and str(value["error"]).startswith("CameraError"), value


def recover(media: Media, worker: Isolated, data: bytes) -> dict[str, Any]:
    root = media.case_dir()
    value = answered(worker.call(hostile.recover_job, str(root), partial_name("cam1", WALL), data))
    assert isinstance(value, dict)
    return value


def test_recovery_of_a_partial_cut_inside_a_64bit_box_header_is_quarantined(
    media: Media, worker: Isolated
) -> None:
    """A box announcing a 64-bit size (size field 1) with the file ending before that size:
    recovery used to die on ``struct.error`` and take the agent's start-up with it."""
    moof = hostile.find(media.chunk, b"moof")[0]
    data = bytearray(media.chunk[: moof.start + 12])
    data[moof.start : moof.start + 4] = (1).to_bytes(4, "big")
    value = recover(media, worker, bytes(data))
    assert value["result"]["quarantined"] == 1 and value["records"] == []


def test_recovery_quarantines_undecodable_footage_as_it_was_found(
    media: Media, worker: Isolated
) -> None:
    """Whole fragments whose every NAL unit is noise: they demux, so recovery used to
    upload them as footage (and truncate the file first). Quarantined, byte for byte."""
    rnd = random.Random(11)
    data = hostile.map_samples(media.chunk, lambda b: rnd.randbytes(len(b)))
    value = recover(media, worker, data)
    assert value["result"]["quarantined"] == 1 and value["records"] == []
    [name] = value["quarantined"]
    assert (media.root / f"case{next(_case) - 1}" / "quarantine" / name).read_bytes() == data


def test_recovery_after_power_loss_keeps_only_the_fragments_that_decode(
    media: Media, worker: Isolated
) -> None:
    """The file grew past the second fragment's mdat but its last blocks read back as
    zeros: the first fragment (15 frames, one keyframe) is salvaged, not the zeros."""
    second = hostile.find(media.chunk, b"mdat")[1]
    cut = (second.payload + second.end) // 2
    data = media.chunk[:cut] + bytes(len(media.chunk) - cut)
    value = recover(media, worker, data)
    [(_, path, manifest)] = value["records"]
    assert Path(path).read_bytes() == media.chunk[: hostile.find(media.chunk, b"mdat")[0].end]
    assert (manifest.frame_count, manifest.keyframe_count) == (15, 1)


def test_recovery_cuts_at_a_timeline_jump(media: Media, worker: Isolated) -> None:
    """The third fragment's decode time (tfdt) jumps by a day: the two fragments before it
    are salvaged with their true 2 s, not a 24 h chunk."""
    data = bytearray(media.chunk)
    tfdt = hostile.find(media.chunk, b"tfdt")[2]
    assert data[tfdt.payload] == 1  # version 1: a 64-bit decode time
    at = tfdt.payload + 4
    base = int.from_bytes(data[at : at + 8], "big")
    data[at : at + 8] = (base + 86400 * 15_000).to_bytes(8, "big")  # time base 1/15000
    value = recover(media, worker, bytes(data))
    [(_, _, manifest)] = value["records"]
    assert (manifest.frame_count, manifest.keyframe_count) == (30, 2)
    assert manifest.media_duration_s == pytest.approx(2.0)


def segment(media: Media, worker: Isolated, data: bytes, suffix: str = "mp4") -> dict[str, Any]:
    case = media.case_dir()
    src = case / f"src.{suffix}"
    src.write_bytes(data)
    value = answered(worker.call(hostile.segment_job, str(src), str(case / "out"), 1.0))
    assert isinstance(value, dict)
    value["out"] = sorted((case / "out").glob("*"))
    return value


def test_segmenting_a_source_whose_tags_are_not_utf8(media: Media, worker: Isolated) -> None:
    """An encoder tag with invalid UTF-8: PyAV's strict decoding raised UnicodeDecodeError
    from ``Source()``, outside the camera errors. The footage is segmented."""
    clip = media.sources["mp4"]
    at = clip.index(b"Lavf")
    value = segment(media, worker, clip[:at] + b"\xc3\x28" + clip[at + 2 :])
    assert value["error"] is None
    assert sum(c.frame_count for c in value["chunks"]) == 45


def test_segmenting_a_stream_mp4_cannot_carry_is_a_camera_error(
    media: Media, worker: Isolated
) -> None:
    """The sample entry says H.263 (``s263``) instead of avc1: the muxer refused it with a
    ValueError, outside the camera errors. Now a CameraError, and no file is left behind."""
    clip = media.sources["mp4"]
    [entry] = hostile.find(clip, b"avc1")
    at = entry.start + 4
    value = segment(media, worker, clip[:at] + b"s263" + clip[at + 4 :])
    assert str(value["error"]).startswith("CameraError"), value
    assert value["chunks"] == [] and value["out"] == []


def test_segmenting_a_cut_recording_drops_the_torn_packet(media: Media, worker: Isolated) -> None:
    """A recording cut inside its second fragment: the demuxer hands over the torn last
    packet flagged corrupt; it is dropped, so every chunk decodes, frame for frame."""
    second = hostile.find(media.chunk, b"mdat")[1]
    value = segment(media, worker, media.chunk[: (second.payload + second.end) // 2])
    assert value["error"] is None
    for chunk in value["chunks"]:
        facts = answered(worker.call(hostile.chunk_facts_job, str(chunk.path)))
        assert isinstance(facts, dict)
        assert facts["decode_error"] is None
        assert len(facts["frame_sizes"]) == chunk.frame_count
    assert 15 < sum(c.frame_count for c in value["chunks"]) < 30
