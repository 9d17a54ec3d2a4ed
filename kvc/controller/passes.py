"""What this controller process remembers between passes over a VolumeManager.

kopf hands a handler the object as its watch last delivered it. Under load the watch lags
this process' own status patches by seconds, and a pass that trusted the object would post
the same events and write the same status again, every resync, until the watch caught up:
with 1,000 VolumeManagers created at once that was 13 `VolumeReady` events per volume and
an API server busy with the controller's echoes. So the status this process wrote last is
the truth for a while (``trust_seconds``); after that the object's own status wins again,
so that a patch that was lost is written again.

The same record says when a resync may be skipped: a VolumeManager that is Running and
that the last pass left unchanged is looked at every ``settled_seconds`` rather than every
resync. Its inputs rarely change, and those that matter sooner come as spec updates (their
own handler) or as node and agent failures, which have a grace of their own far longer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kvc.api.models import State

# How often a settled VolumeManager is looked at (at most: see handlers.configure).
SETTLED_SECONDS = 10.0


class PassMemory:
    """Per VolumeManager uid: the last status written, and since when it has been settled (thread-safe)."""

    def __init__(
        self,
        trust_seconds: float = 30.0,
        settled_seconds: float = SETTLED_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.trust_seconds = trust_seconds
        self.settled_seconds = settled_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._written: dict[str, tuple[dict[str, Any], float]] = {}  # uid -> (status, when)
        self._settled: dict[str, float] = {}  # uid -> when a pass last found it settled

    def status(self, uid: str, observed: Mapping[str, Any]) -> dict[str, Any]:
        """The status to compare a new one with: what this process wrote lately, else ``observed``."""
        with self._lock:
            written = self._written.get(uid)
        if written is None or self._clock() - written[1] > self.trust_seconds:
            return dict(observed)
        return {**observed, **written[0]}

    def record(self, uid: str, state: str, written: Mapping[str, Any] | None) -> None:
        """After a pass: the state it computed and the status fields it wrote (None: nothing)."""
        now = self._clock()
        with self._lock:
            if written is not None:
                previous = self._written.get(uid, ({}, now))[0]
                self._written[uid] = ({**previous, **written}, now)
            if written is None and state == State.RUNNING.value:
                self._settled[uid] = now
            else:
                self._settled.pop(uid, None)

    def due(self, uid: str) -> bool:
        """Whether a resync should look at this VolumeManager now."""
        return self.until_due(uid) == 0.0

    def until_due(self, uid: str) -> float:
        """Seconds until a resync should look at this VolumeManager (0: now)."""
        with self._lock:
            settled_at = self._settled.get(uid)
        if settled_at is None:
            return 0.0
        return max(0.0, settled_at + self.settled_seconds - self._clock())

    def forget(self, uid: str) -> None:
        with self._lock:
            self._written.pop(uid, None)
            self._settled.pop(uid, None)
