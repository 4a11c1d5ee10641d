"""Reconnect pacing: jittered exponential back-off and the circuit breaker."""

from __future__ import annotations

from shared.backoff import Backoff, Breaker


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    b = Backoff(base=1.0, cap=8.0)
    delays = [b.next() for _ in range(8)]
    ceilings = [1, 2, 4, 8, 8, 8, 8, 8]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len({round(d, 6) for d in delays}) > 1  # jittered, not a fixed interval
    b.reset()
    assert b.next() <= 1.0


def test_breaker_opens_after_threshold_and_probes_slowly_until_success() -> None:
    br = Breaker(threshold=3, base=1.0, cap=4.0, open_s=60.0, open_cap=240.0)
    closed = [br.failure() for _ in range(2)]
    assert not br.is_open and all(d <= 4.0 for d in closed)
    probes = [br.failure() for _ in range(4)]
    assert br.is_open
    assert [c / 2 <= d <= c for d, c in zip(probes, [60, 120, 240, 240], strict=True)] == [True] * 4
    br.success()
    assert not br.is_open and br.failure() <= 1.0
