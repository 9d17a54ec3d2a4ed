from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kvc.api import names
from kvc.controller.gates import Together, held, released
from tests.fakeclock import FakeClock
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


def local(volume_id: str, nodes: set[str], phase: str = "Ready", manager: str = "datasets") -> CatalogEntry:
    label = f"data.kvc.kubeflow.org/{volume_id}"
    affinity = {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": label, "operator": "Exists"}]}]
        }
    }
    claim = {"persistentVolumeClaim": {"claimName": f"claim-{volume_id}"}}
    return CatalogEntry(manager, volume_id, phase, "msg", claim, affinity, "ReadOnlyMany", ready_nodes=frozenset(nodes))


def asking(*refs: str) -> dict[str, Any]:
    pod = gated_pod()
    pod["metadata"]["annotations"] = {"kvc/volume": ",".join(refs)}
    return pod


def test_volumes_ready_apart_keep_the_pod_gated_and_say_where_they_should_meet() -> None:
    images, model = local("images", {"n1", "n2"}), local("model", {"n3"})
    pod = asking("images", "model")
    assert released(pod, [images, model]) is None
    why = held(pod, [images, model])
    assert why is not None
    assert why.moves == {("datasets", "model"): "n1"}  # the node holding most of them, then by name
    assert why.message.startswith("no node holds all of its volumes (images on n1, n2; model on n3)")
    assert "moving a replica of model to n1" in why.message
    # Once a node holds both, the pod is released onto the nodes holding all of them.
    together = local("model", {"n3", "n1"})
    ungated = released(pod, [images, together])
    assert ungated is not None
    terms = ungated["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert [e["key"] for e in terms["nodeSelectorTerms"][0]["matchExpressions"]] == [
        "data.kvc.kubeflow.org/images",
        "data.kvc.kubeflow.org/model",
    ]
    assert held(pod, [images, together]) is None


def test_three_volumes_meet_on_one_node() -> None:
    entries = [local("a", {"n1", "n2"}), local("b", {"n2", "n3"}), local("c", {"n4"})]
    why = held(asking("a", "b", "c"), entries)
    assert why is not None
    assert why.moves == {("datasets", "c"): "n2"}  # n2 holds two of the three already


def test_a_pod_that_waiting_will_not_release_is_told_why() -> None:
    failed = CatalogEntry("datasets", "cifar", "Failed", "access denied to s3://b/", SOURCE, AFFINITY, "ReadOnlyMany")
    why = held(gated_pod(), [failed])
    assert why is not None
    assert why.message.startswith("volume cifar is Failed: access denied to s3://b/")
    assert why.moves == {}
    gone = held(gated_pod(), [])
    assert gone is not None
    assert "volume cifar not found in namespace team-a" in gone.message
    # Still being provisioned, or together already: waiting is the answer, nothing to say.
    assert held(gated_pod(), [entry("Provisioning")]) is None
    assert held(asking("a", "b"), [local("a", {"n1"}), local("b", set(), phase="Provisioning")]) is None


def test_wishes_follow_the_gated_pods_and_linger_after_them() -> None:
    clock = FakeClock()
    together = Together(linger_seconds=60, clock=clock)
    assert together.replace("team-a", {("models", "bert"): "n1"}) == {"models"}
    assert together.replace("team-a", {("models", "bert"): "n1"}) == set()  # unchanged: no pass is woken
    assert together.of("team-a", "models") == {"bert": "n1"}
    assert together.of("team-b", "models") == {}
    assert together.of("team-a", "datasets") == {}
    # The pods were released: the wish stays a while, for the pass that drops the old replica.
    clock.now += 30
    together.replace("team-a", {})
    assert together.of("team-a", "models") == {"bert": "n1"}
    clock.now += 31
    assert together.of("team-a", "models") == {}
    together.replace("team-a", {})
    assert together.replace("team-a", {("models", "bert"): "n2"}) == {"models"}
