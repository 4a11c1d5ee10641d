"""``edge-agent run | check-config``. The only place that exits the process."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from contextlib import AsyncExitStack

from edge_agent.capture import CameraError, Source
from edge_agent.config import EdgeSettings
from shared import logs
from shared.queue import connect
from shared.s3 import open_s3
from shared.settings import EX_CONFIG, load_or_exit, redacted, secret_values


def _settings() -> EdgeSettings:
    return load_or_exit(EdgeSettings, "edge-agent")


def _run() -> int:
    from edge_agent.service import EdgeService

    settings = _settings()
    logs.configure(settings.log_level, settings.log_format, secret_values(settings))
    try:
        return asyncio.run(EdgeService(settings).run())
    except Exception:
        logs.get("edge_agent").exception("agent.fatal")
        return 1


def _check_config(probe: bool) -> int:
    settings = _settings()
    print(json.dumps(redacted(settings), indent=2, default=str))
    if not probe:
        return 0
    problems = asyncio.run(_probe(settings))
    redactor = logs.Redactor(secret_values(settings))  # errors may quote URLs
    for p in problems:
        print(f"edge-agent: {redactor.scrub(p)}", file=sys.stderr)
    return EX_CONFIG if problems else 0


async def _probe(settings: EdgeSettings) -> list[str]:
    problems: list[str] = []
    async with AsyncExitStack() as stack:
        try:
            s3 = await open_s3(stack, settings.s3_endpoint_url, settings.s3_region)
            await s3.head_bucket(Bucket=settings.s3_bucket)
        except Exception as exc:
            problems.append(
                f"EDGE_S3_BUCKET/EDGE_S3_ENDPOINT_URL: bucket "
                f"{settings.s3_bucket!r} not reachable: {exc}"
            )
    client = connect(settings, 5)
    where = "EDGE_REDIS_SENTINELS" if settings.redis_sentinels else "EDGE_REDIS_URL"
    try:
        await client.ping()
    except Exception as exc:
        problems.append(f"{where}: Redis not reachable: {type(exc).__name__}")
    finally:
        await client.aclose()
    for cam in settings.cameras:
        try:
            await asyncio.to_thread(_open_and_close, cam.url, settings.camera_timeout_s)
        except CameraError as exc:
            problems.append(f"EDGE_CAMERAS: camera {cam.id!r}: {exc}")
    return problems


def _open_and_close(url: str, timeout_s: float) -> None:
    Source(url, threading.Event(), open_timeout_s=timeout_s).close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the edge daemon")
    check = sub.add_parser("check-config", help="validate and print the effective configuration")
    check.add_argument(
        "--offline", action="store_true", help="validate only; do not probe S3, Redis or cameras"
    )
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run()
    return _check_config(probe=not args.offline)
