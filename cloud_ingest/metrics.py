"""The deployment's Prometheus metrics (prefix ``cloud_ingest_``), refreshed by the observer
from the queue, every actor's ``stats()`` and the consumers' totals in Redis.

Gauges say how things are now (queue depth, actors alive or paused, media workers
busy). Counters are real counters: chunk outcomes and stage seconds are the sums the
consumers keep in Redis (``cloud_ingest.totals``), so they never go down when an actor
restarts or is killed, and ``rate()`` means what it says.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, Metric

from cloud_ingest.totals import MEDIA_MS, WINDOWS_CLOSED
from shared.queue import QueueStatus

# stats() gauges summed over the actors -> (metric name, help)
ACTOR_GAUGES = {
    "in_flight": ("cloud_ingest_entries_in_flight", "Entries held by the actors right now"),
    "media_workers": ("cloud_ingest_media_workers", "Media worker processes (pool size)"),
    "media_busy": ("cloud_ingest_media_workers_busy", "Media workers running a chunk's work"),
    "media_waiting": (
        "cloud_ingest_media_tasks_waiting",
        "Chunks whose media work waits for a free worker",
    ),
    "paused": (
        "cloud_ingest_consumers_paused",
        "Actors paused because their own environment probe fails",
    ),
}


class _Totals:
    """Counters from the last totals read (they only grow; kept when a read fails)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, float] = {}
        self.stages: dict[str, float] = {}
        self.restarts = 0

    def collect(self) -> Iterator[Metric]:
        chunks = CounterMetricFamily(
            "cloud_ingest_chunks",
            "Chunk outcomes and events, summed over all consumers ever (processed, duplicate, "
            "verdict_*, rejected_<dlq reason>, failed_attempts, internal_errors, ...)",
            labels=["outcome"],
        )
        media = CounterMetricFamily(
            "cloud_ingest_media_seconds",
            "Seconds of footage processed (edge wall clock), by verdict",
            labels=["verdict"],
        )
        windows = CounterMetricFamily(
            "cloud_ingest_windows_closed",
            "Scene window revisions closed, by site and why (complete, timeout)",
            labels=["site", "closed_because"],
        )
        for outcome, n in sorted(self.outcomes.items()):
            if outcome.startswith(MEDIA_MS):
                media.add_metric([outcome.removeprefix(MEDIA_MS)], n / 1000)
            elif outcome.startswith(WINDOWS_CLOSED):
                site, _, because = outcome.removeprefix(WINDOWS_CLOSED).rpartition(":")
                windows.add_metric([site, because], n)
            else:
                chunks.add_metric([outcome], n)
        yield chunks
        yield media
        yield windows
        stages = CounterMetricFamily(
            "cloud_ingest_stage_seconds",
            "Seconds spent per stage, summed over all consumers ever",
            labels=["stage"],
        )
        for stage, s in sorted(self.stages.items()):
            stages.add_metric([stage], s)
        yield stages
        yield CounterMetricFamily(
            "cloud_ingest_actor_restarts",
            "Consumer runs restarted by this deployment (actor died or run failed)",
            value=self.restarts,
        )

    def describe(self) -> Iterator[Metric]:
        return self.collect()


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
        self.actor = {
            key: Gauge(name, text, registry=r) for key, (name, text) in ACTOR_GAUGES.items()
        }
        self.node = Gauge(
            "cloud_ingest_consumer_node",
            "1 for the Ray node each consumer actor runs on",
            ["consumer", "node_id", "node_ip"],
            registry=r,
        )
        self.totals = _Totals()
        r.register(self.totals)

    def placed(self, where: dict[str, dict[str, str]]) -> None:
        """Each answering actor's node (a restarted actor's old node disappears)."""
        self.node.clear()
        for consumer, place in sorted(where.items()):
            self.node.labels(consumer, place["node_id"], place["node_ip"]).set(1)

    def update(self, queue: QueueStatus | None, stats: list[dict[str, Any]], restarts: int) -> None:
        if queue is not None:
            self.length.set(queue.length)
            self.pending.set(queue.pending)
            self.lag.set(queue.lag or 0)
            self.dlq.set(queue.dlq)
        self.consumers.set(len(stats))
        for key, gauge in self.actor.items():
            gauge.set(sum(float(s.get(key, 0)) for s in stats))
        self.totals.restarts = restarts

    def update_totals(self, counts: dict[str, float], seconds: dict[str, float]) -> None:
        self.totals.outcomes = counts
        self.totals.stages = seconds
