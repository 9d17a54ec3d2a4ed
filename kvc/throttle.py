"""At most once per interval, per key: for work many callers may ask for at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Throttle:
    """``due(key)`` is True at most once per ``seconds`` for each key (thread-safe).

    The first caller after the interval gets True and starts the next one: a thousand
    VolumeManagers' passes share one look at their namespace's gated pods, or one sweep of
    the cluster, per interval.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}

    def due(self, key: str = "") -> bool:
        with self._lock:
            now = self._clock()
            if now < self._next.get(key, 0.0):
                return False
            self._next[key] = now + self.seconds
            return True
