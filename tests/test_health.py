"""edge_agent.health.Progress: when the agent calls itself wedged, on a clock of our own."""

from __future__ import annotations

from edge_agent.health import STREAMING_S, Progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def progress(stall_s: float = 60.0) -> tuple[Progress, Clock]:
    clock = Clock()
    p = Progress(stall_s, clock)
    p.deps_seen(s3=True, redis=True)
    return p, clock


def test_progress_idle_lane_is_never_stalled() -> None:
    p, clock = progress()
    clock.now += 600
    assert not p.stalled("delivery", 0) and not p.stalled("commit", 0)
    clock.now += 30  # work arrives after a long idle spell: its clock starts now
    assert not p.stalled("delivery", 3)


def test_progress_delivery_stalls_without_movement_while_dependencies_work() -> None:
    p, clock = progress(stall_s=60)
    clock.now += 59
    assert not p.stalled("delivery", 5)
    clock.now += 2
    assert p.stalled("delivery", 5)
    p.moved("delivery")
    assert not p.stalled("delivery", 5)


def test_progress_outage_is_not_a_stall_and_its_end_restarts_the_clock() -> None:
    p, clock = progress(stall_s=60)
    p.deps_seen(s3=False, redis=True)
    clock.now += 3600
    assert not p.stalled("delivery", 100)
    p.deps_seen(s3=True, redis=True)  # back: the clock starts from here
    clock.now += 59
    assert not p.stalled("delivery", 100)
    clock.now += 2
    assert p.stalled("delivery", 100)


def test_progress_a_dependency_refusing_work_is_not_a_stall() -> None:
    """Redis answering PING but refusing XADD (full), S3 refusing PUTs: each failure
    restarts the clock, so only a wedge with working dependencies counts."""
    p, clock = progress(stall_s=60)
    for _ in range(10):
        clock.now += 30
        p.dep_failed()
        p.deps_seen(s3=True, redis=True)  # the next probe answers again
        assert not p.stalled("delivery", 4)


def test_progress_a_long_streaming_upload_is_movement_and_a_failed_one_is_not() -> None:
    p, clock = progress(stall_s=60)
    p.streaming = 1
    for _ in range(20):  # a capped upload streaming for 10 minutes
        clock.now += 30
        p.streamed()
        assert not p.stalled("delivery", 1)
    p.streaming = 0  # the attempt failed; its bytes no longer count
    clock.now += 61
    assert p.stalled("delivery", 1)
    p.streaming = 1  # a new attempt that sends nothing for longer than STREAMING_S
    clock.now += STREAMING_S + 1
    assert p.stalled("delivery", 1)


def test_progress_commit_lane_needs_no_dependency() -> None:
    """Committing needs only the ledger: a wedged committer during an S3 outage is
    still a stall."""
    p, clock = progress(stall_s=60)
    p.deps_seen(s3=False, redis=False)
    clock.now += 61
    assert p.stalled("commit", 2)
    assert not p.stalled("delivery", 2)


def test_progress_restart_starts_the_clocks_after_a_long_start_up() -> None:
    p, clock = progress(stall_s=60)
    clock.now += 600  # recovery took ten minutes
    p.restart()
    assert not p.stalled("commit", 1) and not p.stalled("delivery", 1)
