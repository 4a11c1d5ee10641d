"""Operating the edge agent: systemd unit, sd_notify on a real socket, health and metrics."""

from __future__ import annotations

import asyncio
import configparser
import re
import shutil
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devstack.proxy import HttpTap
from devstack.servers import RtspServer, SeaweedS3, free_port
from edge_agent.segmenter import partial_name
from tests.support import (
    BIN,
    NotifySocket,
    Stack,
    edge_agent,
    eventually,
    metric_appears,
    promtool_problems,
    report_figures,
    slow_chunk_in,
)

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "edge-agent.service"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(re.sub(r"^(LoadCredential)=", r"\1_x=", UNIT.read_text(), flags=re.M))
    return parser


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing: make deps installs Debian's systemd package")
    local = tmp_path / "edge-agent.service"
    local.write_text(
        UNIT.read_text().replace("/opt/edge-agent/.venv/bin/edge-agent", str(BIN / "edge-agent"))
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", str(local)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "edge-agent.service" not in result.stderr, result.stderr


def test_systemd_unit_has_the_production_settings() -> None:
    svc = unit()["Service"]
    assert svc["Type"] == "notify"
    assert svc["Restart"] == "always"
    assert svc["RestartPreventExitStatus"] == "78"
    assert int(svc["WatchdogSec"]) > 0
    assert int(svc["TimeoutStopSec"]) > 20  # longer than the default EDGE_DRAIN_TIMEOUT_S
    assert svc["StateDirectory"] == "edge-agent"
    assert svc["EnvironmentFile"].startswith("/etc/edge-agent/")
    assert svc["ProtectSystem"] == "strict"
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["User"] == "edge-agent"
    assert svc["ReadWritePaths"] == "/var/lib/edge-agent"
    assert "signing_key:" in UNIT.read_text()  # LoadCredential for the signing key


async def test_sd_notify_ready_watchdog_and_stopping(
    stack: Stack, rtsp_server: RtspServer, tmp_path: Path
) -> None:
    """A real AF_UNIX datagram socket stands where systemd's would be."""
    notify = NotifySocket(tmp_path / "notify.sock")
    edge = edge_agent(
        stack,
        [{"id": "cam1", "url": rtsp_server.url("cam1")}],
        tmp_path / "e.log",
        NOTIFY_SOCKET=str(notify.path),
        WATCHDOG_USEC="2000000",
    )

    async def received(text: str, times: int = 1) -> bool:
        return notify.count(text) >= times

    try:
        await eventually(lambda: received("READY=1"), 30, "READY=1")
        await eventually(lambda: received("WATCHDOG=1", 2), 30, "two WATCHDOG=1 pings")
        assert edge.terminate() == 0
        await eventually(lambda: received("STOPPING=1"), 5, "STOPPING=1")
    finally:
        edge.kill()
        notify.close()
    messages = notify.texts()
    assert messages.index("READY=1") < messages.index("WATCHDOG=1")


async def test_health_readiness_and_metrics(
    stack: Stack, rtsp_server: RtspServer, tmp_path: Path
) -> None:
    port = free_port()
    edge = edge_agent(
        stack,
        [{"id": "cam1", "url": rtsp_server.url("cam1")}],
        tmp_path / "e.log",
        EDGE_HTTP_BIND=f"127.0.0.1:{port}",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            two = 'edge_agent_chunks_announced_total{camera="cam1"} 2.0'
            await eventually(lambda: metric_appears(http, base, two), 60, "two chunks announced")
            async with http.get(f"{base}/healthz") as resp:
                assert resp.status == 200
            async with http.get(f"{base}/readyz") as resp:
                body = await resp.json()
                assert resp.status == 200, body
                assert body["checks"] == {
                    "s3": True,
                    "redis": True,
                    "cameras": True,
                    "recovered": True,
                    "delivery": True,
                }
            async with http.get(f"{base}/metrics") as resp:
                text = await resp.text()
        assert 'edge_agent_camera_up{camera="cam1"} 1.0' in text
        assert re.search(r'edge_agent_chunks_written_total\{camera="cam1"\} [1-9]', text)
        assert re.search(r"edge_agent_upload_seconds_count [1-9]", text)
        assert "edge_agent_spool_bytes" in text
        assert 'edge_agent_ledger_backlog{state="written"}' in text
        assert re.search(r"edge_agent_event_loop_lag_seconds_count [1-9]", text)
        assert promtool_problems(text) == []  # what Prometheus's own linter says
        assert edge.terminate() == 0
    finally:
        edge.kill()


async def _get(http: aiohttp.ClientSession, url: str, timeout: float = 2.0) -> Any:
    """(status, JSON body), or None when nothing answered in time."""
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return resp.status, await resp.json()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


async def test_readyz_camera_that_never_connected_is_not_healthy(
    stack: Stack, tmp_path: Path
) -> None:
    """The camera's server accepts the connection and never answers (SIGSTOP), so the
    camera never delivers a packet: /readyz says cameras false (503) while S3 and Redis
    are fine, until the server wakes up and packets flow."""
    rtsp = RtspServer(tmp_path, {"cam1": None})
    rtsp.start()
    rtsp.pause()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    edge = edge_agent(
        stack,
        [{"id": "cam1", "url": rtsp.url("cam1")}],
        tmp_path / "e.log",
        EDGE_HTTP_BIND=f"127.0.0.1:{port}",
        EDGE_CAMERA_TIMEOUT_S="60",
    )
    try:
        async with aiohttp.ClientSession() as http:

            async def answered() -> bool:
                got = await _get(http, f"{base}/readyz")
                return got is not None and got[1]["checks"]["s3"] is True

            await eventually(answered, 30, "/readyz after start-up")
            for _ in range(4):  # the camera's open is still waiting on the silent server
                status, body = await _get(http, f"{base}/readyz")
                assert (status, body["checks"]["cameras"]) == (503, False), body
                assert body["checks"]["s3"] and body["checks"]["redis"]
                await asyncio.sleep(0.5)
            rtsp.resume()

            async def camera_up() -> bool:
                got = await _get(http, f"{base}/readyz")
                return got is not None and got[1]["checks"]["cameras"] is True

            await eventually(camera_up, 60, "the camera to deliver packets")
        assert edge.terminate() == 0
    finally:
        edge.kill()
        rtsp.resume()
        rtsp.stop()


async def test_every_upload_carries_content_md5_on_the_wire(
    stack: Stack, s3_server: SeaweedS3, clip: Path, tmp_path: Path
) -> None:
    """Seen through a proxy between the agent and S3: every PUT with a body, the chunks'
    and their signed manifest sidecars', carries a Content-MD5 the server checks."""
    with HttpTap(s3_server.endpoint) as tap:
        edge = edge_agent(
            stack,
            [{"id": "cam1", "url": f"file://{clip}"}],
            tmp_path / "e.log",
            EDGE_S3_ENDPOINT_URL=tap.url,
        )
        try:

            async def announced() -> bool:
                return sum(e.get("outcome") == "announced" for e in edge.events("chunk")) == 3

            await eventually(announced, 60, "3 chunks announced")
            assert edge.terminate() == 0
        finally:
            edge.kill()
        puts = [r for r in tap.snapshot() if r.method == "PUT" and r.body_size]
    sidecars = [r for r in puts if r.path.endswith(".manifest.json")]
    chunks = [r for r in puts if r.path.endswith(".mp4")]
    assert (len(chunks), len(sidecars)) == (3, 3)
    assert [r.target for r in puts if "content-md5" not in r.headers] == []


async def test_recovery_runs_off_the_loop_and_finishes_before_ready(
    stack: Stack, clip: Path, session_dir: Path, tmp_path: Path
) -> None:
    """Twelve torn 720p chunks wait in the spool's tmp/ as a power cut left them; salvage
    decodes every packet of each. Meanwhile /healthz answers at once (the loop is free),
    READY=1 comes only after recovery, and the loop-lag histogram saw no stall. (Salvage
    on the loop used to leave /healthz unanswered for the whole recovery.)"""
    chunk = slow_chunk_in(session_dir)
    tmp_dir = tmp_path / "spool" / "tmp"
    tmp_dir.mkdir(parents=True)
    data = chunk.path.read_bytes()
    for i in range(12):
        wall = chunk.wall_start + timedelta(seconds=30 * i)
        (tmp_dir / partial_name("cam1", wall)).write_bytes(data[:-1000])
    notify = NotifySocket(tmp_path / "notify.sock")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    edge = edge_agent(
        stack,
        [{"id": "cam1", "url": f"file://{clip}"}],
        tmp_path / "e.log",
        EDGE_SPOOL_DIR=str(tmp_path / "spool"),
        EDGE_HTTP_BIND=f"127.0.0.1:{port}",
        NOTIFY_SOCKET=str(notify.path),
    )
    waits: list[float] = []
    try:
        async with aiohttp.ClientSession() as http:
            while notify.count("READY=1") == 0:
                assert edge.running(), edge.text()[-2000:]
                t0 = time.monotonic()
                got = await _get(http, f"{base}/healthz", timeout=5.0)
                if got is not None:
                    waits.append(time.monotonic() - t0)
                await asyncio.sleep(0.1)
            [recovered] = edge.events("spool.recovered")  # logged before READY=1 was sent
            async with http.get(f"{base}/metrics") as resp:
                text = await resp.text()
        assert edge.terminate() == 0
    finally:
        edge.kill()
        notify.close()
    figures = {
        "salvaged": recovered["salvaged"],
        "healthz_answers_before_ready": len(waits),
        "slowest_healthz_s": round(max(waits), 3),
    }
    report_figures("recovery_off_loop", figures)
    assert recovered["salvaged"] == 12
    assert waits and max(waits) < 1.0  # answered at once, however long the salvage took
    lag = {m.group(1): float(m.group(2)) for m in LAG_BUCKET.finditer(text)}
    assert lag["+Inf"] > 0 and lag["+Inf"] - lag["1.0"] == 0  # the loop never stopped for 1 s
    messages = notify.texts()  # systemd's start timeout was extended while recovery ran
    assert messages[0].startswith("EXTEND_TIMEOUT_USEC=") and "READY=1" in messages[1:]


LAG_BUCKET = re.compile(r'edge_agent_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)')


@pytest.mark.parametrize("rules", sorted((ROOT / "configs" / "prometheus").glob("*.rules.yml")))
def test_alert_rules_pass_promtool_check_rules(rules: Path) -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
