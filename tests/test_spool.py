"""The spool and its ledger: limits and eviction, gaps, crash recovery (real files, real SQLite)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import pytest

from edge_agent.config import EdgeSettings
from edge_agent.publisher import build_manifest, with_evictions
from edge_agent.recovery import complete_prefix, salvage
from edge_agent.segmenter import ClosedChunk, partial_name
from edge_agent.spool import (
    ANNOUNCED,
    EVICTED,
    LOST,
    UPLOADED,
    WRITTEN,
    Limits,
    Position,
    Pruned,
    Spool,
)
from shared.manifest import Manifest, wall_span
from tests.support import report_figures, segment_file

SETTINGS = EdgeSettings(
    device_id="dev-1",
    site_id="site-1",
    s3_bucket="raw-bucket",
    signing_key="k",  # type: ignore[arg-type]
    cameras=[{"id": "cam1", "url": "file:///x.mp4"}],  # type: ignore[list-item]
)


def factory(chunk: ClosedChunk, seq: int, prev: Position) -> Manifest:
    return build_manifest(SETTINGS, chunk, seq, prev)


@pytest.fixture
def fresh_chunks(clip: Path, tmp_path: Path) -> list[ClosedChunk]:
    """Six 1 s chunks as the segmenter leaves them (temp files the spool will take over)."""
    return segment_file(clip, tmp_path / "spool" / "tmp", 1.0)


def test_spool_commit_assigns_seq_and_moves_file(
    tmp_path: Path, fresh_chunks: list[ClosedChunk]
) -> None:
    spool = Spool(tmp_path / "spool")
    manifests = [spool.commit(c, factory)[0] for c in fresh_chunks[:3]]
    assert [m.seq for m in manifests] == [0, 1, 2]
    for m in manifests:
        rec = spool.get(m.chunk_id)
        assert rec is not None and rec.state == WRITTEN and rec.path.exists()
    assert spool.unfinished() == [m.chunk_id for m in manifests]
    assert spool.pending_bytes() == sum(c.size_bytes for c in fresh_chunks[:3])
    spool.close()
    assert Spool(tmp_path / "spool").position(Spool(tmp_path / "spool")._db(), "cam1").next_seq == 3


def test_spool_upload_frees_the_file_and_announce_finishes(
    tmp_path: Path, fresh_chunks: list[ClosedChunk]
) -> None:
    spool = Spool(tmp_path / "spool")
    m, _ = spool.commit(fresh_chunks[0], factory)
    path = spool.get(m.chunk_id).path  # type: ignore[union-attr]
    spool.mark_uploaded(m.chunk_id)
    assert not path.exists()
    assert spool.pending_bytes() == 0
    spool.mark_announced(m.chunk_id)
    assert spool.counts() == {ANNOUNCED: 1}
    spool.mark_uploaded(m.chunk_id)  # a stale transition is ignored
    assert spool.get(m.chunk_id).state == ANNOUNCED  # type: ignore[union-attr]


def test_spool_evicts_oldest_first_and_reports_the_gap(
    tmp_path: Path, fresh_chunks: list[ClosedChunk]
) -> None:
    size = max(c.size_bytes for c in fresh_chunks)
    spool = Spool(tmp_path / "spool", Limits(max_bytes=3 * size, min_free_bytes=0, policy="oldest"))
    evicted = []
    manifests = []
    for c in fresh_chunks:
        m, freed = spool.commit(c, factory)
        manifests.append(m)
        evicted.extend(freed.evicted)
    assert [r.manifest.seq for r in evicted] == [0, 1, 2]
    assert all(not r.path.exists() for r in evicted)
    assert spool.pending_bytes() <= 3 * size
    assert spool.counts() == {EVICTED: 3, WRITTEN: 3}
    gap, count = spool.evicted_run_before("cam1", 3)
    assert count == 3
    # On the wall clock: the gap runs from the first evicted chunk's start to exactly
    # where the next kept chunk starts (the segmenter cuts chunks at one instant).
    kept = manifests[3].start_time - manifests[0].start_time
    assert gap == pytest.approx(kept.total_seconds(), abs=1e-6)
    assert spool.evicted_run_before("cam1", 4) == (0.0, 0)


def test_spool_newest_policy_keeps_old_footage(
    tmp_path: Path, fresh_chunks: list[ClosedChunk]
) -> None:
    size = max(c.size_bytes for c in fresh_chunks)
    spool = Spool(tmp_path / "spool", Limits(max_bytes=2 * size, min_free_bytes=0, policy="newest"))
    evicted = [r.manifest for c in fresh_chunks for r in spool.commit(c, factory)[1].evicted]
    assert [m.seq for m in evicted] == [2, 3, 4, 5]
    span = (evicted[-1].end_time - evicted[0].start_time).total_seconds()
    assert spool.evicted_run_before("cam1", 6) == (pytest.approx(span, abs=1e-6), 4)


def test_spool_never_evicts_a_chunk_being_uploaded(
    tmp_path: Path, fresh_chunks: list[ClosedChunk]
) -> None:
    size = max(c.size_bytes for c in fresh_chunks)
    spool = Spool(tmp_path / "spool", Limits(max_bytes=size, min_free_bytes=0))
    first, _ = spool.commit(fresh_chunks[0], factory)
    assert spool.claim(first.chunk_id) is not None
    _, freed = spool.commit(fresh_chunks[1], factory)
    assert [r.manifest.seq for r in freed.evicted] == [1]
    assert spool.get(first.chunk_id).state == WRITTEN  # type: ignore[union-attr]


def test_spool_free_disk_margin_evicts_without_crashing(
    tmp_path: Path, fresh_chunks: list[ClosedChunk]
) -> None:
    impossible = shutil.disk_usage(tmp_path).total * 2
    spool = Spool(tmp_path / "spool", Limits(max_bytes=1 << 40, min_free_bytes=impossible))
    for c in fresh_chunks[:2]:
        spool.commit(c, factory)
    assert spool.counts() == {EVICTED: 2}


def truncated_partial(chunk: ClosedChunk, tmp_dir: Path, cut: int) -> Path:
    """A chunk file as a kill -9 leaves it: named like an open chunk, cut short."""
    dst = tmp_dir / partial_name("cam1", chunk.wall_start)
    data = chunk.path.read_bytes()
    dst.write_bytes(data[: len(data) - cut])
    return dst


def test_recovery_salvages_complete_fragments_only(tmp_path: Path, clip: Path) -> None:
    [whole] = segment_file(clip, tmp_path / "src", 6.0)  # 6 GOPs = 6 fragments
    partial = truncated_partial(whole, tmp_path, cut=500)
    assert 0 < complete_prefix(partial) < whole.size_bytes
    chunk = salvage(partial)
    assert chunk is not None
    assert chunk.frame_count == 75 and chunk.keyframe_count == 5  # the torn 6th GOP is dropped
    with av.open(str(partial)) as f:
        assert len(list(f.decode(video=0))) == 75


def test_recovery_on_startup_commits_salvage_and_quarantines_garbage(
    tmp_path: Path, clip: Path
) -> None:
    [whole] = segment_file(clip, tmp_path / "src", 6.0)
    spool = Spool(tmp_path / "spool")
    truncated_partial(whole, spool.tmp_dir, cut=500)
    (spool.tmp_dir / partial_name("cam1", whole.wall_start)).write_bytes(b"\x00" * 100)
    result = spool.recover(factory).as_dict()
    assert result == {
        "renamed": 0,
        "lost": 0,
        "salvaged": 1,
        "quarantined": 1,
        "removed": 0,
        "orphaned": 0,
    }
    [chunk_id] = spool.unfinished()
    rec = spool.get(chunk_id)
    assert rec is not None and rec.manifest.frame_count == 75 and rec.path.exists()
    assert len(list(spool.quarantine_dir.iterdir())) == 1


def test_recovery_finishes_interrupted_rename_or_marks_lost(tmp_path: Path, clip: Path) -> None:
    chunks = segment_file(clip, tmp_path / "spool" / "tmp", 2.0)
    spool = Spool(tmp_path / "spool")
    for c in chunks:
        spool.commit(c, factory)
    recs = [spool.get(i) for i in spool.unfinished()]
    assert all(recs)
    # As if we crashed between the ledger commit and the rename...
    recs[0].path.rename(spool.tmp_dir / partial_name("cam1", recs[0].manifest.start_time))  # type: ignore[union-attr]
    # ...and as if a file vanished.
    recs[1].path.unlink()  # type: ignore[union-attr]
    result = spool.recover(factory).as_dict()
    assert (result["renamed"], result["lost"]) == (1, 1)
    assert recs[0].path.exists()  # type: ignore[union-attr]
    assert spool.state(recs[1].chunk_id)[0] == LOST  # type: ignore[index]
    lost = recs[1].manifest  # type: ignore[union-attr]
    span = wall_span(lost) + lost.gap_before_s
    assert spool.evicted_run_before("cam1", 2) == (pytest.approx(span, abs=1e-6), 1)
    assert UPLOADED not in spool.counts()


def _copies(chunk: ClosedChunk, tmp_dir: Path, n: int) -> Iterator[ClosedChunk]:
    """``n`` chunks with ``chunk``'s content, each in a fresh temp file (commit moves it)."""
    data = chunk.path.read_bytes()
    for i in range(n):
        path = tmp_dir / f"copy-{i}.mp4.partial"
        path.write_bytes(data)
        yield dataclasses.replace(chunk, path=path)


def test_spool_claim_and_eviction_race_never_evict_a_claimed_chunk(
    tmp_path: Path, fresh_chunks: list[ClosedChunk]
) -> None:
    """A committer evicts the oldest chunk at (almost) every commit, room being for two,
    while three delivery threads keep trying to claim that same oldest chunk and "upload"
    it (read the file to the end, then mark_uploaded). A chunk a delivery claimed must
    never end up evicted, and its file must be there to read in full: claim and evict are
    one decision."""
    chunk = fresh_chunks[0]
    spool = Spool(tmp_path / "spool", Limits(max_bytes=2 * chunk.size_bytes, min_free_bytes=0))
    committed: list[str] = []
    finished = threading.Event()
    uploaded: list[str] = []
    broken: list[str] = []

    def commit_all() -> None:
        for c in _copies(chunk, spool.tmp_dir, 300):
            committed.append(spool.commit(c, factory)[0].chunk_id)
        finished.set()

    def deliver() -> None:
        seen: set[str] = set()
        while not finished.is_set() or len(seen) < len(committed):
            oldest = [i for i in committed if i not in seen][:2]
            for chunk_id in oldest:
                if _deliver_one(spool, chunk_id, uploaded, broken):
                    seen.add(chunk_id)
            if not oldest:
                time.sleep(0.001)  # nothing to claim yet: leave the committer the GIL

    threads = [threading.Thread(target=deliver) for _ in range(3)]
    threads.append(threading.Thread(target=commit_all))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    states = {i: spool.state(i)[0] for i in uploaded}  # type: ignore[index]
    counts = spool.counts()
    report_figures(
        "spool_claim_vs_evict",
        {"commits": 300, "uploaded": len(uploaded), "broken": len(broken), **counts},
    )
    assert broken == []
    assert set(states.values()) <= {UPLOADED}
    assert counts.get(EVICTED, 0) > 0 and len(uploaded) > 0  # both really happened
    assert sum(counts.values()) == 300


def _deliver_one(spool: Spool, chunk_id: str, uploaded: list[str], broken: list[str]) -> bool:
    """What a delivery worker does with the spool: claim, read the file whole, mark it.
    True once the chunk is out of the delivery's hands (delivered, or not claimable)."""
    rec = spool.claim(chunk_id)
    if rec is None:
        return spool.state(chunk_id)[0] != WRITTEN  # type: ignore[index]
    if rec.state != WRITTEN:  # uploaded already: next comes the announcement, not the file
        spool.release(chunk_id)
        return True
    try:
        data = rec.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != rec.manifest.sha256:
            broken.append(chunk_id)
        spool.mark_uploaded(chunk_id)
        uploaded.append(chunk_id)
    except FileNotFoundError:
        broken.append(chunk_id)
    finally:
        spool.release(chunk_id)
    return True


def test_recovery_removes_files_finished_rows_left_and_quarantines_unknown_ones(
    tmp_path: Path, fresh_chunks: list[ClosedChunk]
) -> None:
    """A crash between a state change and its unlink leaves the file; so does one between
    eviction's commit and its unlink. Recovery deletes those; a chunk file no row knows
    goes to quarantine; a chunk still waiting keeps its file."""
    spool = Spool(tmp_path / "spool")
    ms = [spool.commit(c, factory)[0] for c in fresh_chunks[:4]]
    for c in fresh_chunks[4:]:
        c.path.unlink()  # not partials of a crash: keep them out of this recovery
    paths = [spool.final_path(m) for m in ms]
    # The first halves of mark_uploaded, mark_announced and an eviction: rows changed, files
    # still there (as a kill -9 right after each commit leaves them).
    spool._set_state(ms[0].chunk_id, UPLOADED, WRITTEN)
    spool._set_state(ms[1].chunk_id, UPLOADED, WRITTEN)
    spool._set_state(ms[1].chunk_id, ANNOUNCED, UPLOADED)
    spool._gone(spool.get(ms[2].chunk_id), EVICTED)  # type: ignore[arg-type]
    stray = paths[0].parent / f"{99:010d}-{'ab' * 16}.mp4"
    stray.write_bytes(b"not ours")
    spool.close()

    spool = Spool(tmp_path / "spool")
    found = spool.recover(factory)
    assert (found.removed, found.orphaned) == (3, 1)
    assert [p.exists() for p in paths] == [False, False, False, True]
    assert [p.name for p in spool.quarantine_dir.iterdir()] == [stray.name]
    assert spool.unfinished() == [ms[0].chunk_id, ms[3].chunk_id]  # to announce; to upload


def test_quarantine_is_bounded_by_age_and_bytes(tmp_path: Path) -> None:
    spool = Spool(
        tmp_path / "spool",
        Limits(1 << 40, 0, quarantine_max_bytes=250, quarantine_max_age_s=3600),
    )
    names = []
    for i in range(3):
        src = tmp_path / f"junk{i}.partial"
        src.write_bytes(bytes(100))
        names.append(spool.quarantine(src).name)
    old = time.time() - 7200
    os.utime(spool.quarantine_dir / names[0], (old, old))
    assert spool.prune_quarantine() == [Pruned(names[0], 100, "age")]
    src = tmp_path / "junk3.partial"
    src.write_bytes(bytes(100))
    spool.quarantine(src)
    assert spool.prune_quarantine() == [Pruned(names[1], 100, "bytes")]
    assert spool.quarantine_bytes() == 200


def test_quarantine_counts_against_the_spool_limit_and_goes_before_footage(
    tmp_path: Path, fresh_chunks: list[ClosedChunk]
) -> None:
    size = max(c.size_bytes for c in fresh_chunks)
    spool = Spool(tmp_path / "spool", Limits(max_bytes=int(1.5 * size), min_free_bytes=0))
    junk = tmp_path / "torn.partial"
    junk.write_bytes(bytes(size))
    name = spool.quarantine(junk).name
    _, freed = spool.commit(fresh_chunks[0], factory)
    assert freed.pruned == [Pruned(name, size, "spool_limit")]
    assert freed.evicted == []
    assert spool.counts() == {WRITTEN: 1}


def test_ledger_prune_keeps_rows_that_still_declare_a_gap(
    tmp_path: Path, fresh_chunks: list[ClosedChunk]
) -> None:
    spool = Spool(tmp_path / "spool")
    ms = [spool.commit(c, factory)[0] for c in fresh_chunks[:3]]
    spool.mark_uploaded(ms[0].chunk_id)
    spool.mark_announced(ms[0].chunk_id)
    spool._gone(spool.get(ms[1].chunk_id), EVICTED)  # type: ignore[arg-type]
    assert spool.prune(time.time() + 1) == (1, False)  # the announced one; not the eviction
    assert spool.get(ms[0].chunk_id) is None
    span = wall_span(ms[1]) + ms[1].gap_before_s  # on the wall clock
    assert spool.evicted_run_before("cam1", 2) == (pytest.approx(span, abs=1e-6), 1)
    spool.mark_uploaded(ms[2].chunk_id)
    spool.mark_announced(ms[2].chunk_id)  # its manifest declared the gap
    assert spool.prune(time.time() + 1) == (2, False)
    assert spool.counts() == {}
    assert spool.position(spool._db(), "cam1").next_seq == 3  # timelines are never pruned


def test_recovery_quarantines_a_partial_whose_name_it_cannot_read(tmp_path: Path) -> None:
    """A start time beyond datetime's range in a partial's name used to raise out of
    recovery, so the agent crashed at every start (a restart loop under systemd)."""
    spool = Spool(tmp_path / "spool")
    odd = spool.tmp_dir / "cam1+99999999999999999999+abcdef.mp4.partial"
    odd.write_bytes(b"\x00" * 64)
    found = spool.recover(factory)
    assert (found.quarantined, found.errors) == (1, [])
    assert [p.name for p in spool.quarantine_dir.iterdir()] == [odd.name]


def test_ledger_prune_is_bounded_per_call_and_linear_in_a_long_eviction_run(
    tmp_path: Path, fresh_chunks: list[ClosedChunk]
) -> None:
    """A long outage leaves a long run of evicted rows; once declared, they are pruned a
    bounded number of batches per call (the call reports that more is left), and each row
    costs a key lookup, not a walk over the rest of the run."""
    spool = Spool(tmp_path / "spool", Limits(max_bytes=1, min_free_bytes=0))
    chunk = fresh_chunks[0]
    for c in _copies(chunk, spool.tmp_dir, 60):
        spool.commit(c, factory)  # each one evicted at once: room for none
    assert spool.counts() == {EVICTED: 60}
    c = next(_copies(chunk, spool.tmp_dir, 1))
    last = spool.record(c, factory)
    spool.place(c, last)
    assert spool.claim(last.chunk_id) is not None  # being uploaded: never evicted
    assert spool.enforce_limits().evicted == []
    spool.mark_uploaded(last.chunk_id)
    spool.mark_announced(last.chunk_id)
    span = 60 * (chunk.wall_end - chunk.wall_start).total_seconds()  # on the wall clock
    assert spool.evicted_run_before("cam1", last.seq) == (pytest.approx(span, abs=1e-6), 60)
    cutoff = time.time() + 1  # every row is old enough
    assert spool.prune(cutoff, batch=25, batches=2) == (50, True)
    assert spool.prune(cutoff, batch=25, batches=2) == (11, False)
    assert spool.counts() == {}


def test_spool_moved_to_another_directory_keeps_its_backlog(
    tmp_path: Path, fresh_chunks: list[ClosedChunk]
) -> None:
    """Rows name their file relative to the spool: rsync it to a new disk, point
    EDGE_SPOOL_DIR there, and nothing is taken for lost or orphaned."""
    spool = Spool(tmp_path / "spool")
    ms = [spool.commit(c, factory)[0] for c in fresh_chunks[:2]]
    for c in fresh_chunks[2:]:
        c.path.unlink()
    spool.close()
    shutil.move(str(tmp_path / "spool"), str(tmp_path / "moved"))
    moved = Spool(tmp_path / "moved")
    found = moved.recover(factory)
    assert found.as_dict() == {
        "renamed": 0,
        "salvaged": 0,
        "quarantined": 0,
        "removed": 0,
        "orphaned": 0,
        "lost": 0,
    }
    assert moved.unfinished() == [m.chunk_id for m in ms]
    assert all(moved.get(m.chunk_id).path.exists() for m in ms)  # type: ignore[union-attr]


def test_evicted_rows_keep_a_small_tombstone(
    tmp_path: Path, fresh_chunks: list[ClosedChunk]
) -> None:
    spool = Spool(tmp_path / "spool", Limits(max_bytes=1, min_free_bytes=0))
    m, freed = spool.commit(fresh_chunks[0], factory)
    assert [r.chunk_id for r in freed.evicted] == [m.chunk_id]
    (doc,) = spool._db().execute("SELECT manifest FROM chunks").fetchone()
    assert len(doc) < 200 < len(m.model_dump_json())
    assert spool.get(m.chunk_id) is None and spool.state(m.chunk_id)[0] == EVICTED  # type: ignore[index]


def test_the_manifest_to_announce_is_decided_once_and_kept(
    tmp_path: Path, fresh_chunks: list[ClosedChunk]
) -> None:
    """An XADD whose reply was lost is retried: it must carry the same manifest as the
    first, even if the chunk before was evicted in between (a second, different manifest
    for the chunk would be dead-lettered by the cloud as a replay). Across a restart too."""
    spool = Spool(tmp_path / "spool")
    before, _ = spool.commit(fresh_chunks[0], factory)
    m, _ = spool.commit(fresh_chunks[1], factory)
    spool.mark_uploaded(m.chunk_id)
    first = spool.finalize(m.chunk_id, with_evictions)
    assert first is not None and first.evicted_before == 0
    spool._gone(spool.get(before.chunk_id), EVICTED)  # type: ignore[arg-type]
    span = wall_span(before) + before.gap_before_s  # on the wall clock
    assert spool.evicted_run_before("cam1", m.seq) == (pytest.approx(span, abs=1e-6), 1)
    assert spool.finalize(m.chunk_id, with_evictions) == first  # the retry announces the same
    spool.close()
    assert Spool(tmp_path / "spool").finalize(m.chunk_id, with_evictions) == first
