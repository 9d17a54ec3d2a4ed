from __future__ import annotations

from typing import Any

from e2e.bench_controller import STAGES, stages
from kvc.api import names

START = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def at(seconds: int) -> str:
    return f"2027-01-15T08:00:{seconds:02d}Z"


def managed(manager: str, seconds: int, fields: dict[str, Any], subresource: str | None = None) -> dict[str, Any]:
    entry = {"manager": manager, "operation": "Update", "time": at(seconds), "fieldsV1": fields}
    return {**entry, "subresource": subresource} if subresource else entry


def volumemanager(created: int, finalized: int | None, running: int | None) -> dict[str, Any]:
    fields = [managed("kopf", finalized, {"f:metadata": {"f:finalizers": {}}})] if finalized is not None else []
    ready = {
        "type": "Ready",
        "status": "True" if running is not None else "False",
        "lastTransitionTime": at(running or 0),
    }
    return {
        "metadata": {"creationTimestamp": at(created), "managedFields": fields},
        "status": {"conditions": [ready]},
    }


def claim(created: int, annotated: int, bound: int | None) -> dict[str, Any]:
    annotation: dict[str, Any] = {"f:metadata": {"f:annotations": {f"f:{names.ANNOTATION_VOLUME_CREATED}": {}}}}
    fields = [managed("kvc", annotated, annotation)]
    if bound is not None:
        fields.append(managed("kube-controller-manager", bound, {"f:status": {"f:phase": {}}}, "status"))
    return {
        "metadata": {"creationTimestamp": at(created), "managedFields": fields},
        "status": {"phase": "Bound" if bound is not None else "Pending"},
    }


def test_each_step_is_read_from_the_objects_own_timestamps() -> None:
    steps = stages(
        [volumemanager(1, 3, 20), volumemanager(2, 5, None)],
        [claim(6, 7, 19), claim(9, 9, None)],
        START,
    )
    assert list(steps) == list(STAGES)
    assert steps == {
        "VolumeManager created": [1, 2],
        "its finalizer on (kopf)": [3, 5],
        "claim made (its PV and annotation next)": [6, 9],
        "claim Bound (kube-controller-manager)": [19],  # the second is still Pending
        "VolumeManager Running": [20],  # the second is not Ready
        "  annotated -> Bound, the binder alone": [12],
    }


def test_a_claim_bound_without_our_annotation_has_no_binder_share() -> None:
    unannotated = claim(6, 7, 19)
    unannotated["metadata"]["managedFields"] = unannotated["metadata"]["managedFields"][1:]
    steps = stages([], [unannotated], START)
    assert steps["claim Bound (kube-controller-manager)"] == [19]
    assert steps["  annotated -> Bound, the binder alone"] == []
