from __future__ import annotations

import datetime as dt

from kvc.api.models import VolumePhase, VolumeStatus
from kvc.controller.status import Event, aggregate, state_event, status_changed, transitions

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(minutes=5)


def volume(volume_id: str, phase: VolumePhase, message: str = "msg") -> VolumeStatus:
    return VolumeStatus(id=volume_id, phase=phase, message=message)


def test_all_ready_is_running() -> None:
    status = aggregate([volume("a", VolumePhase.READY), volume("b", VolumePhase.READY)], generation=3, now=NOW)
    assert status["state"] == "Running"
    assert status["ready"] == "2/2"
    assert status["message"] == "all 2 volumes ready"
    assert status["observedGeneration"] == 3
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {"Ready": "True", "Progressing": "False", "Degraded": "False"}


def test_any_failed_volume_fails_the_volumemanager_and_says_which() -> None:
    status = aggregate(
        [volume("a", VolumePhase.READY), volume("b", VolumePhase.FAILED, "options.server is required")],
        generation=1,
        now=NOW,
    )
    assert status["state"] == "Failed"
    assert status["ready"] == "1/2"
    assert status["message"] == "b: options.server is required"
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True"
    assert degraded["reason"] == "VolumesFailed"


def test_waiting_volumes_are_pending_and_progressing() -> None:
    status = aggregate([volume("a", VolumePhase.PROVISIONING, "binding")], generation=1, now=NOW)
    assert status["state"] == "Pending"
    progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
    assert progressing["status"] == "True"
    assert progressing["message"] == "a: binding"


def test_degraded_volumes_still_run_but_are_not_ready() -> None:
    status = aggregate([volume("a", VolumePhase.DEGRADED, "1 of 2 replicas")], generation=1, now=NOW)
    assert status["state"] == "Running"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Degraded"]["reason"] == "ReplicasMissing"


def test_notes_are_shown_in_the_message() -> None:
    status = aggregate([volume("a", VolumePhase.READY)], generation=1, notes=["old claim kept"], now=NOW)
    assert status["message"] == "old claim kept"


def test_transition_time_moves_only_when_the_condition_flips() -> None:
    first = aggregate([volume("a", VolumePhase.PROVISIONING)], generation=1, now=NOW)
    same = aggregate([volume("a", VolumePhase.PROVISIONING)], 1, first["conditions"], now=LATER)
    assert same["conditions"] == first["conditions"]
    assert not status_changed(first, same)
    flipped = aggregate([volume("a", VolumePhase.READY)], 1, first["conditions"], now=LATER)
    ready = next(c for c in flipped["conditions"] if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "2026-01-01T12:05:00Z"
    assert status_changed(first, flipped)


def test_events_for_phase_changes_only() -> None:
    previous = [{"id": "a", "phase": "Provisioning"}, {"id": "b", "phase": "Ready"}, {"id": "c", "phase": "Ready"}]
    events = transitions(
        previous,
        [
            volume("a", VolumePhase.READY, "bound"),
            volume("b", VolumePhase.READY),
            volume("c", VolumePhase.PENDING, "claim gone"),
            volume("d", VolumePhase.FAILED, "bad"),
            volume("e", VolumePhase.PROVISIONING, "creating"),
        ],
    )
    assert [(e.type, e.reason, e.message) for e in events] == [
        ("Normal", "VolumeReady", "volume a: bound"),
        ("Warning", "VolumeNotReady", "volume c: claim gone"),
        ("Warning", "VolumeFailed", "volume d: bad"),
        ("Normal", "VolumeProvisioning", "volume e: creating"),
    ]


def test_state_events_say_each_change_of_state_but_a_new_volumemanagers_first_pending() -> None:
    pending = {"state": "Pending", "message": "data: waiting for claim"}
    running = {"state": "Running", "message": "all 1 volumes ready"}
    failed = {"state": "Failed", "message": "data: options.path is required"}
    assert state_event(None, pending) is None  # its volumes' VolumeProvisioning events say it
    assert state_event("Pending", pending) is None
    assert state_event("Pending", running) == Event("Normal", "Running", "all 1 volumes ready")
    assert state_event("Running", pending) == Event("Normal", "Pending", "data: waiting for claim")
    assert state_event(None, failed) == Event("Warning", "Failed", "data: options.path is required")
    assert state_event(None, running) == Event("Normal", "Running", "all 1 volumes ready")
