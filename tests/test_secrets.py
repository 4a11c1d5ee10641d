"""Secrets never leak: both daemons run with known secrets (signing key, keyring, Redis and
camera passwords, AWS secret, HTTP tokens, webhook secret) on real servers, through
errors, and everything they print or serve is searched for them."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from devstack.servers import RedisServer, free_port
from tests.support import (
    BIN,
    S3,
    SECRET,
    Stack,
    base_env,
    cloud_ingest,
    edge_agent,
    eventually,
    queue_state,
)

REDIS_PASSWORD = "redis-pass-7f3a9c"
CAMERA_PASSWORD = "camera-pass-51be20"
AWS_SECRET = base_env()["AWS_SECRET_ACCESS_KEY"]  # what the test SeaweedFS accepts
EDGE_TOKEN = "edge-metrics-token-2c7d"
INGEST_TOKEN = "ingest-metrics-token-88a1"
WEBHOOK_SECRET = "webhook-secret-6e0f3b"
SECRETS = [
    SECRET,
    REDIS_PASSWORD,
    CAMERA_PASSWORD,
    AWS_SECRET,
    EDGE_TOKEN,
    INGEST_TOKEN,
    WEBHOOK_SECRET,
]


async def test_secrets_never_appear_in_logs_output_metrics_or_errors(
    stack: Stack, s3: S3, clip: Path, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        async with aioredis.from_url(server.url) as admin:
            await admin.config_set("requirepass", REDIS_PASSWORD)
        redis_url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{server.port}/0"
        printed = await _run_both(stack, s3, clip, tmp_path, redis_url)
    finally:
        server.stop()
    leaks = {s: name for name, text in printed.items() for s in SECRETS if s in text}
    assert not leaks, f"secrets printed: {leaks}"
    # The bad camera's URL was logged (its failure is reported) with the password masked.
    assert "admin:*****@127.0.0.1" in printed["edge log"]
    assert "admin:*****@127.0.0.1" in printed["check-config stderr"]


async def _run_both(
    stack: Stack, s3: S3, clip: Path, tmp_path: Path, redis_url: str
) -> dict[str, str]:
    edge_port, cloud_port = free_port(), free_port()
    cameras = [
        {"id": "cam1", "url": f"file://{clip}"},
        {"id": "cam2", "url": f"rtsp://admin:{CAMERA_PASSWORD}@127.0.0.1:1/stream"},
    ]
    secrets_env = {"AWS_SECRET_ACCESS_KEY": AWS_SECRET}
    edge_env = {
        **secrets_env,
        "EDGE_REDIS_URL": redis_url,
        "EDGE_HTTP_BIND": f"127.0.0.1:{edge_port}",
        "EDGE_HTTP_TOKEN": EDGE_TOKEN,
        "EDGE_LOG_LEVEL": "DEBUG",
        "EDGE_SEGMENT_SECONDS": "1",
        "EDGE_CAMERA_TIMEOUT_S": "1",
    }
    printed: dict[str, str] = {}
    check = await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "edge-agent"), "check-config"],
        env={**base_env(), **stack.edge_env(cameras, **edge_env)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 78  # the bad camera is reported
    printed["check-config stdout"], printed["check-config stderr"] = check.stdout, check.stderr
    edge = edge_agent(stack, cameras, tmp_path / "edge.log", **edge_env)
    cloud = cloud_ingest(
        stack,
        tmp_path / "cloud.log",
        **secrets_env,
        INGEST_REDIS_URL=redis_url,
        INGEST_HTTP_BIND=f"127.0.0.1:{cloud_port}",
        INGEST_HTTP_TOKEN=INGEST_TOKEN,
        INGEST_WEBHOOK_SECRET=WEBHOOK_SECRET,
        INGEST_LOG_LEVEL="DEBUG",
    )
    try:

        async def processed() -> bool:
            return len(await s3.records(stack.out_bucket)) >= 3

        try:
            await eventually(processed, 120, "three chunks processed with passwords everywhere")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{edge.text()[-3000:]}\n{cloud.text()[-3000:]}") from None
        async with aiohttp.ClientSession() as http:
            for name, port, token in (
                ("edge", edge_port, EDGE_TOKEN),
                ("cloud", cloud_port, INGEST_TOKEN),
            ):
                base = f"http://127.0.0.1:{port}"
                for path in ("/metrics", "/readyz"):
                    async with http.get(base + path) as resp:
                        assert resp.status == 401, (name, path)
                    auth = {"Authorization": f"Bearer {token}"}
                    async with http.get(base + path, headers=auth) as resp:
                        assert resp.status in (200, 503), (name, path)
                        printed[f"{name} {path}"] = await resp.text()
                async with http.get(base + "/healthz") as resp:
                    assert resp.status == 200  # liveness probes need no token
        assert edge.terminate() == 0
        assert cloud.terminate() == 0
    finally:
        edge.kill()
        cloud.kill()
    printed["edge log"], printed["cloud log"] = edge.text(), cloud.text()
    assert "cloud_ingest_chunks" in printed["cloud /metrics"]
    st = await queue_state(redis_url)
    assert st["dlq"] == 0, st
    printed["status"] = json.dumps(st)
    return printed


async def test_secrets_redis_password_from_a_file_authenticates_both_daemons(
    stack: Stack, s3: S3, clip: Path, tmp_path: Path
) -> None:
    """A Redis user named in the URL without a password (as the example env files do),
    its password in ``*_REDIS_PASSWORD_FILE``: `edge-agent check-config` probes Redis,
    S3 and the camera and passes, `cloud-ingest status` reads the queue. Without the file
    both are refused (the password is what authenticates them), and it is never printed."""
    password = "file-only-redis-pass-3d9a"
    server = RedisServer(tmp_path, password="admin-pass-0c4e51")
    server.start()
    try:
        async with aioredis.from_url(server.url, password="admin-pass-0c4e51") as admin:
            await admin.acl_setuser(
                "svc", enabled=True, passwords=[f"+{password}"], keys=["*"], commands=["+@all"]
            )
        (tmp_path / "redis.pass").write_text(password + "\n")
        url = f"redis://svc@127.0.0.1:{server.port}/0"
        cams = [{"id": "cam1", "url": f"file://{clip}"}]
        edge_env = {**stack.edge_env(cams), "EDGE_REDIS_URL": url}
        cloud_env = {**stack.ingest_env(), "INGEST_REDIS_URL": url}
        edge_cmd = [str(BIN / "edge-agent"), "check-config"]
        cloud_cmd = [str(BIN / "cloud-ingest"), "status", "--json"]
        with_file = [
            await _run(
                edge_cmd, {**edge_env, "EDGE_REDIS_PASSWORD_FILE": str(tmp_path / "redis.pass")}
            ),
            await _run(
                cloud_cmd, {**cloud_env, "INGEST_REDIS_PASSWORD_FILE": str(tmp_path / "redis.pass")}
            ),
        ]
        without = [await _run(edge_cmd, edge_env), await _run(cloud_cmd, cloud_env)]
    finally:
        server.stop()
    for result in with_file:
        assert result.returncode == 0, result.stderr
        assert password not in result.stdout + result.stderr
    assert json.loads(with_file[1].stdout)["length"] == 0
    assert (
        without[0].returncode == 78 and "EDGE_REDIS_URL: Redis not reachable" in without[0].stderr
    )
    assert without[1].returncode != 0


async def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, argv, env=env, capture_output=True, text=True, timeout=60, check=False
    )


async def test_secrets_s3_keys_from_aws_shared_credentials_file(
    redis_url: str, clip: Path, tmp_path: Path
) -> None:
    """S3 keys need no variable of ours: the AWS chain reads AWS_SHARED_CREDENTIALS_FILE
    (a file systemd or Kubernetes mounts). Against a SeaweedFS that enforces identities,
    `edge-agent check-config` reaches the bucket with the keys from that file alone, and
    is refused with a file holding a wrong secret."""
    from devstack.servers import SeaweedS3

    key_id, secret = "FILEKEYID0001", "file-secret-access-key-77d1"
    identities = {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": key_id, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List"],
            }
        ]
    }
    (tmp_path / "s3.json").write_text(json.dumps(identities))
    server = SeaweedS3(tmp_path, s3_config=tmp_path / "s3.json")
    server.start()
    try:
        env = {k: v for k, v in base_env().items() if not k.startswith("AWS_")}
        env["AWS_DEFAULT_REGION"] = "us-east-1"
        for name, value in (("good", secret), ("wrong", "not-the-secret")):
            (tmp_path / name).write_text(
                f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {value}\n"
            )
        env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "good")
        create = (
            "import asyncio, contextlib\nfrom shared.s3 import open_s3\n"
            "async def main():\n    async with contextlib.AsyncExitStack() as st:\n"
            f"        s3 = await open_s3(st, {server.endpoint!r}, 'us-east-1')\n"
            "        await s3.create_bucket(Bucket='raw-bucket')\nasyncio.run(main())\n"
        )
        made = await _run([str(BIN / "python"), "-c", create], env)
        assert made.returncode == 0, made.stderr
        edge = {
            **env,
            "EDGE_DEVICE_ID": "dev-1",
            "EDGE_SITE_ID": "site-1",
            "EDGE_CAMERAS": json.dumps([{"id": "cam1", "url": f"file://{clip}"}]),
            "EDGE_S3_BUCKET": "raw-bucket",
            "EDGE_S3_ENDPOINT_URL": server.endpoint,
            "EDGE_SIGNING_KEY": SECRET,
            "EDGE_REDIS_URL": redis_url,
        }
        good = await _run([str(BIN / "edge-agent"), "check-config"], edge)
        wrong = await _run(
            [str(BIN / "edge-agent"), "check-config"],
            {**edge, "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "wrong")},
        )
    finally:
        server.kill()
    assert good.returncode == 0, good.stderr
    assert wrong.returncode == 78 and "EDGE_S3_BUCKET" in wrong.stderr
    assert secret not in good.stdout + good.stderr + wrong.stdout + wrong.stderr
