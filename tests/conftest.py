"""Session-wide real servers: redis-server, SeaweedFS S3, Ray, a GStreamer RTSP server.

Started once per session on free loopback ports; each test gets a flushed Redis
and its own buckets.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from devstack.media import make_clip
from devstack.servers import RedisServer, RtspServer, SeaweedS3, free_port
from edge_agent.segmenter import ClosedChunk
from shared.queue import ensure_group
from tests.support import S3, Edge, Stack, base_env, segment_file

_bucket_ids = itertools.count()


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def redis_server(session_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(session_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def aws_credentials() -> None:
    """SeaweedFS without an identity file accepts any credentials; clients still need some."""
    os.environ.update({k: v for k, v in base_env().items() if k.startswith("AWS_")})


@pytest.fixture(scope="session")
def s3_server(session_dir: Path) -> Iterator[SeaweedS3]:
    server = SeaweedS3(session_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[tuple[str, str]]:
    """(GCS address, dashboard URL): one local Ray with the Job Submission API."""
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    port = free_port()
    context = ray.init(
        address="local",  # always a cluster of its own, never one already running here
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        namespace="cloud_ingest",
        log_to_driver=False,
    )
    yield ray.get_runtime_context().gcs_address, f"http://{context.dashboard_url}"
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_cluster: tuple[str, str]) -> str:
    return ray_cluster[0]


@pytest.fixture(scope="session")
def rtsp_server(session_dir: Path) -> Iterator[RtspServer]:
    server = RtspServer(session_dir, {"cam1": None, "cam2": None})
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def clip(session_dir: Path) -> Path:
    """6 s, 15 fps, 1 s GOP, H.264 with an AAC track: 90 video frames, 6 keyframes."""
    return make_clip(session_dir / "clip.mp4", 6, audio=True)


@pytest.fixture
async def redis_url(redis_server: RedisServer) -> AsyncIterator[str]:
    client = aioredis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    yield redis_server.url


@pytest.fixture
async def s3(s3_server: SeaweedS3) -> AsyncIterator[S3]:
    async with S3(s3_server.endpoint) as helper:
        yield helper


@pytest.fixture
async def stack(redis_url: str, s3: S3, ray_address: str, tmp_path: Path) -> Stack:
    n = next(_bucket_ids)
    raw, out = f"raw-{os.getpid()}-{n}", f"out-{os.getpid()}-{n}"
    for b in (raw, out):
        await s3.client.create_bucket(Bucket=b)
    return Stack(redis_url, s3.endpoint, ray_address, raw, out, tmp_path)


@pytest.fixture(scope="session")
def chunks(clip: Path, session_dir: Path) -> list[ClosedChunk]:
    """The session clip cut into three 2 s chunks, as the agent would cut it."""
    return segment_file(clip, session_dir / "chunks", 2.0)


@pytest.fixture
async def edge(stack: Stack, s3: S3) -> Any:
    client = aioredis.from_url(stack.redis_url)
    await ensure_group(client, "chunks", "ingest")
    yield Edge(stack, s3, client)
    await client.aclose()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault tests' figures, so a CI log shows what was measured."""
    from tests.support import FIGURES

    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture
async def webhook() -> AsyncIterator[tuple[str, list[dict[str, Any]], list[int]]]:
    """A webhook that records each call; ``status[0]`` is what it answers."""
    received: list[dict[str, Any]] = []
    status = [200]

    async def hook(request: web.Request) -> web.Response:
        received.append({"body": await request.read(), "headers": dict(request.headers)})
        return web.json_response({"ok": status[0] < 300}, status=status[0])

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/hook", received, status
    await runner.cleanup()
