"""Pure functions from the volumes' statuses to the VolumeManager's status and events."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvc.api.models import State, VolumePhase, VolumeStatus

# Phases in which workloads can already use the volume.
USABLE = frozenset({VolumePhase.READY, VolumePhase.DEGRADED})


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


def _condition(
    kind: str,
    ok: bool,
    *,
    reason: str,
    message: str,
    generation: int,
    previous: Mapping[str, Mapping[str, Any]],
    now: str,
) -> dict[str, Any]:
    status = "True" if ok else "False"
    before = previous.get(kind)
    # lastTransitionTime moves only when the status flips (metav1.Condition semantics).
    since = before["lastTransitionTime"] if before and before.get("status") == status else now
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }


def aggregate(
    volumes: Sequence[VolumeStatus],
    generation: int,
    previous_conditions: Sequence[Mapping[str, Any]] = (),
    notes: Sequence[str] = (),
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """The VolumeManager's status from its volumes' statuses (in spec order).

    ``notes`` are extra facts worth showing (e.g. old data kept while pods use it).
    """
    timestamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    previous = {c["type"]: c for c in previous_conditions if "type" in c}
    failed = [v for v in volumes if v.phase == VolumePhase.FAILED]
    degraded = [v for v in volumes if v.phase == VolumePhase.DEGRADED]
    waiting = [v for v in volumes if v.phase in (VolumePhase.PENDING, VolumePhase.PROVISIONING)]
    ready = [v for v in volumes if v.phase == VolumePhase.READY]

    if failed:
        state = State.FAILED
    elif waiting:
        state = State.PENDING
    else:
        state = State.RUNNING
    problems = [f"{v.id}: {v.message}" for v in (*failed, *waiting, *degraded)]
    message = "; ".join([*problems, *notes]) if problems or notes else f"all {len(volumes)} volumes ready"

    def summary(items: Sequence[VolumeStatus], what: str) -> str:
        return "; ".join(f"{v.id}: {v.message}" for v in items) or what

    common: dict[str, Any] = {"generation": generation, "previous": previous, "now": timestamp}
    conditions = [
        _condition(
            "Ready",
            not failed and not waiting and not degraded,
            reason="AllVolumesReady" if not (failed or waiting or degraded) else "VolumesNotReady",
            message=summary([*failed, *waiting, *degraded], f"all {len(volumes)} volumes ready"),
            **common,
        ),
        _condition(
            "Progressing",
            bool(waiting),
            reason="Provisioning" if waiting else "Idle",
            message=summary(waiting, "nothing in progress"),
            **common,
        ),
        _condition(
            "Degraded",
            bool(failed or degraded),
            reason="VolumesFailed" if failed else ("ReplicasMissing" if degraded else "AsExpected"),
            message=summary([*failed, *degraded], "no volume failed or degraded"),
            **common,
        ),
    ]
    return {
        "state": state.value,
        "message": message,
        "ready": f"{len(ready)}/{len(volumes)}",
        "observedGeneration": generation,
        "conditions": conditions,
        "volumes": [v.to_status() for v in volumes],
    }


def transitions(previous_volumes: Sequence[Mapping[str, Any]], volumes: Sequence[VolumeStatus]) -> list[Event]:
    """Events for volumes whose phase changed (a new volume counts as coming from nothing)."""
    before = {v.get("id"): v.get("phase") for v in previous_volumes}
    events = []
    for volume in volumes:
        old = before.get(volume.id)
        if old == volume.phase.value:
            continue
        if volume.phase == VolumePhase.READY:
            events.append(Event("Normal", "VolumeReady", f"volume {volume.id}: {volume.message}"))
        elif volume.phase == VolumePhase.FAILED:
            events.append(Event("Warning", "VolumeFailed", f"volume {volume.id}: {volume.message}"))
        elif volume.phase == VolumePhase.DEGRADED:
            events.append(Event("Warning", "VolumeDegraded", f"volume {volume.id}: {volume.message}"))
        elif old in (VolumePhase.READY.value, VolumePhase.DEGRADED.value):
            events.append(Event("Warning", "VolumeNotReady", f"volume {volume.id}: {volume.message}"))
        elif old is None:
            events.append(Event("Normal", "VolumeProvisioning", f"volume {volume.id}: {volume.message}"))
    return events


def state_event(old_state: str | None, new: Mapping[str, Any]) -> Event | None:
    """The event for a VolumeManager whose state changed (None: no event).

    A new VolumeManager's first Pending gets none: each volume's VolumeProvisioning says it,
    and a thousand VolumeManagers created at once should not cost a thousand more writes.
    """
    state = new["state"]
    if old_state == state or (old_state is None and state == State.PENDING.value):
        return None
    return Event("Warning" if state == State.FAILED.value else "Normal", state, new["message"])


def status_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether writing ``new`` would change anything a reader sees."""
    return any(old.get(key) != value for key, value in new.items())
