from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kvc.api import names
from kvc.controller.gates import Together, held, released
from kvc.wiring.mutation import INJECTED
from kvc.wiring.resolve import CatalogEntry
from tests.fakeclock import FakeClock

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
    assert why.reason == "DataApart"
    assert why.moves == {("datasets", "model"): "n1"}  # the node holding most of them, then by name
    assert why.message.startswith("no node holds all of its volumes (images on n1, n2; model on n3)")
    assert "placing a replica of model on n1" in why.message
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


def test_the_meeting_node_is_one_the_pod_may_run_on_and_every_moving_volume_may_go_to() -> None:
    images, model = local("images", {"n1"}), local("model", {"n2"})
    pod = asking("images", "model")
    # The pod's own node selection excludes n1: model's node is chosen, images moves there.
    elsewhere = held(pod, [images, model], fits=lambda node: node != "n1")
    assert elsewhere is not None
    assert elsewhere.moves == {("datasets", "images"): "n2"}
    # A placement pass found images cannot go to n2 (say, its required affinity): n1, then.
    refusals = {(("datasets", "images"), "n2"): "it is not matching nodeAffinity"}
    refused = held(pod, [images, model], refused=lambda volume, node: refusals.get((volume, node)))
    assert refused is not None
    assert refused.moves == {("datasets", "model"): "n1"}
    # Neither way: the pod is told why, and what to change; nothing moves.
    stuck = held(pod, [images, model], fits=lambda node: node != "n1", refused=lambda v, n: refusals.get((v, n)))
    assert stuck is not None
    assert stuck.moves == {}
    assert stuck.message == (
        "no node holds all of its volumes (images on n1; model on n2), and none can: the pod's own node "
        "selection excludes n1; images cannot go to n2: it is not matching nodeAffinity. Widen the volumes' "
        "nodeAffinity (or the pod's), or ask for them in separate pods"
    )


def test_a_move_planned_for_one_pod_counts_for_the_next() -> None:
    """P1 needs x and y, P2 y and z: y goes to one node for both, not to two."""
    x, y, z = local("x", {"n1"}), local("y", {"n2"}), local("z", {"n3"})
    first = held(asking("x", "y"), [x, y, z])
    assert first is not None
    assert first.moves == {("datasets", "y"): "n1"}
    second = held(asking("y", "z"), [x, y, z], planned=dict(first.moves))
    assert second is not None
    # n1 will hold y: z joins it there (without the plan: y to n1 for P1, y to n2 for P2).
    assert second.moves == {("datasets", "y"): "n1", ("datasets", "z"): "n1"}
    assert held(asking("y", "z"), [x, y, z]).moves == {("datasets", "z"): "n2"}  # type: ignore[union-attr]


def test_a_pod_that_waiting_will_not_release_is_told_why() -> None:
    failed = CatalogEntry("datasets", "cifar", "Failed", "access denied to s3://b/", SOURCE, AFFINITY, "ReadOnlyMany")
    why = held(gated_pod(), [failed])
    assert why is not None
    assert why.reason == "DataUnavailable"
    assert why.message.startswith("volume cifar is Failed: access denied to s3://b/")
    assert why.moves == {}
    gone = held(gated_pod(), [])
    assert gone is not None
    assert "volume cifar not found in namespace team-a" in gone.message
    # Still being provisioned, not reported yet, or together already: waiting is the answer.
    assert held(gated_pod(), [entry("Provisioning")]) is None
    unreported = CatalogEntry("datasets", "cifar", "Pending", "not provisioned yet", None, None, "ReadOnlyMany")
    assert held(gated_pod(), [unreported]) is None
    assert held(asking("a", "b"), [local("a", {"n1"}), local("b", set(), phase="Provisioning")]) is None


def test_wishes_follow_the_gated_pods_and_linger_after_them() -> None:
    clock = FakeClock()
    together = Together(linger_seconds=20, clock=clock)
    assert together.replace("team-a", {("models", "bert"): "n1"}) == {"models"}
    assert together.replace("team-a", {("models", "bert"): "n1"}) == set()  # unchanged: no pass is woken
    assert together.of("team-a", "models") == {"bert": "n1"}
    assert together.wishes("team-a") == {("models", "bert"): "n1"}
    assert together.of("team-b", "models") == {}
    assert together.of("team-a", "datasets") == {}
    # The pods were released: the wish stays a while, until they are bound.
    clock.now += 10
    together.replace("team-a", {})
    assert together.of("team-a", "models") == {"bert": "n1"}
    clock.now += 11
    assert together.of("team-a", "models") == {}
    together.replace("team-a", {})
    assert together.replace("team-a", {("models", "bert"): "n2"}) == {"models"}


def test_a_refused_node_drops_its_wish_and_is_remembered_for_a_while() -> None:
    clock = FakeClock()
    together = Together(linger_seconds=20, clock=clock)
    together.replace("team-a", {("models", "bert"): "n1"})
    together.refuse("team-a", ("models", "bert"), "n1", "it is short of free disk")
    assert together.of("team-a", "models") == {}
    assert together.refusal("team-a", ("models", "bert"), "n1") == "it is short of free disk"
    assert together.refusal("team-a", ("models", "bert"), "n2") is None
    assert together.refusal("team-b", ("models", "bert"), "n1") is None
    clock.now += 21
    assert together.refusal("team-a", ("models", "bert"), "n1") is None
