"""Capped exponential back-off with full jitter (no reconnect storms across a fleet)."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class Breaker:
    """Back-off with a circuit breaker, for one dependency (a camera).

    Closed: retry with jittered exponential back-off up to ``cap``. After
    ``threshold`` consecutive failures the breaker opens: single probes,
    ``open_s`` apart and doubling up to ``open_cap``, so a dead camera is not
    hammered but is noticed when it comes back.
    """

    def __init__(
        self,
        threshold: int = 5,
        base: float = 1.0,
        cap: float = 30.0,
        open_s: float = 60.0,
        open_cap: float = 600.0,
    ) -> None:
        self.threshold = threshold
        self.backoff = Backoff(base, cap)
        self.open_s = open_s
        self.open_cap = open_cap
        self.failures = 0

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold

    def failure(self) -> float:
        """Record a failure; returns how long to wait before the next attempt."""
        self.failures += 1
        if not self.is_open:
            return self.backoff.next()
        ceiling = min(self.open_cap, self.open_s * 2 ** (self.failures - self.threshold))
        return random.uniform(ceiling / 2, ceiling)

    def success(self) -> None:
        self.failures = 0
        self.backoff.reset()
