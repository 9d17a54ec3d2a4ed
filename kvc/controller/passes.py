"""What this controller process remembers between passes over a VolumeManager.

kopf hands a handler the object as its watch last delivered it. Under load the watch lags
this process' own status patches by seconds, and a pass that trusted the object would post
the same events and write the same status again, every resync, until the watch caught up:
with 1,000 VolumeManagers created at once that was 13 `VolumeReady` events per volume and
an API server busy with the controller's echoes. So the status this process wrote last is
the truth for a while (``trust_seconds``); after that the object's own status wins again,
so that a patch that was lost is written again.

The same record says when a resync may be skipped: a VolumeManager that the last pass
left unchanged is looked at again when something it is built from changed (the
informers ``touch`` it: its claims, its PersistentVolumes, the agents' reports on its
replicas; a node, for one not Running yet), and every ``settled_seconds`` whatever
happens. Its spec has a handler of its own, and node and agent failures a grace far
longer. Passing a thousand VolumeManagers that wait for their claims to bind every
resync kept a core busy computing the same status again, on a machine that the API
server and the controller-manager binding those claims needed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kvc.api.models import State

# How often a settled VolumeManager is looked at (at most: see handlers.configure).
SETTLED_SECONDS = 10.0


class PassMemory:
    """Per uid: the last status written, since when it is unchanged, when its inputs changed (thread-safe)."""

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
        self._quiet: dict[str, tuple[float, str]] = {}  # uid -> (when a pass last changed nothing, state)
        self._touched: dict[str, float] = {}  # uid -> when one of its inputs last changed
        self._nodes_touched = float("-inf")  # when a node last changed
        self._passing: set[str] = set()  # uids a pass is running over

    def status(self, uid: str, observed: Mapping[str, Any]) -> dict[str, Any]:
        """The status to compare a new one with: what this process wrote lately, else ``observed``."""
        with self._lock:
            written = self._written.get(uid)
        if written is None or self._clock() - written[1] > self.trust_seconds:
            return dict(observed)
        return {**observed, **written[0]}

    def now(self) -> float:
        """The time to give ``record`` as when a pass started reading."""
        return self._clock()

    def record(self, uid: str, state: str, written: Mapping[str, Any] | None, started: float | None = None) -> None:
        """After a pass: the state it computed and the status fields it wrote (None: nothing).

        ``started`` (from ``now``) is when the pass began to read: a change touched while it
        ran may not be in what it read, and is looked at again.
        """
        now = self._clock()
        since = now if started is None else started
        with self._lock:
            if written is not None:
                previous = self._written.get(uid, ({}, now))[0]
                self._written[uid] = ({**previous, **written}, now)
            if written is None:
                self._quiet[uid] = (since, state)
            else:
                self._quiet.pop(uid, None)
            if self._touched.get(uid, since) < since:
                del self._touched[uid]  # seen by this pass

    def begin(self, uid: str) -> bool:
        """Claim ``uid`` for a pass (``end`` releases it); False if a pass over it is under way.

        A watch event and the timer can both start one: two at once would both create what
        is missing (one failing with a conflict) and post the same events. The one refused
        marks the uid touched, so that the next resync looks again at what it came for.
        """
        with self._lock:
            if uid not in self._passing:
                self._passing.add(uid)
                return True
            self._touched[uid] = self._clock()
            return False

    def end(self, uid: str) -> None:
        with self._lock:
            self._passing.discard(uid)

    def touch(self, uids: Iterable[str]) -> None:
        """Something these VolumeManagers are built from changed: a pass should look again."""
        now = self._clock()
        with self._lock:
            for uid in uids:
                self._touched[uid] = now

    def touch_nodes(self) -> None:
        """A node changed: those not Running yet (placement may succeed now) should look again."""
        with self._lock:
            self._nodes_touched = self._clock()

    def due(self, uid: str) -> bool:
        """Whether a resync should look at this VolumeManager now."""
        return self.until_due(uid) == 0.0

    def until_due(self, uid: str) -> float:
        """Seconds until a resync should look at this VolumeManager (0: now)."""
        with self._lock:
            quiet = self._quiet.get(uid)
            touched = self._touched.get(uid, float("-inf"))
            nodes_touched = self._nodes_touched
        if quiet is None:
            return 0.0
        since, state = quiet
        if touched >= since or (state != State.RUNNING.value and nodes_touched >= since):
            return 0.0
        return max(0.0, since + self.settled_seconds - self._clock())

    def forget(self, uid: str) -> None:
        with self._lock:
            self._written.pop(uid, None)
            self._quiet.pop(uid, None)
            self._touched.pop(uid, None)
