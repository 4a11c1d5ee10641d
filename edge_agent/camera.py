"""One camera, supervised, in its own thread: source → timestamp repair → segmenter → spool.

A failing camera reconnects with jittered exponential back-off and, after
repeated failures, a circuit breaker that probes it at a slower pace; the
other cameras never notice. Whatever was captured before a stop, an EOF or an
error is closed into a chunk and kept.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import av
import structlog

from edge_agent.capture import CameraError, CameraStalled, Source
from edge_agent.config import Camera, EdgeSettings
from edge_agent.metrics import EdgeMetrics
from edge_agent.segmenter import ClosedChunk, ParameterChangeError, Segmenter
from edge_agent.timestamps import MPEGTS_WRAP, TimestampRepair
from shared.backoff import Breaker

log = structlog.get_logger("edge_agent")

# Media errors while writing a chunk, and disk errors (ENOSPC) while spooling it.
CAPTURE_ERRORS = (CameraError, ParameterChangeError, av.FFmpegError, OSError)


class CameraWorker:
    def __init__(
        self,
        cam: Camera,
        settings: EdgeSettings,
        tmp_dir: Path,
        on_chunk: Callable[[ClosedChunk], None],
        metrics: EdgeMetrics,
        stop: threading.Event,
        room: Callable[[], bool] | None = None,
    ) -> None:
        self.cam = cam
        self.room = room  # disk space for another chunk file (None: never asked)
        self._refusing = False
        self.settings = settings
        self.on_chunk = on_chunk
        self.metrics = metrics
        self.stop = stop
        self.tmp_dir = tmp_dir
        self.up = False  # delivering packets on a live connection (set by its own thread)
        # What the next connection's first chunk declares as the cause of its gap.
        self._next_cause = "agent_restart"
        self.breaker = Breaker(
            settings.breaker_threshold,
            1.0,
            settings.reconnect_max_s,
            settings.breaker_open_s,
            max(settings.breaker_open_s, 600.0),
        )

    def run(self) -> None:
        """Capture until stopped (or until a non-looping replay ends)."""
        structlog.contextvars.bind_contextvars(camera_id=self.cam.id)
        while not self.stop.is_set():
            try:
                if self._capture():
                    log.info("camera.finished")
                    return
                delay = self.breaker.failure()  # a live stream ended: reconnect
                log.warning("camera.ended", retry_in_s=round(delay, 2))
            except CAPTURE_ERRORS as exc:
                if isinstance(exc, ParameterChangeError):
                    self._gap_cause("parameter_change")
                delay = self._failed(exc)
            except Exception as exc:  # a bug must not stop this camera for good, nor the others
                log.exception("camera.crashed")
                delay = self._failed(exc)
            finally:
                self.up = False
                self.metrics.camera_up.labels(self.cam.id).set(0)
            self.metrics.circuit_open.labels(self.cam.id).set(int(self.breaker.is_open))
            if self.stop.wait(delay):
                return
            self.metrics.reconnects.labels(self.cam.id).inc()

    def _gap_cause(self, cause: str) -> None:
        """Note why footage stopped, unless an earlier cause of the same gap is noted: the
        agent's own start, or the camera's outage, outranks what happened after it."""
        if self._next_cause == "reconnect":
            self._next_cause = cause

    def _failed(self, exc: BaseException) -> float:
        self.metrics.camera_errors.labels(self.cam.id).inc()
        if isinstance(exc, CameraStalled):
            self.metrics.watchdog.labels(self.cam.id).inc()
        was_open = self.breaker.is_open
        delay = self.breaker.failure()
        event = "camera.stalled" if isinstance(exc, CameraStalled) else "camera.error"
        log.warning(
            event, error=str(exc)[:300], failures=self.breaker.failures, retry_in_s=round(delay, 2)
        )
        if self.breaker.is_open and not was_open:
            log.error("camera.circuit_open", failures=self.breaker.failures)
        return delay

    def _capture(self) -> bool:
        """One connection's worth of capture. True when a non-looping replay ended."""
        s = self.settings
        try:
            source = Source(
                self.cam.url, self.stop, open_timeout_s=s.camera_timeout_s, watchdog_s=s.watchdog_s
            )
        except CameraError:
            self._gap_cause("camera_outage")  # could not even connect: the camera is out
            raise
        try:
            self.capture_from(source)
        finally:
            source.close()
        return source.spec.realtime and not source.spec.loop

    def capture_from(self, source: Source) -> None:
        """Capture an open source until it ends, fails or is stopped: timestamp repair,
        then the segmenter, whose open chunk is flushed whatever happened."""
        ctx = source.stream.codec_context
        log.info("camera.connected", codec=ctx.name, width=ctx.width, height=ctx.height)
        segmenter = Segmenter(
            self.cam.id,
            source.stream,
            self.tmp_dir,
            self.settings.segment_seconds,
            self.on_chunk,
            None if self.room is None else self._room,
            self._next_cause,
        )
        repair = TimestampRepair(
            source.time_base,
            segmenter.frame_ticks,
            wrap=MPEGTS_WRAP if source.is_mpegts else None,
        )
        try:
            self._pump(source, repair, segmenter)
        finally:
            # Keep what was captured before a stop, an EOF or an error, ending it where
            # its footage ends: a stall before the error is the next connection's gap.
            segmenter.flush(segmenter.ended())
            # A cause no chunk took (no keyframe came, no room): the next connection's.
            self._next_cause = segmenter.cause or "reconnect"
            log.info(
                "camera.disconnected",
                skipped_before_keyframe=segmenter.skipped,
                parameter_changes=segmenter.param_changes,
            )
            for kind, n in repair.counts.items():
                self.metrics.timestamps_fixed.labels(self.cam.id, kind).inc(n)

    def _room(self) -> bool:
        """Disk space for the next chunk; each refusal (a GOP dropped: the next manifest
        declares the gap) is counted, and the first of a run logged."""
        assert self.room is not None
        ok = self.room()
        if not ok:
            self.metrics.capture_refused.labels(self.cam.id).inc()
            if not self._refusing:
                log.error("camera.no_disk_space", hint="capture resumes when space returns")
        elif self._refusing:
            log.warning("camera.disk_space_back")
        self._refusing = not ok
        return ok

    def _pump(self, source: Source, repair: TimestampRepair, segmenter: Segmenter) -> None:
        first = True
        for pkt, reset in repair.run(source.packets()):
            if first:
                first = False
                self.up = True
                self.breaker.success()
                self.metrics.camera_up.labels(self.cam.id).set(1)
                self.metrics.circuit_open.labels(self.cam.id).set(0)
            segmenter.feed(pkt, reset)
