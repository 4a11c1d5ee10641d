"""Operating the edge agent: systemd unit, sd_notify on a real socket, health and metrics."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from devstack.servers import RtspServer, free_port
from tests.support import (
    BIN,
    NotifySocket,
    Stack,
    edge_agent,
    eventually,
    metric_appears,
    promtool_problems,
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
