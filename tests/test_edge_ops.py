"""Operating the edge agent: systemd unit, sd_notify on a real socket, health and metrics."""

from __future__ import annotations

import asyncio
import configparser
import re
import shutil
import subprocess
import sys
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
    SECRET,
    Daemon,
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


def local_unit(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart= on this checkout's agent (verify wants a real binary)."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing: make deps installs Debian's systemd package")
    local = tmp_path / "edge-agent.service"
    text = UNIT.read_text() if text is None else text
    local.write_text(text.replace("/opt/edge-agent/.venv/bin/edge-agent", str(BIN / "edge-agent")))
    return local


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    local = local_unit(tmp_path)
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


def exposure(unit_file: Path) -> float:
    """``systemd-analyze security --offline=yes``'s overall exposure (0 safest, 10 worst)."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    return float(found.group(1))


def test_systemd_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    """3.2 before the sandbox was tightened (issue 11); the unit now scores 1.2."""
    assert exposure(local_unit(tmp_path)) <= 2.0


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateMounts": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    # AF_NETLINK left out: glibc's getaddrinfo(AI_ADDRCONFIG) falls back without it.
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RemoveIPC": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallErrorNumber": "EPERM",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "UMask": "0077",
}


def test_systemd_unit_sets_the_hardening_directives() -> None:
    svc = unit()["Service"]
    assert {k: svc.get(k) for k in HARDENING} == HARDENING
    filters = re.findall(r"^SystemCallFilter=(.*)$", UNIT.read_text(), flags=re.M)
    assert filters == ["@system-service", "~@privileged @resources"]
    # Cameras and S3 are on the network; ProcSubset=pid would hide /proc/stat, and with
    # it every edge_agent_process_* series (the restart alert's among them).
    for absent in ("PrivateNetwork", "IPAddressDeny", "ProcSubset", "PrivateUsers"):
        assert absent not in svc, absent


def test_systemd_unit_needs_no_specifier_newer_than_its_credentials() -> None:
    """LoadCredential= is systemd 247; %d (the credentials directory) only came in 251,
    and older versions drop a line that uses it, so the path is spelled out."""
    text = UNIT.read_text()
    assert [line for line in text.splitlines() if "%d" in line and line[:1] != "#"] == []
    env = dict(v.split("=", 1) for v in re.findall(r"^Environment=(.*)$", text, flags=re.M))
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == "/run/credentials/%n/aws_credentials"
    assert "LoadCredential=aws_credentials:" in text


SANDBOX = ROOT / "systemd" / "sandbox.py"


def sandboxed(*argv: str) -> list[str]:
    """``argv`` under the unit's seccomp filters (systemd/sandbox.py; PID 1 is no systemd)."""
    return [sys.executable, str(SANDBOX), "--unit", str(UNIT), "--", *argv]


def test_systemd_sandbox_refuses_what_the_unit_forbids(clip: Path) -> None:
    """The filters bite (so the capture test below means something), and PyAV lives with
    them: a threaded decode of the session clip."""
    probe = f"""
import ctypes, errno, mmap, socket, threading
import av
def refused(call):
    try:
        call()
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "allowed"
libc = ctypes.CDLL(None, use_errno=True)
def c(rc):
    return errno.errorcode[ctypes.get_errno()] if rc < 0 else "allowed"
print(refused(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)))
print(refused(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)))
print(c(libc.unshare(0x10000000)), c(libc.setpriority(0, 0, 5)), c(libc.personality(8)))
with av.open({str(clip)!r}) as f:
    f.streams.video[0].thread_type = "AUTO"
    print(sum(1 for _ in f.decode(video=0)), threading.active_count())
"""
    result = subprocess.run(
        sandboxed(sys.executable, "-c", probe),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["EPERM", "EAFNOSUPPORT", "EPERM EPERM EPERM"], result.stdout
    assert lines[3] == "90 1"  # every frame of the 6 s, 15 fps clip


async def test_systemd_sandbox_lets_the_agent_capture_and_deliver(
    stack: Stack, rtsp_server: RtspServer, tmp_path: Path
) -> None:
    """The agent under the unit's system-call filters (MemoryDenyWriteExecute=,
    SystemCallFilter=, RestrictAddressFamilies=, ...) with its secrets where the unit
    puts them: RTSP capture, S3 upload, Redis announce, sd_notify, /metrics."""
    creds = tmp_path / "credentials"  # stands for /run/credentials/edge-agent.service
    creds.mkdir()
    (creds / "signing_key").write_text(SECRET)
    (creds / "aws_credentials").write_text(
        "[default]\naws_access_key_id = test\naws_secret_access_key = test-secret\n"
    )
    env = stack.edge_env([{"id": "cam1", "url": rtsp_server.url("cam1")}])
    for secret in ("EDGE_SIGNING_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        del env[secret]
    unit_env = re.search(r"^Environment=AWS_SHARED_CREDENTIALS_FILE=(.*)$", UNIT.read_text(), re.M)
    assert unit_env
    port = free_port()
    notify = NotifySocket(tmp_path / "notify.sock")
    env |= {
        "CREDENTIALS_DIRECTORY": str(creds),
        "AWS_SHARED_CREDENTIALS_FILE": unit_env[1].replace("/run/credentials/%n", str(creds)),
        "EDGE_HTTP_BIND": f"127.0.0.1:{port}",
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": "2000000",
    }
    edge = Daemon(sandboxed(str(BIN / "edge-agent"), "run"), env, tmp_path / "e.log")
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def announced() -> bool:
                return sum(e.get("outcome") == "announced" for e in edge.events("chunk")) >= 2

            await eventually(announced, 60, "two chunks announced")
            async with http.get(f"{base}/metrics") as resp:
                text = await resp.text()
        assert re.search(r'edge_agent_chunks_announced_total\{camera="cam1"\} [1-9]', text)
        assert notify.count("READY=1") == 1 and notify.count("WATCHDOG=1") >= 1
        assert "edge_agent_process_start_time_seconds" in text  # /proc as ProtectProc= leaves it
        assert edge.terminate() == 0
    finally:
        edge.kill()
        notify.close()
    assert "STOPPING=1" in notify.texts()


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


@pytest.mark.parametrize("rules", sorted((ROOT / "configs" / "monitoring").glob("*.rules.yml")))
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
