from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kvc.api import names
from kvc.controller.gates import released
from webhook.mutation import INJECTED
from webhook.resolve import CatalogEntry

LABEL = "data.kvc.kubeflow.org/x"
AFFINITY = {
    "requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": LABEL, "operator": "Exists"}]}]
    }
}
SOURCE = {"hostPath": {"path": "/var/lib/kvc/ns/vm/cifar-1", "type": "Directory"}}


def entry(phase: str) -> CatalogEntry:
    return CatalogEntry("datasets", "cifar", phase, "msg", SOURCE, AFFINITY, "ReadOnlyMany")


def gated_pod(other_gate: bool = False) -> dict[str, Any]:
    gates = [{"name": names.SCHEDULING_GATE}] + ([{"name": "example.com/quota"}] if other_gate else [])
    return {
        "metadata": {
            "name": "p",
            "namespace": "team-a",
            "annotations": {"kvc/volume": "cifar"},
            "labels": {names.LABEL_GATED: "true", "app": "train"},
        },
        "spec": {"containers": [{"name": "c"}], "schedulingGates": gates},
    }


def test_a_pod_stays_gated_while_its_data_is_not_usable() -> None:
    assert released(gated_pod(), [entry("Provisioning")]) is None
    assert released(gated_pod(), []) is None  # its VolumeManager is gone


def test_usable_data_adds_affinity_and_removes_only_our_gate() -> None:
    pod = released(gated_pod(other_gate=True), [entry("Ready")])
    assert pod is not None
    assert pod["spec"]["affinity"]["nodeAffinity"] == AFFINITY
    assert pod["spec"]["schedulingGates"] == [{"name": "example.com/quota"}]
    assert pod["metadata"]["labels"] == {"app": "train"}
    alone = released(gated_pod(), [entry("Degraded")])
    assert alone is not None
    assert "schedulingGates" not in alone["spec"]


def test_a_pod_gated_before_its_volumes_source_changed_waits_for_the_data_its_claim_holds() -> None:
    """Its volumes cannot change: it is released onto the earlier data, once Ready, not the new one."""
    current = CatalogEntry(
        "datasets",
        "cifar",
        "Ready",
        "msg",
        {"persistentVolumeClaim": {"claimName": "new-claim"}},
        AFFINITY,
        "ReadOnlyMany",
    )
    pod = gated_pod()
    pod["metadata"]["annotations"][INJECTED] = json.dumps(["kvc-datasets-cifar"])
    pod["spec"]["volumes"] = [
        {"name": "kvc-datasets-cifar", "persistentVolumeClaim": {"claimName": "old-claim", "readOnly": True}}
    ]
    asked: list[str] = []

    def not_yet(volume: Mapping[str, Any]) -> list[dict[str, Any]] | None:
        asked.append(volume["persistentVolumeClaim"]["claimName"])
        return None

    assert released(pod, [current], not_yet) is None
    assert asked == ["old-claim"]
    old = [{"key": "data.kvc.kubeflow.org/old", "operator": "Exists"}]
    ungated = released(pod, [current], lambda volume: old)
    assert ungated is not None
    terms = ungated["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [{"matchExpressions": old}]
    assert "schedulingGates" not in ungated["spec"]
    # Earlier data on shared storage (an NFS export) puts no constraint on the node.
    shared = released(pod, [current], lambda volume: [])
    assert shared is not None
    assert "affinity" not in shared["spec"]
    assert "schedulingGates" not in shared["spec"]
