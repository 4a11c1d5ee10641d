"""The deployment's Prometheus metrics (prefix ``cloud_ingest_``), refreshed by the supervisor
from the queue and from every actor's ``stats()``."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from shared.queue import QueueStatus


class IngestMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.length = Gauge("cloud_ingest_stream_length", "Entries in the stream", registry=r)
        self.pending = Gauge("cloud_ingest_pending", "Delivered, not yet acknowledged", registry=r)
        self.lag = Gauge("cloud_ingest_lag", "Entries not yet delivered to the group", registry=r)
        self.dlq = Gauge("cloud_ingest_dlq_length", "Entries in {stream}:dlq", registry=r)
        self.consumers = Gauge(
            "cloud_ingest_consumers_alive", "Actors answering stats()", registry=r
        )
        self.restarts = Gauge(
            "cloud_ingest_actor_restarts", "Actor restarts since start", registry=r
        )
        self.events = Gauge(
            "cloud_ingest_chunks",
            "Chunk outcomes since start, summed over actors "
            "(processed, duplicate, verdict_*, rejected_* for dead letters, failed_attempts)",
            ["outcome"],
            registry=r,
        )
        self.stage_seconds = Gauge(
            "cloud_ingest_stage_seconds_total",
            "Seconds spent per stage, summed over actors",
            ["stage"],
            registry=r,
        )

    def update(self, queue: QueueStatus | None, stats: list[dict[str, Any]], restarts: int) -> None:
        if queue is not None:
            self.length.set(queue.length)
            self.pending.set(queue.pending)
            self.lag.set(queue.lag or 0)
            self.dlq.set(queue.dlq)
        self.consumers.set(len(stats))
        self.restarts.set(restarts)
        totals: dict[str, float] = {}
        for s in stats:
            for key, value in s.items():
                totals[key] = totals.get(key, 0) + value
        for key, value in totals.items():
            if key.startswith("seconds_"):
                self.stage_seconds.labels(key.removeprefix("seconds_")).set(value)
            elif key != "in_flight":
                self.events.labels(key).set(value)
