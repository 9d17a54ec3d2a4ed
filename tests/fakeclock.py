"""A clock for code that takes one (``clock: Callable[[], float]``), moved by hand."""

from __future__ import annotations


class FakeClock:
    """Monotonic seconds that only move when a test says so: ``clock.now += 5``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
