"""The edge agent's Prometheus metrics (prefix ``edge_agent_``), in their own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from shared.manifest import Manifest, wall_span


class EdgeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # edge_agent_process_start_time_seconds (restarts), CPU, memory, open fds.
        ProcessCollector(namespace="edge_agent", registry=r)
        cam = ["camera"]
        self.camera_up = Gauge(
            "edge_agent_camera_up", "1 while the camera delivers packets", cam, registry=r
        )
        self.circuit_open = Gauge(
            "edge_agent_camera_circuit_open",
            "1 while the camera's breaker is open",
            cam,
            registry=r,
        )
        self.reconnects = Counter(
            "edge_agent_camera_reconnects",
            "Camera (re)connection attempts after a failure",
            cam,
            registry=r,
        )
        self.watchdog = Counter(
            "edge_agent_camera_watchdog_fired",
            "Streams stalled past EDGE_WATCHDOG_S",
            cam,
            registry=r,
        )
        self.camera_errors = Counter(
            "edge_agent_camera_errors", "Camera open/read errors", cam, registry=r
        )
        self.capture_refused = Counter(
            "edge_agent_capture_refused",
            "GOPs not captured for want of disk space (free under half EDGE_SPOOL_MIN_FREE_BYTES)",
            cam,
            registry=r,
        )
        self.timestamps_fixed = Counter(
            "edge_agent_timestamps_fixed",
            "Packets whose timestamps were repaired",
            [*cam, "kind"],
            registry=r,
        )
        self.written = Counter(
            "edge_agent_chunks_written", "Chunks closed and committed to the spool", cam, registry=r
        )
        # Together they tile each camera's timeline (wall clock), evicted footage counted
        # in both: coverage is (media - evicted) / (media + gap - evicted), the recording
        # rule camera:coverage_ratio:1d, and the coverage audit counts the same seconds.
        self.media_seconds = Counter(
            "edge_agent_media_seconds",
            "Seconds of footage captured and committed to the spool (wall clock)",
            cam,
            registry=r,
        )
        self.gap_seconds = Counter(
            "edge_agent_gap_seconds",
            "Seconds of a camera's timeline declared lost, by cause (eviction: counted when "
            "the spool drops a chunk; the rest when the chunk after the gap is committed)",
            [*cam, "cause"],
            registry=r,
        )
        self.uploaded = Counter(
            "edge_agent_chunks_uploaded", "Chunks uploaded to S3", cam, registry=r
        )
        self.announced = Counter(
            "edge_agent_chunks_announced", "Manifests added to the stream", cam, registry=r
        )
        self.evicted = Counter(
            "edge_agent_chunks_evicted",
            "Chunks evicted from the spool (disk limits)",
            cam,
            registry=r,
        )
        self.lost = Counter(
            "edge_agent_chunks_lost",
            "Committed chunks whose file was found missing at start-up (a declared gap)",
            cam,
            registry=r,
        )
        self.quarantined = Counter(
            "edge_agent_chunks_quarantined",
            "Partial or unknown chunk files moved to quarantine/ at start-up (never uploaded)",
            ["reason"],
            registry=r,
        )
        self.quarantine_pruned = Counter(
            "edge_agent_quarantine_pruned",
            "Quarantined files removed (age, bytes: its own limits; spool_limit: room)",
            ["reason"],
            registry=r,
        )
        self.quarantine_bytes = Gauge(
            "edge_agent_quarantine_bytes",
            "Bytes in quarantine/ (counted against EDGE_SPOOL_MAX_BYTES)",
            registry=r,
        )
        self.bytes_uploaded = Counter(
            "edge_agent_bytes_uploaded", "Bytes uploaded to S3", cam, registry=r
        )
        self.upload_seconds = Histogram(
            "edge_agent_upload_seconds",
            "Upload latency per chunk",
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.delivery_retries = Counter(
            "edge_agent_delivery_retries",
            "Upload or announce attempts that failed",
            ["stage"],
            registry=r,
        )
        self.spool_bytes = Gauge(
            "edge_agent_spool_bytes", "Bytes of chunks waiting for upload", registry=r
        )
        self.ledger_backlog = Gauge(
            "edge_agent_ledger_backlog",
            "Chunks in the ledger not yet announced",
            ["state"],
            registry=r,
        )
        self.oldest_unannounced = Gauge(
            "edge_agent_oldest_unannounced_age_seconds",
            "Age of the oldest committed chunk not yet announced (0: none waiting)",
            registry=r,
        )
        self.delivery_stalled = Gauge(
            "edge_agent_delivery_stalled",
            "1 while work waits, S3 and Redis answer, and nothing moved for EDGE_DELIVERY_STALL_S",
            registry=r,
        )
        self.ledger_retries = Counter(
            "edge_agent_ledger_retries",
            "Ledger operations that failed (database locked, disk full) and were retried",
            ["op"],
            registry=r,
        )
        self.task_crashes = Counter(
            "edge_agent_task_crashes",
            "Long-lived tasks that ended with an exception and were restarted",
            ["task"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "edge_agent_event_loop_lag_seconds",
            "How late the event loop ran a 100 ms timer (blocking work on the loop)",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )

    def footage(self, m: Manifest) -> None:
        """A committed chunk: its seconds, and the gap its manifest declares before it."""
        self.media_seconds.labels(m.camera_id).inc(wall_span(m))
        if m.discontinuity and m.gap_before_s > 0:
            cause = m.gap_cause or "unspecified"  # a version 1 manifest names none
            self.gap_seconds.labels(m.camera_id, cause).inc(m.gap_before_s)
