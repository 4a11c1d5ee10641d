"""Edge fault tests on real processes and servers. Each prints its figures and asserts
lost = 0, corrupt uploads = 0, and that every gap is flagged."""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import random
import shutil
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest
import redis.asyncio as aioredis

from devstack.s3 import S3
from devstack.servers import RedisServer, RtspServer, SeaweedS3, free_port
from edge_agent.segmenter import partial_name
from edge_agent.spool import Spool
from tests.support import (
    Daemon,
    NotifySocket,
    Stack,
    edge_agent,
    eventually,
    log_events,
    report_figures,
    segment_file,
)


@pytest.fixture
async def own_stack(tmp_path: Path) -> AsyncIterator[tuple[Stack, RedisServer, SeaweedS3]]:
    """Private Redis (AOF, appendfsync always) and SeaweedFS: these tests kill them."""
    redis = RedisServer(tmp_path, aof=True)
    redis.start()
    s3 = SeaweedS3(tmp_path)
    s3.start()
    async with S3(s3.endpoint) as client:
        await client.client.create_bucket(Bucket="raw")
    yield Stack(redis.url, s3.endpoint, "", "raw", "out", tmp_path), redis, s3
    redis.stop()
    s3.kill()


def ledger(stack: Stack) -> list[dict[str, Any]]:
    path = stack.workdir / "spool" / "ledger.sqlite3"
    if not path.exists():  # the agent has not created it yet
        return []
    db = sqlite3.connect(path)
    rows = db.execute("SELECT chunk_id, camera_id, seq, state, manifest FROM chunks").fetchall()
    db.close()
    return [
        {
            "chunk_id": r[0],
            "camera_id": r[1],
            "seq": r[2],
            "state": r[3],
            "manifest": json.loads(r[4]),
        }
        for r in rows
    ]


async def announced_manifests(redis_url: str) -> dict[str, list[dict[str, Any]]]:
    client = aioredis.from_url(redis_url)
    entries = await client.xrange("chunks")
    await client.aclose()
    out: dict[str, list[dict[str, Any]]] = {}
    for _, fields in entries:
        m = json.loads(fields[b"manifest"])
        out.setdefault(m["chunk_id"], []).append(m)
    return out


async def audit(stack: Stack) -> dict[str, Any]:
    """Ledger vs S3 vs stream: what was lost, corrupt or duplicated."""
    rows = ledger(stack)
    announced = [r for r in rows if r["state"] == "announced"]
    stream = await announced_manifests(stack.redis_url)
    async with S3(stack.s3_endpoint) as s3:
        keys = set(await s3.chunk_keys(stack.raw_bucket))
        corrupt = 0
        for r in announced:
            m = r["manifest"]
            data = await s3.get(stack.raw_bucket, m["key"]) if m["key"] in keys else b""
            if hashlib.sha256(data).hexdigest() != m["sha256"] or _frames(data) != m["frame_count"]:
                corrupt += 1
    lost = [r for r in announced if r["chunk_id"] not in stream or r["manifest"]["key"] not in keys]
    lost += [r for r in rows if r["state"] in ("written", "uploaded", "lost")]
    return {
        "chunks": len(rows),
        "announced": len(announced),
        "lost": len(lost),
        "corrupt": corrupt,
        "evicted": sum(r["state"] == "evicted" for r in rows),
        "duplicate_announcements": sum(len(v) - 1 for v in stream.values()),
        "unexpected_objects": len(keys - {r["manifest"]["key"] for r in announced}),
        "stream": stream,
    }


def _frames(data: bytes) -> int:
    try:
        with av.open(io.BytesIO(data)) as f:
            return sum(1 for p in f.demux(video=0) if p.size)
    except av.FFmpegError:
        return -1


def timelines(stream: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    per_camera: dict[str, list[dict[str, Any]]] = {}
    for copies in stream.values():
        per_camera.setdefault(copies[0]["camera_id"], []).append(copies[-1])
    return {c: sorted(ms, key=lambda m: m["seq"]) for c, ms in per_camera.items()}


def unflagged_gaps(chunks: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """Consecutive chunks where media time jumps but no discontinuity was declared."""
    bad = []
    for prev, cur in itertools.pairwise(chunks):
        jump = cur["media_start_s"] - (prev["media_start_s"] + prev["media_duration_s"])
        if not cur["discontinuity"] and abs(jump) > 0.5:
            bad.append((cur["seq"], jump))
    return bad


def report(name: str, figures: dict[str, Any]) -> None:
    report_figures(name, {k: v for k, v in figures.items() if k != "stream"})


def announced_count(edge: Daemon) -> int:
    return sum(e.get("outcome") == "announced" for e in edge.events("chunk"))


async def _announced(edge: Daemon, n: int) -> bool:
    if edge.proc.poll() is not None:
        raise AssertionError(f"edge-agent exited:\n{edge.text()[-2000:]}")
    return announced_count(edge) >= n


async def test_fault_kill9_agent_ten_times_loses_nothing(
    own_stack: tuple[Stack, RedisServer, SeaweedS3], rtsp_server: RtspServer
) -> None:
    stack, _, _ = own_stack
    cams = [{"id": m, "url": rtsp_server.url(m)} for m in ("cam1", "cam2")]
    rng = random.Random(7)
    kills: list[float] = []
    for i in range(10):
        edge = edge_agent(stack, cams, stack.workdir / f"edge-{i}.log", EDGE_SEGMENT_SECONDS="1")
        try:
            await eventually(lambda: _announced(edge, 1), 60, "a chunk")  # noqa: B023
            await asyncio.sleep(rng.uniform(0.0, 2.0))  # a random moment: mid-chunk, mid-upload...
        finally:
            kills.append(time.time())
            edge.kill()
    edge = edge_agent(stack, cams, stack.workdir / "edge-final.log", EDGE_SEGMENT_SECONDS="1")
    try:
        await eventually(lambda: _announced(edge, 2), 60, "the final run to announce")
        assert edge.terminate() == 0
    finally:
        edge.kill()
    figures = await audit(stack)
    lines = timelines(figures["stream"])
    flagged = sum(m["discontinuity"] for ms in lines.values() for m in ms)
    recovered = [
        e for p in stack.workdir.glob("edge-*.log") for e in log_events(p, "spool.recovered")
    ]
    figures.update(
        kills=len(kills),
        flagged_gaps=flagged,
        **{
            f"partials_{k}": sum(e.get(k, 0) for e in recovered)
            for k in ("salvaged", "quarantined", "renamed")
        },
    )
    report("kill9", figures)
    assert figures["lost"] == 0 and figures["corrupt"] == 0
    assert figures["unexpected_objects"] == 0
    for camera, chunks in lines.items():
        assert [m["seq"] for m in chunks] == list(range(len(chunks))), camera
        assert unflagged_gaps(chunks) == [], camera
        # Flags only around kills: each flagged chunk starts after a kill that came after
        # the previous chunk ended.
        for prev, cur in itertools.pairwise(chunks):
            if cur["discontinuity"]:
                end = _ts(prev["end_time"])
                assert any(end - 1.0 <= k <= _ts(cur["start_time"]) + 1.0 for k in kills), cur[
                    "seq"
                ]
    assert flagged <= 2 * (len(kills) + 1) * 2  # at most a salvaged chunk and a reconnect per kill


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def test_fault_s3_outage_60s_is_backfilled_without_discontinuity(
    own_stack: tuple[Stack, RedisServer, SeaweedS3], rtsp_server: RtspServer
) -> None:
    stack, _, s3 = own_stack
    cams = [{"id": "cam1", "url": rtsp_server.url("cam1")}]
    edge = edge_agent(stack, cams, stack.workdir / "edge.log", EDGE_SEGMENT_SECONDS="2")
    try:
        await eventually(lambda: _announced(edge, 2), 60, "chunks before the outage")
        s3.kill()
        down_at = time.monotonic()
        before = announced_count(edge)
        await asyncio.sleep(60)
        written_during = sum(r["state"] == "written" for r in ledger(stack))
        s3.start()
        outage = time.monotonic() - down_at

        t0 = time.monotonic()
        await eventually(lambda: _drained(stack), 90, "the backlog to drain")
        backfill_s = time.monotonic() - t0
        assert edge.proc.poll() is None, "the agent died during the outage"
        assert edge.terminate() == 0
    finally:
        edge.kill()
    figures = await audit(stack)
    [chunks] = timelines(figures["stream"]).values()
    figures.update(
        outage_s=round(outage, 1),
        announced_before_outage=before,
        spooled_during_outage=written_during,
        backfill_s=round(backfill_s, 1),
        upload_retries=len(edge.events("chunk.retry")),
        discontinuities=sum(m["discontinuity"] for m in chunks),
    )
    report("s3_outage", figures)
    assert figures["lost"] == 0 and figures["corrupt"] == 0
    assert written_during >= 20  # capture went on while S3 was down
    assert figures["discontinuities"] == 0
    assert unflagged_gaps(chunks) == []
    assert [m["seq"] for m in chunks] == list(range(len(chunks)))


async def test_fault_redis_restart_loses_no_manifest(
    own_stack: tuple[Stack, RedisServer, SeaweedS3], rtsp_server: RtspServer
) -> None:
    stack, redis, _ = own_stack
    cams = [{"id": "cam1", "url": rtsp_server.url("cam1")}]
    port = free_port()
    edge = edge_agent(
        stack,
        cams,
        stack.workdir / "edge.log",
        EDGE_SEGMENT_SECONDS="1",
        EDGE_HTTP_BIND=f"127.0.0.1:{port}",
    )
    try:
        await eventually(lambda: _announced(edge, 2), 60, "chunks before the restart")
        redis.kill()
        await asyncio.sleep(6)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/readyz") as resp,
        ):
            assert resp.status == 503
            assert (await resp.json())["checks"]["redis"] is False
        waiting = sum(r["state"] == "uploaded" for r in ledger(stack))
        redis.start()
        n = announced_count(edge)
        await eventually(lambda: _announced(edge, n + 3), 60, "announcements after the restart")
        assert edge.terminate() == 0
    finally:
        edge.kill()
    figures = await audit(stack)
    [chunks] = timelines(figures["stream"]).values()
    figures.update(
        uploaded_waiting_for_redis=waiting,
        announce_retries=sum(e.get("stage") == "announce" for e in edge.events("chunk.retry")),
    )
    report("redis_restart", figures)
    assert figures["lost"] == 0 and figures["corrupt"] == 0
    assert waiting >= 3  # uploads went on; manifests waited in the ledger
    assert [m["seq"] for m in chunks] == list(range(len(chunks)))
    assert unflagged_gaps(chunks) == []


async def test_fault_spool_limit_during_s3_outage_evicts_by_policy(
    own_stack: tuple[Stack, RedisServer, SeaweedS3], rtsp_server: RtspServer
) -> None:
    stack, _, s3 = own_stack
    cams = [{"id": "cam1", "url": rtsp_server.url("cam1")}]
    edge = edge_agent(
        stack,
        cams,
        stack.workdir / "edge.log",
        EDGE_SEGMENT_SECONDS="1",
        EDGE_SPOOL_MAX_BYTES="60000",
        EDGE_SPOOL_EVICTION="oldest",
    )
    try:
        await eventually(lambda: _announced(edge, 2), 60, "chunks before the outage")
        s3.kill()
        await asyncio.sleep(15)
        s3.start()

        await eventually(lambda: _drained(stack), 90, "the backlog to drain")
        n = announced_count(edge)
        await eventually(lambda: _announced(edge, n + 2), 30, "capture to go on")
        assert edge.terminate() == 0
    finally:
        edge.kill()
    figures = await audit(stack)
    [chunks] = timelines(figures["stream"]).values()
    evicted_logged = [e for e in edge.events("chunk") if e.get("outcome") == "evicted"]
    rows = {r["seq"]: r for r in ledger(stack)}
    figures.update(
        evicted_logged=len(evicted_logged), flagged=sum(m["evicted_before"] > 0 for m in chunks)
    )
    report("spool_limit", figures)
    assert figures["lost"] == 0 and figures["corrupt"] == 0
    assert figures["evicted"] >= 5 and figures["evicted"] == len(evicted_logged)
    evicted_seqs = sorted(s for s, r in rows.items() if r["state"] == "evicted")
    # Oldest first: whatever was evicted is older than whatever survived the outage unsent.
    # Every evicted run is declared by the next announced chunk, with the right count.
    for m in chunks:
        run = 0
        while m["seq"] - run - 1 in rows and rows[m["seq"] - run - 1]["state"] == "evicted":
            run += 1
        assert m["evicted_before"] == run, m["seq"]
        if run:
            assert m["discontinuity"] and m["gap_before_s"] > 0
    assert sum(m["evicted_before"] for m in chunks) == len(evicted_seqs)


async def test_fault_rtsp_restart_and_stall_reconnect_within_backoff(
    own_stack: tuple[Stack, RedisServer, SeaweedS3], tmp_path: Path
) -> None:
    stack, _, _ = own_stack
    rtsp = RtspServer(tmp_path, {"cam1": None})
    rtsp.start()
    edge = edge_agent(
        stack,
        [{"id": "cam1", "url": rtsp.url("cam1")}],
        stack.workdir / "edge.log",
        EDGE_SEGMENT_SECONDS="1",
        EDGE_WATCHDOG_S="2",
        EDGE_RECONNECT_MAX_S="2",
        EDGE_CAMERA_TIMEOUT_S="3",
    )
    try:
        await eventually(lambda: _announced(edge, 2), 60, "chunks before the stall")
        rtsp.pause()  # stops sending, keeps the TCP connection open
        paused_at = time.monotonic()
        await eventually(lambda: _has(edge, "camera.stalled"), 20, "the watchdog")
        detect_s = time.monotonic() - paused_at
        rtsp.resume()
        resumed_at = time.monotonic()
        connected = len(edge.events("camera.connected"))
        await eventually(lambda: _more(edge, "camera.connected", connected), 30, "reconnect")
        stall_reconnect_s = time.monotonic() - resumed_at
        rtsp.kill()
        killed_at = time.monotonic()
        await asyncio.sleep(3)
        rtsp.start()
        restarted_at = time.monotonic()
        connected = len(edge.events("camera.connected"))
        await eventually(lambda: _more(edge, "camera.connected", connected), 30, "reconnect")
        restart_reconnect_s = time.monotonic() - restarted_at
        n = announced_count(edge)
        await eventually(lambda: _announced(edge, n + 2), 30, "chunks after the restart")
        assert edge.terminate() == 0
    finally:
        edge.kill()
        rtsp.stop()
    figures = await audit(stack)
    [chunks] = timelines(figures["stream"]).values()
    figures.update(
        watchdog_detect_s=round(detect_s, 2),
        stall_reconnect_s=round(stall_reconnect_s, 2),
        restart_reconnect_s=round(restart_reconnect_s, 2),
        server_down_s=round(restarted_at - killed_at, 2),
        flagged=sum(m["discontinuity"] for m in chunks),
    )
    report("rtsp_restart_stall", figures)
    assert figures["lost"] == 0 and figures["corrupt"] == 0
    assert detect_s <= 2 * 2 + 2  # within twice the watchdog period, plus scheduling slack
    bound = 2 + 3 + 2  # back-off cap + open timeout + slack
    assert stall_reconnect_s <= bound and restart_reconnect_s <= bound
    assert figures["flagged"] >= 2  # both interruptions are recorded as gaps
    assert unflagged_gaps(chunks) == []


async def _drained(stack: Stack) -> bool:
    """Nothing left in the ledger waiting for upload or announcement."""
    return not any(r["state"] in ("written", "uploaded") for r in ledger(stack))


async def _has(d: Daemon, event: str) -> bool:
    return bool(d.events(event))


async def _more(d: Daemon, event: str, than: int) -> bool:
    return len(d.events(event)) > than


# Another process holding the ledger's write lock, as a backup tool or an sqlite3 shell
# left inside a transaction would; it lets go when its stdin closes.
HOLD_LEDGER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
db.execute("ROLLBACK")
"""


async def test_fault_ledger_locked_past_busy_timeout_while_s3_returns(
    own_stack: tuple[Stack, RedisServer, SeaweedS3], rtsp_server: RtspServer
) -> None:
    """1. The agent runs (1 s chunks; a ledger write gives up after 1 s; wedged after 5 s
    without progress; systemd watchdog of 2 s; one upload worker, so once it waits on the
    ledger nothing else can move). 2. S3 dies; chunks spool. 3. Another
    process takes the ledger's write lock and holds it. 4. S3 comes back: uploads finish,
    and every ledger write behind them fails with "database is locked", again and again.
    5. With S3 and Redis answering and nothing moving, the agent says it is wedged:
    /readyz reports delivery false and WATCHDOG=1 stops. 6. The lock goes: delivery
    resumes, the watchdog comes back, every chunk is delivered; the agent never exited and
    SIGTERM drains it with nothing left written or uploaded."""
    stack, _, s3 = own_stack
    port = free_port()
    notify = NotifySocket(stack.workdir / "notify.sock")
    edge = edge_agent(
        stack,
        [{"id": "cam1", "url": rtsp_server.url("cam1")}],
        stack.workdir / "edge.log",
        EDGE_SEGMENT_SECONDS="1",
        EDGE_HTTP_BIND=f"127.0.0.1:{port}",
        EDGE_LEDGER_BUSY_TIMEOUT_S="1",
        EDGE_DELIVERY_STALL_S="5",
        EDGE_UPLOAD_CONCURRENCY="1",
        NOTIFY_SOCKET=str(notify.path),
        WATCHDOG_USEC="2000000",
    )
    holder = None
    try:
        await eventually(lambda: _announced(edge, 2), 60, "chunks before the outage")
        s3.kill()
        await eventually(lambda: _written_at_least(stack, 3), 30, "chunks spooled")
        holder = await hold_ledger(stack)
        locked_at = time.monotonic()
        s3.start()
        up_at = time.monotonic()
        await eventually(lambda: _ready(port, "delivery", False), 60, "the agent to say wedged")
        wedged_after_s = time.monotonic() - locked_at
        await asyncio.sleep(0.5)  # a ping decided just before may still be in flight
        quiet_from = time.monotonic()
        await asyncio.sleep(3)
        pings_while_wedged = notify.count("WATCHDOG=1", since=quiet_from)
        await release(holder)
        held_s = time.monotonic() - locked_at
        released_at = time.monotonic()
        await eventually(lambda: _drained(stack), 90, "the backlog to drain")
        drain_s = time.monotonic() - released_at
        await eventually(
            lambda: _async(notify.count("WATCHDOG=1", since=released_at) >= 2),
            30,
            "the watchdog to come back",
        )
        assert await _ready(port, "delivery", True)
        assert edge.running(), "the agent exited"
        retries = await _metric_sum(port, "edge_agent_ledger_retries_total")
        crashes = await _metric_sum(port, "edge_agent_task_crashes_total")
        assert edge.terminate() == 0
    finally:
        await release(holder)
        edge.kill()
        notify.close()
    figures = await audit(stack)
    figures.update(
        lock_held_s=round(held_s, 1),
        wedged_after_lock_s=round(wedged_after_s, 1),
        s3_back_after_lock_s=round(up_at - locked_at, 1),
        watchdog_pings_while_wedged=pings_while_wedged,
        ledger_retries=retries,
        task_crashes=crashes,
        drained_after_release_s=round(drain_s, 1),
    )
    report("ledger_locked", figures)
    assert figures["lost"] == 0 and figures["corrupt"] == 0
    assert pings_while_wedged == 0
    assert retries > 0
    rows = ledger(stack)
    assert not [r for r in rows if r["state"] in ("written", "uploaded")]
    [chunks] = timelines(figures["stream"]).values()
    assert [m["seq"] for m in chunks] == list(range(len(chunks)))
    assert unflagged_gaps(chunks) == []


async def hold_ledger(stack: Stack) -> asyncio.subprocess.Process:
    """Another process holding the ledger's write lock until its stdin closes."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLD_LEDGER,
        str(stack.workdir / "spool" / "ledger.sqlite3"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdout is not None
    assert (await holder.stdout.readline()).strip() == b"locked"
    return holder


async def release(holder: asyncio.subprocess.Process | None) -> None:
    if holder is None or holder.returncode is not None:
        return
    assert holder.stdin is not None
    holder.stdin.close()
    try:
        await asyncio.wait_for(holder.wait(), 10)
    except TimeoutError:
        holder.kill()


async def _async(value: bool) -> bool:
    return value


async def _written_at_least(stack: Stack, n: int) -> bool:
    return sum(r["state"] == "written" for r in ledger(stack)) >= n


async def _ready(port: int, check: str, want: bool) -> bool:
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/readyz") as resp,
        ):
            body = await resp.json()
    except (aiohttp.ClientError, OSError):
        return False
    return bool(body["checks"].get(check) is want and (resp.status == 200) is body["ready"])


async def _metric_sum(port: int, name: str) -> float:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def test_fault_chunk_files_gone_are_counted_lost_after_a_restart(
    stack: Stack, clip: Path
) -> None:
    """S3 unreachable: a replay's 3 chunks stay in the spool. The agent stops; one chunk's
    file disappears (a disk fault, an operator). The next start marks it lost, logs it,
    counts it in edge_agent_chunks_lost_total, and declares the gap in the next manifest."""
    cams = [{"id": "cam1", "url": f"file://{clip}"}]
    edge = _without_s3(stack, cams, stack.workdir / "e1.log", drain_s=1)
    try:
        await eventually(lambda: _written_at_least(stack, 3), 60, "3 chunks spooled")
        assert edge.terminate() == 0
    finally:
        edge.kill()
    victim = min((r for r in ledger(stack) if r["state"] == "written"), key=lambda r: r["seq"])
    [path] = (stack.workdir / "spool" / "cam1").glob(f"*-{victim['chunk_id']}.mp4")
    path.unlink()
    port = free_port()
    edge = edge_agent(stack, cams, stack.workdir / "e2.log", EDGE_HTTP_BIND=f"127.0.0.1:{port}")
    try:
        await eventually(lambda: _drained(stack), 60, "the rest delivered")
        lost = await _metric_sum(port, 'edge_agent_chunks_lost_total{camera="cam1"}')
        assert edge.terminate() == 0
    finally:
        edge.kill()
    [line] = [e for e in edge.events("chunk") if e.get("outcome") == "lost"]
    figures = await audit(stack)
    report("lost_counted", {**figures, "lost_metric": lost})
    assert lost == 1 and line["chunk_id"] == victim["chunk_id"]
    assert {r["chunk_id"]: r["state"] for r in ledger(stack)}[victim["chunk_id"]] == "lost"
    after = next(m for m in timelines(figures["stream"])["cam1"] if m["seq"] == victim["seq"] + 1)
    assert after["discontinuity"] and after["evicted_before"] == 1


async def test_fault_second_sigterm_skips_the_drain_and_loses_nothing(
    stack: Stack, clip: Path
) -> None:
    """1. S3 is unreachable, so chunks wait in the spool. 2. SIGTERM: the agent drains and
    would wait up to EDGE_DRAIN_TIMEOUT_S (60 s) for uploads that cannot happen; another
    process holds the ledger too, so every write of the drain waits on its lock. 3. A
    second SIGTERM skips the waits: the agent exits at once (as uvicorn does on a second
    Ctrl-C). 4. The next start, with S3 back, delivers every chunk: nothing was lost."""
    cams = [{"id": "cam1", "url": f"file://{clip}?loop=1"}]
    edge = _without_s3(stack, cams, stack.workdir / "e1.log", drain_s=60)
    holder = None
    try:
        await eventually(lambda: _written_at_least(stack, 2), 60, "chunks spooled")
        holder = await hold_ledger(stack)
        edge.proc.send_signal(signal.SIGTERM)
        await eventually(lambda: _has(edge, "agent.draining"), 10, "the drain to start")
        second_at = time.monotonic()
        edge.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(edge.proc.wait, 15)
        exit_s = time.monotonic() - second_at
    finally:
        await release(holder)
        edge.kill()
    assert code == 0
    assert _has_now(edge, "agent.force_stop")
    waiting = sum(r["state"] == "written" for r in ledger(stack))
    edge = edge_agent(stack, [{"id": "cam1", "url": f"file://{clip}"}], stack.workdir / "e2.log")
    try:
        await eventually(lambda: _drained(stack), 60, "the spool delivered after the restart")
        assert edge.terminate() == 0
    finally:
        edge.kill()
    figures = await audit(stack)
    report("second_sigterm", {**figures, "exit_after_second_signal_s": round(exit_s, 2)})
    assert exit_s < 10  # not the 60 s drain
    assert waiting >= 2 and figures["lost"] == 0 and figures["corrupt"] == 0


def _without_s3(stack: Stack, cams: list[dict[str, str]], log: Path, drain_s: float) -> Daemon:
    """An agent whose S3 endpoint nothing listens on: its chunks stay in the spool."""
    return edge_agent(
        stack,
        cams,
        log,
        EDGE_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
        EDGE_DRAIN_TIMEOUT_S=str(drain_s),
    )


def _has_now(d: Daemon, event: str) -> bool:
    return bool(d.events(event))


async def test_fault_chunk_file_vanishing_while_queued_is_lost_not_retried_forever(
    stack: Stack, clip: Path
) -> None:
    """A queued chunk's file disappears while the agent runs (a disk fault, an operator):
    the delivery worker marks it lost (logged, counted, a declared gap) instead of retrying
    the upload for ever with the worker pinned to it."""
    port = free_port()
    edge = edge_agent(
        stack,
        [{"id": "cam1", "url": f"file://{clip}"}],
        stack.workdir / "e.log",
        EDGE_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
        EDGE_HTTP_BIND=f"127.0.0.1:{port}",
    )
    try:
        await eventually(lambda: _written_at_least(stack, 2), 60, "chunks spooled")
        victim = min((r for r in ledger(stack) if r["state"] == "written"), key=lambda r: r["seq"])
        [path] = (stack.workdir / "spool" / "cam1").glob(f"*-{victim['chunk_id']}.mp4")
        path.unlink()

        async def declared_lost() -> bool:
            return any(e.get("outcome") == "lost" for e in edge.events("chunk"))

        await eventually(declared_lost, 60, "the chunk declared lost")
        lost = await _metric_sum(port, 'edge_agent_chunks_lost_total{camera="cam1"}')
        assert edge.terminate() == 0
    finally:
        edge.kill()
    states = {r["chunk_id"]: r["state"] for r in ledger(stack)}
    report_figures(
        "vanished_while_queued", {"lost_metric": lost, "state": states[victim["chunk_id"]]}
    )
    assert lost == 1 and states[victim["chunk_id"]] == "lost"


async def test_fault_ledger_held_at_start_capture_goes_on_and_sigterm_still_stops(
    own_stack: tuple[Stack, RedisServer, SeaweedS3], rtsp_server: RtspServer, clip: Path
) -> None:
    """1. A crash left a partial chunk in tmp/, and another process holds the ledger when
    the agent starts (say, a backup that outlived the last run). 2. Recovery waits for the
    lock, but capture does not: new chunks land in tmp/ meanwhile, and /readyz says not
    recovered. 3. SIGTERM during recovery stops the agent promptly. 4. With the lock gone,
    the next start salvages everything tmp/ holds and delivers it."""
    stack, _, _ = own_stack
    spool_dir = stack.workdir / "spool"
    Spool(spool_dir).close()
    [whole] = segment_file(clip, stack.workdir / "src", 6.0)
    torn = spool_dir / "tmp" / partial_name("cam1", whole.wall_start)
    torn.write_bytes(whole.path.read_bytes()[:-500])
    holder = await hold_ledger(stack)
    port = free_port()
    cams = [{"id": "cam1", "url": rtsp_server.url("cam1")}]
    edge = edge_agent(
        stack,
        cams,
        stack.workdir / "e1.log",
        EDGE_SEGMENT_SECONDS="1",
        EDGE_LEDGER_BUSY_TIMEOUT_S="1",
        EDGE_HTTP_BIND=f"127.0.0.1:{port}",
    )
    try:

        async def captured_meanwhile() -> bool:
            assert edge.running(), edge.text()[-2000:]
            return len(list((spool_dir / "tmp").glob("*.partial"))) >= 3

        await eventually(captured_meanwhile, 60, "capture into tmp/ during recovery")
        assert await _ready(port, "recovered", False)
        assert not edge.events("spool.recovered")
        stop_at = time.monotonic()
        code = await asyncio.to_thread(edge.terminate, 30)
        stop_s = time.monotonic() - stop_at
    finally:
        await release(holder)
        edge.kill()
    assert code == 0 and edge.events("agent.stopped_during_recovery")
    waiting = len(list((spool_dir / "tmp").glob("*.partial")))
    edge = edge_agent(stack, cams, stack.workdir / "e2.log", EDGE_SEGMENT_SECONDS="1")
    try:
        await eventually(lambda: _announced(edge, waiting), 60, "the salvaged chunks announced")
        assert edge.terminate() == 0
    finally:
        edge.kill()
    [found] = edge.events("spool.recovered")
    figures = await audit(stack)
    report(
        "ledger_held_at_start",
        {
            **figures,
            "partials_waiting": waiting,
            "salvaged": found["salvaged"],
            "stop_s": round(stop_s, 2),
        },
    )
    # Every partial that waited (the torn one, the run's chunks) was salvaged or quarantined.
    assert found["salvaged"] + found["quarantined"] == waiting
    assert found["salvaged"] >= waiting - 1
    assert stop_s < 15
    assert figures["lost"] == 0 and figures["corrupt"] == 0


async def test_fault_no_disk_space_capture_refuses_new_chunks_and_says_so(
    stack: Stack, clip: Path
) -> None:
    """Free disk under half of EDGE_SPOOL_MIN_FREE_BYTES (here: the margin asks for more
    than the disk holds): capture opens no new chunk file, so a ledger that cannot evict
    does not let tmp/ fill the disk; each refused GOP is counted, the first logged."""
    impossible = shutil.disk_usage(stack.workdir).total * 4
    port = free_port()
    edge = edge_agent(
        stack,
        [{"id": "cam1", "url": f"file://{clip}"}],
        stack.workdir / "e.log",
        EDGE_SPOOL_MIN_FREE_BYTES=str(impossible),
        EDGE_HTTP_BIND=f"127.0.0.1:{port}",
    )
    try:
        await eventually(lambda: _has(edge, "camera.finished"), 60, "the replay to end")
        refused = await _metric_sum(port, 'edge_agent_capture_refused_total{camera="cam1"}')
        assert edge.terminate() == 0
    finally:
        edge.kill()
    report_figures("no_disk_space", {"refused_gops": refused})
    assert refused == 6  # every GOP of the 6 s clip
    assert len(edge.events("camera.no_disk_space")) == 1
    assert list((stack.workdir / "spool" / "tmp").iterdir()) == []
    assert ledger(stack) == []
