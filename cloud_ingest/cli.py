"""``cloud-ingest run | status``. The only place that exits the process."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import redis.asyncio as aioredis

from cloud_ingest.config import IngestSettings
from shared import logs
from shared.queue import status
from shared.settings import EX_CONFIG, ConfigError, load


def _settings() -> IngestSettings:
    try:
        return load(IngestSettings)
    except ConfigError as exc:
        print(f"cloud-ingest: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None


def _run() -> int:
    from cloud_ingest.supervisor import run

    settings = _settings()
    logs.configure(settings.log_level, settings.log_format)
    try:
        return run(settings)
    except Exception:
        logs.get("cloud_ingest").exception("deployment.fatal")
        return 1


async def _status(settings: IngestSettings, as_json: bool, interval: float) -> int:
    client = aioredis.from_url(settings.redis_url.get_secret_value())
    try:
        st = await status(client, settings.stream, settings.group)
        rates = None
        if interval > 0:  # rates from two samples of the stream's monotonic counters
            await asyncio.sleep(interval)
            later = await status(client, settings.stream, settings.group)
            rates = {
                "in_per_s": round((later.added - st.added) / interval, 2),
                "out_per_s": round((later.read - st.read) / interval, 2),
            }
            st = later
    finally:
        await client.aclose()
    doc = {
        "stream": settings.stream,
        "group": settings.group,
        "length": st.length,
        "pending": st.pending,
        "lag": st.lag,
        "dlq": st.dlq,
        "consumers": st.consumers,
        "rates": rates,
    }
    if as_json:
        print(json.dumps(doc))
        return 0
    print(f"stream {settings.stream}  group {settings.group}")
    print(f"  length {st.length}  pending {st.pending}  lag {st.lag}  dlq {st.dlq}")
    if rates:
        print(f"  in {rates['in_per_s']}/s  out {rates['out_per_s']}/s")
    for c in st.consumers:
        print(f"  consumer {c['name']}: pending {c['pending']}, idle {c['idle_ms'] / 1000:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloud-ingest", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the consumer deployment on Ray")
    st = sub.add_parser("status", help="queue length, pending, lag, DLQ size, consumers")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="seconds between the two samples for rates (0: no rates)",
    )
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run()
    return asyncio.run(_status(_settings(), args.json, args.interval))
