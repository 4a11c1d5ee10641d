"""``cloud-ingest run | status | dlq | reconcile | coverage``: the only place that exits
the process."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloud_ingest import admin
from cloud_ingest.config import IngestSettings
from shared import logs
from shared.keys import OPEN_WINDOWS, dlq_stream, handoff_stream, whereabouts_key
from shared.manifest import Keyring
from shared.queue import connect, status
from shared.s3 import open_s3
from shared.settings import EX_CONFIG, load_or_exit, secret_values


def _settings() -> IngestSettings:
    return load_or_exit(IngestSettings, "cloud-ingest")


def _run() -> int:
    # Read when ray is first imported: set before, or Ray folds the per-chunk log lines
    # ("repeated 11x across cluster") that must each reach the log.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from cloud_ingest.supervisor import run

    settings = _settings()
    logs.configure(settings.log_level, settings.log_format, secret_values(settings))
    try:
        return run(settings)
    except Exception:
        logs.get("cloud_ingest").exception("deployment.fatal")
        return 1


def _redis(settings: IngestSettings) -> Any:
    return connect(settings, settings.redis_timeout_s)


async def _status(settings: IngestSettings, as_json: bool, interval: float) -> int:
    client = _redis(settings)
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
        handoff = handoff_stream(settings.stream)
        placed: Any = await client.hgetall(whereabouts_key(settings.group))
        windows = {
            "open": int(await client.zcard(OPEN_WINDOWS)),
            "to_hand_off": int(await client.xlen(handoff)),
            "dead_lettered": int(await client.xlen(dlq_stream(handoff))),
        }
    finally:
        await client.aclose()
    where = {k.decode(): json.loads(v) for k, v in placed.items()}
    for c in st.consumers:  # where each consumer runs (its actor says so every 10 s)
        c["where"] = where.get(c["name"])
    doc = {
        "stream": settings.stream,
        "group": settings.group,
        "length": st.length,
        "pending": st.pending,
        "lag": st.lag,
        "dlq": st.dlq,
        "consumers": st.consumers,
        "rates": rates,
        "windows": windows,
    }
    if as_json:
        print(json.dumps(doc, allow_nan=False))
        return 0
    print(f"stream {settings.stream}  group {settings.group}")
    print(f"  length {st.length}  pending {st.pending}  lag {st.lag}  dlq {st.dlq}")
    if rates:
        print(f"  in {rates['in_per_s']}/s  out {rates['out_per_s']}/s")
    print(
        f"  windows: open {windows['open']}  to hand off {windows['to_hand_off']}"
        f"  dead-lettered {windows['dead_lettered']}"
    )
    for c in st.consumers:
        w = c["where"]
        at = ""
        if w is not None:  # said every 10 s while it runs: an old "seen" is a gone actor
            seen = time.time() - float(w.get("seen", 0))
            at = f", node {w['node_ip']} {w['node_id'][:12]} pid {w['pid']} (seen {seen:.0f}s ago)"
        print(
            f"  consumer {c['name']}: pending {c['pending']}, idle {c['idle_ms'] / 1000:.1f}s{at}"
        )
    return 0


async def _dlq(settings: IngestSettings, args: argparse.Namespace) -> int:
    if args.action != "list" and not (args.id or args.reason or args.all):
        print("cloud-ingest: name letters with --id or --reason, or pass --all", file=sys.stderr)
        return 2
    client = _redis(settings)
    keyring, ids = settings.signing_keys(), set(args.id or [])
    chosen: Counter[str] = Counter()
    try:
        async for page in admin.letters(client, settings.stream):
            found = admin.select(page, ids, args.reason)
            if args.limit is not None:
                found = found[: max(0, args.limit - chosen.total())]
            await _act(client, settings, args.action, found, keyring)
            chosen.update(x.reason for x in found)
            if args.limit is not None and chosen.total() >= args.limit:
                break
    finally:
        await client.aclose()
    if args.action == "list":
        summary = {"dead_letters": chosen.total(), "by_reason": dict(chosen)}
        print(json.dumps(summary), file=sys.stderr)
    else:
        print(json.dumps({"requeued" if args.action == "requeue" else "purged": chosen.total()}))
    return 0


async def _act(
    client: Any, settings: IngestSettings, action: str, found: list[admin.Letter], keyring: Keyring
) -> None:
    if action == "list":
        for letter in found:
            print(json.dumps(letter.summary(), allow_nan=False))
    elif action == "requeue":
        await admin.requeue(client, settings.stream, found, keyring, settings.replay_secret())
    else:
        await admin.purge(client, settings.stream, found)


async def _reconcile(settings: IngestSettings, args: argparse.Namespace) -> int:
    if settings.raw_bucket is None:
        print("cloud-ingest: INGEST_RAW_BUCKET: is required for reconcile", file=sys.stderr)
        return EX_CONFIG
    client = _redis(settings)
    try:
        async with AsyncExitStack() as stack:
            s3 = await open_s3(stack, settings.s3_endpoint_url, settings.s3_region)
            job = admin.Reconcile(
                s3,
                client,
                keyring=settings.signing_keys(),
                raw_bucket=settings.raw_bucket,
                output_bucket=settings.output_bucket,
                output_prefix=settings.output_prefix,
                stream=settings.stream,
                since=args.since,
                until=args.until,
                dry_run=args.dry_run,
                replay_key=settings.replay_secret(),
            )
            prefix = args.prefix if args.prefix is not None else settings.raw_prefix
            report = await admin.reconcile(
                job, prefix, page_size=args.page_size, concurrency=args.concurrency
            )
    finally:
        await client.aclose()
    print(json.dumps(report.as_dict(), allow_nan=False))
    if report.errors:
        print(
            f"cloud-ingest: reconcile: {report.errors} error(s), e.g. {report.error_examples[0]}",
            file=sys.stderr,
        )
        return 1
    return 0


async def _coverage(settings: IngestSettings, args: argparse.Namespace) -> int:
    from cloud_ingest import coverage

    if args.until <= args.since:
        print("cloud-ingest: coverage: --until must be after --since", file=sys.stderr)
        return 2
    client = _redis(settings)
    try:
        async with AsyncExitStack() as stack:
            s3 = await open_s3(stack, settings.s3_endpoint_url, settings.s3_region)
            doc = await coverage.audit(
                settings, s3, client, args.site, args.since, args.until, args.camera
            )
    finally:
        await client.aclose()
    if args.plot:
        from cloud_ingest.coverage_plot import plot

        await asyncio.to_thread(plot, doc, args.plot)
    if args.json:
        print(json.dumps(doc, allow_nan=False))
    else:
        print(coverage.table(doc))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def _when(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


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
    dlq = sub.add_parser("dlq", help="inspect and replay dead letters")
    dlq.add_argument("action", choices=["list", "requeue", "purge"])
    dlq.add_argument("--id", action="append", help="a dead letter's id (repeatable)")
    dlq.add_argument("--reason", help="only letters with this reason")
    dlq.add_argument("--all", action="store_true", help="requeue/purge every letter")
    dlq.add_argument("--limit", type=_positive, help="act on at most this many (default: all)")
    rec = sub.add_parser("reconcile", help="re-enqueue raw chunks that have no done record")
    rec.add_argument(
        "--prefix", help="raw key prefix, e.g. raw/site-1/cam1 (default INGEST_RAW_PREFIX)"
    )
    rec.add_argument("--since", type=_when, help="chunks starting at or after (ISO 8601, UTC)")
    rec.add_argument("--until", type=_when, help="chunks starting before (ISO 8601, UTC)")
    rec.add_argument("--dry-run", action="store_true", help="report only")
    rec.add_argument("--page-size", type=_positive, default=1000, help="keys per listing page")
    rec.add_argument(
        "--concurrency", type=_positive, default=16, help="chunks looked up / requeued at once"
    )
    cov = sub.add_parser(
        "coverage", help="every second of a site's cameras: footage, declared gap or unexplained"
    )
    cov.add_argument("--site", required=True, help="site id")
    cov.add_argument(
        "--camera", action="append", help="only this camera (repeatable; default: every one)"
    )
    cov.add_argument("--since", type=_when, required=True, help="start (ISO 8601, UTC)")
    cov.add_argument("--until", type=_when, required=True, help="end (ISO 8601, UTC)")
    cov.add_argument("--json", action="store_true", help="the JSON document (contract)")
    cov.add_argument("--plot", type=Path, help="write a per-camera timeline PNG here")
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run()
    settings = _settings()
    # Their answer is stdout: their log lines go to stderr.
    logs.configure(settings.log_level, settings.log_format, secret_values(settings), sys.stderr)
    if args.command == "dlq":
        return asyncio.run(_dlq(settings, args))
    if args.command == "reconcile":
        return asyncio.run(_reconcile(settings, args))
    if args.command == "coverage":
        return asyncio.run(_coverage(settings, args))
    return asyncio.run(_status(settings, args.json, args.interval))
