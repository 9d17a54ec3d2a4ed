from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import jsonpatch
import pytest
from hypothesis import given, settings

from kvc.testing import strategies as pod_strategies
from kvc.wiring import grammar, mutation
from kvc.wiring.mutation import (
    GATE,
    INJECTED,
    TRAINJOB_MANAGER,
    MutationError,
    ResolvedVolume,
    pod_templates,
    wire_job,
    wire_pod,
)

LABEL = "data.kvc.kubeflow.org/team-a-datasets-cifar-0123456789"


def s3_volume(volume_id: str = "cifar", phase: str = "Ready", label: str = LABEL) -> ResolvedVolume:
    return ResolvedVolume(
        ref=grammar.VolumeRef(volume_id),
        manager="datasets",
        volume_id=volume_id,
        phase=phase,
        message="2/2 replicas ready",
        volume_source={"hostPath": {"path": f"/var/lib/kvc/team-a/datasets/{volume_id}-x", "type": "Directory"}},
        node_affinity={
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": label, "operator": "Exists"}]}]
            }
        },
        access_mode="ReadOnlyMany",
    )


def nfs_volume(volume_id: str = "shared") -> ResolvedVolume:
    return ResolvedVolume(
        ref=grammar.VolumeRef(volume_id),
        manager="datasets",
        volume_id=volume_id,
        phase="Ready",
        message="bound",
        volume_source={"persistentVolumeClaim": {"claimName": f"datasets-{volume_id}-abc", "readOnly": False}},
        node_affinity=None,
        access_mode="ReadWriteMany",
    )


def pod(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "annotations": {}},
        "spec": {"containers": [{"name": "main", "image": "x"}, {"name": "sidecar", "image": "y"}], **spec},
    }


def request(annotations: dict[str, str]) -> grammar.VolumeRequest:
    parsed = grammar.parse(annotations)
    assert parsed is not None
    return parsed


def test_ready_hostpath_volume_is_mounted_read_only_everywhere_with_node_affinity() -> None:
    wired = wire_pod(pod(), request({"kvc/volume": "cifar"}), [s3_volume()])
    spec = wired["spec"]
    assert spec["volumes"] == [
        {
            "name": "kvc-datasets-cifar",
            "hostPath": {"path": "/var/lib/kvc/team-a/datasets/cifar-x", "type": "Directory"},
        }
    ]
    for container in spec["containers"]:
        assert container["volumeMounts"] == [
            {"name": "kvc-datasets-cifar", "mountPath": "/var/datasets/cifar", "readOnly": True}
        ]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": LABEL, "operator": "Exists"}]}]
    assert "schedulingGates" not in spec
    assert json.loads(wired["metadata"]["annotations"][INJECTED]) == ["kvc-datasets-cifar"]


def test_expressions_are_anded_into_every_existing_term_and_preferred_terms_are_kept() -> None:
    existing = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]},
                ]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "preference": {"matchExpressions": [{"key": "ssd", "operator": "Exists"}]}}
            ],
        }
    }
    other = "data.kvc.kubeflow.org/team-a-datasets-imagenet-9"
    wired = wire_pod(
        pod(affinity=existing),
        request({"kvc/volume": "cifar,imagenet"}),
        [s3_volume(), s3_volume("imagenet", label=other)],
    )
    node_affinity = wired["spec"]["affinity"]["nodeAffinity"]
    for term in node_affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]:
        keys = [e["key"] for e in term["matchExpressions"]]
        assert keys == ["zone", LABEL, other]
    assert (
        node_affinity["preferredDuringSchedulingIgnoredDuringExecution"]
        == existing["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    )


def test_pvc_volume_has_no_affinity_and_honours_writable_mounts() -> None:
    wired = wire_pod(
        pod(), request({"kvc/volume": "shared", "kvc/read-only": "false", "kvc/containers": "main"}), [nfs_volume()]
    )
    spec = wired["spec"]
    assert spec["volumes"][0]["persistentVolumeClaim"] == {"claimName": "datasets-shared-abc", "readOnly": False}
    assert "affinity" not in spec
    assert spec["containers"][0]["volumeMounts"][0]["readOnly"] is False
    assert "volumeMounts" not in spec["containers"][1]


def test_init_containers_only_when_named() -> None:
    base = pod(initContainers=[{"name": "fetch", "image": "z"}])
    assert (
        "volumeMounts"
        not in wire_pod(base, request({"kvc/volume": "cifar"}), [s3_volume()])["spec"]["initContainers"][0]
    )
    named = wire_pod(base, request({"kvc/volume": "cifar", "kvc/containers": "fetch"}), [s3_volume()])
    assert named["spec"]["initContainers"][0]["volumeMounts"][0]["mountPath"] == "/var/datasets/cifar"
    assert "volumeMounts" not in named["spec"]["containers"][0]


def test_provisioning_data_gates_the_pod_instead_of_pinning_it() -> None:
    wired = wire_pod(pod(), request({"kvc/volume": "cifar"}), [s3_volume(phase="Provisioning")])
    assert wired["spec"]["schedulingGates"] == [{"name": GATE}]
    assert "affinity" not in wired["spec"]
    assert wired["spec"]["volumes"][0]["name"] == "kvc-datasets-cifar"


@pytest.mark.parametrize(
    ("spec", "annotations", "volumes", "message"),
    [
        ({"nodeName": "n1"}, {"kvc/volume": "cifar"}, [s3_volume(phase="Provisioning")], "the pod sets spec.nodeName"),
        (
            {},
            {"kvc/volume": "cifar", "kvc/read-only": "false"},
            [s3_volume()],
            'is ReadOnlyMany: kvc/read-only "false" is not allowed',
        ),
        (
            {"volumes": [{"name": "kvc-datasets-cifar", "emptyDir": {}}]},
            {"kvc/volume": "cifar"},
            [s3_volume()],
            "already has a volume named kvc-datasets-cifar",
        ),
        (
            {
                "containers": [
                    {
                        "name": "main",
                        "image": "x",
                        "volumeMounts": [{"name": "cache", "mountPath": "/var/datasets/cifar"}],
                    }
                ]
            },
            {"kvc/volume": "cifar"},
            [s3_volume()],
            "container main already mounts cache at /var/datasets/cifar",
        ),
        (
            {},
            {"kvc/volume": "cifar", "kvc/containers": "trainer"},
            [s3_volume()],
            "kvc/containers names trainer, which the pod does not have (main, sidecar)",
        ),
    ],
)
def test_conflicts_are_refused_with_what_to_fix(
    spec: dict[str, Any], annotations: dict[str, str], volumes: list[ResolvedVolume], message: str
) -> None:
    with pytest.raises(MutationError) as excinfo:
        wire_pod(pod(**spec), request(annotations), volumes)
    assert message in str(excinfo.value)


@pytest.mark.parametrize(
    "volumes",
    [[s3_volume()], [s3_volume(phase="Provisioning")], [nfs_volume(), s3_volume()]],
)
def test_a_second_pass_changes_nothing_and_the_patch_applies(volumes: list[ResolvedVolume]) -> None:
    annotations = {"kvc/volume": ",".join(v.volume_id for v in volumes)}
    original = pod()
    once = wire_pod(original, request(annotations), volumes)
    assert wire_pod(once, request(annotations), volumes) == once
    assert jsonpatch.make_patch(once, wire_pod(once, request(annotations), volumes)).patch == []
    patch = jsonpatch.make_patch(original, once)
    assert patch.apply(copy.deepcopy(original)) == once
    assert original == pod()  # the input is never modified


def test_every_replica_template_of_a_tfjob_is_wired_and_gets_the_annotations() -> None:
    template = {"metadata": {}, "spec": {"containers": [{"name": "tensorflow", "image": "tf"}]}}
    job: dict[str, Any] = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "TFJob",
        "metadata": {"name": "train", "annotations": {"kvc/volume": "cifar", "kvc/mount-path": "/data", "team": "x"}},
        "spec": {
            "tfReplicaSpecs": {
                "Chief": {"template": copy.deepcopy(template)},
                "Worker": {"replicas": 4, "template": copy.deepcopy(template)},
            }
        },
    }
    wired = wire_job(job, request(job["metadata"]["annotations"]), [s3_volume()])
    for role in ("Chief", "Worker"):
        pod_template = wired["spec"]["tfReplicaSpecs"][role]["template"]
        assert pod_template["metadata"]["annotations"]["kvc/volume"] == "cifar"
        assert pod_template["metadata"]["annotations"]["kvc/mount-path"] == "/data"
        assert "team" not in pod_template["metadata"]["annotations"]
        assert pod_template["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == "/data"
        assert pod_template["spec"]["affinity"]["nodeAffinity"]
    assert wired["spec"]["tfReplicaSpecs"]["Worker"]["replicas"] == 4


def test_a_job_without_replica_specs_is_refused() -> None:
    with pytest.raises(MutationError, match=r"PyTorchJob has no spec\.pytorchReplicaSpecs to wire"):
        wire_job({"kind": "PyTorchJob", "spec": {}}, request({"kvc/volume": "cifar"}), [s3_volume()])


@settings(max_examples=400, deadline=None)
@given(pod_strategies.cases())
def test_wiring_any_pod_refuses_exactly_the_bad_requests_and_otherwise_patches_cleanly(
    case: pod_strategies.Case,
) -> None:
    original = copy.deepcopy(case.pod)
    try:
        wired = wire_pod(case.pod, case.request, case.volumes)
    except MutationError:
        assert pod_strategies.expected_refusal(case)
        return
    assert not pod_strategies.expected_refusal(case)
    assert case.pod == original  # the input is never modified
    patch = jsonpatch.make_patch(original, wired)
    assert patch.apply(copy.deepcopy(original)) == wired
    assert jsonpatch.make_patch(wired, wire_pod(wired, case.request, case.volumes)).patch == []

    spec, before = wired["spec"], original["spec"]
    request = case.request
    assert spec["volumes"][: len(before["volumes"])] == before["volumes"]
    targets = {c["name"] for c in spec["containers"]} if request.containers is None else set(request.containers)
    for container in [*spec["containers"], *spec.get("initContainers", [])]:
        kvc_mounts = {m["mountPath"]: m for m in container.get("volumeMounts", []) if m["name"].startswith("kvc-")}
        if container["name"] in targets:
            assert set(kvc_mounts) == set(request.mount_paths.values())
            assert all(m["readOnly"] is request.read_only for m in kvc_mounts.values())
        else:
            assert not kvc_mounts

    data = [e for v in case.volumes for e in mutation.data_expressions([v])]
    before_affinity = (before.get("affinity") or {}).get("nodeAffinity") or {}
    after_affinity = (spec.get("affinity") or {}).get("nodeAffinity") or {}
    assert after_affinity.get("preferredDuringSchedulingIgnoredDuringExecution") == before_affinity.get(
        "preferredDuringSchedulingIgnoredDuringExecution"
    )
    if all(v.ready for v in case.volumes):
        assert {"name": GATE} not in spec.get("schedulingGates", [])
        required = after_affinity.get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms")
        if data:
            old_terms = before_affinity.get("requiredDuringSchedulingIgnoredDuringExecution", {}).get(
                "nodeSelectorTerms"
            ) or [{"matchExpressions": []}]
            assert len(required) == len(old_terms)
            for old, new in zip(old_terms, required, strict=True):
                assert new["matchExpressions"][: len(old["matchExpressions"])] == old["matchExpressions"]
                assert all(e in new["matchExpressions"] for e in data)
        else:
            assert spec.get("affinity") == before.get("affinity")
    else:
        assert spec["schedulingGates"][-1] == {"name": GATE}
        assert spec.get("affinity") == before.get("affinity")


def claim_volume(volume_id: str = "cifar") -> ResolvedVolume:
    """Node-local data as the webhook wires it by default: through its claim."""
    return dataclasses.replace(
        s3_volume(volume_id),
        volume_source={"persistentVolumeClaim": {"claimName": f"datasets-{volume_id}-0123456789"}},
        access_mode="ReadWriteOnce",
    )


def test_node_local_data_is_a_read_only_claim_with_the_data_affinity() -> None:
    wired = wire_pod(pod(), request({"kvc/volume": "cifar"}), [claim_volume()])
    spec = wired["spec"]
    assert spec["volumes"] == [
        {
            "name": "kvc-datasets-cifar",
            "persistentVolumeClaim": {"claimName": "datasets-cifar-0123456789", "readOnly": True},
        }
    ]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": LABEL, "operator": "Exists"}]}]


def test_a_read_only_volume_is_read_only_in_every_container_that_mounts_it_whoever_wrote_the_mount() -> None:
    # The user mounts our volume writable in an init container and a container the
    # annotations did not name: the webhook makes those mounts read-only too.
    writable = {"name": "kvc-datasets-cifar", "mountPath": "/own", "readOnly": False}
    original = pod(
        initContainers=[{"name": "prep", "image": "x", "volumeMounts": [dict(writable)]}],
    )
    original["spec"]["containers"][1]["volumeMounts"] = [dict(writable)]
    wired = wire_pod(original, request({"kvc/volume": "cifar", "kvc/containers": "main"}), [claim_volume()])
    spec = wired["spec"]
    assert spec["initContainers"][0]["volumeMounts"] == [{**writable, "readOnly": True}]
    assert spec["containers"][1]["volumeMounts"] == [{**writable, "readOnly": True}]
    assert spec["containers"][0]["volumeMounts"][0]["readOnly"] is True
    # A writable request leaves the user's mounts as they are.
    rwo = wire_pod(original, request({"kvc/volume": "cifar", "kvc/read-only": "false"}), [claim_volume()])
    assert rwo["spec"]["initContainers"][0]["volumeMounts"] == [writable]


@pytest.mark.parametrize("volume", [claim_volume(), s3_volume()], ids=["claim", "hostPath"])
def test_an_ephemeral_container_gets_only_read_only_mounts_of_read_only_kvc_volumes(volume: ResolvedVolume) -> None:
    wired = wire_pod(pod(), request({"kvc/volume": "cifar"}), [volume])
    debug = {
        "name": "debugger",
        "image": "busybox",
        "volumeMounts": [
            {"name": "kvc-datasets-cifar", "mountPath": "/data"},
            {"name": "kvc-datasets-cifar", "mountPath": "/again", "readOnly": False},
        ],
    }
    wired["spec"]["ephemeralContainers"] = [debug]
    guarded = mutation.guard_ephemeral_containers(wired)
    assert [m["readOnly"] for m in guarded["spec"]["ephemeralContainers"][0]["volumeMounts"]] == [True, True]
    assert guarded["spec"]["containers"] == wired["spec"]["containers"]


def test_an_ephemeral_container_may_write_what_the_pod_was_wired_to_write() -> None:
    wired = wire_pod(pod(), request({"kvc/volume": "shared", "kvc/read-only": "false"}), [nfs_volume()])
    mount = {"name": "kvc-datasets-shared", "mountPath": "/data", "readOnly": False}
    wired["spec"]["ephemeralContainers"] = [{"name": "debugger", "image": "busybox", "volumeMounts": [mount]}]
    assert mutation.guard_ephemeral_containers(wired) == wired
    # Volumes the pod has of its own are not KVC's to judge.
    own = pod(volumes=[{"name": "own", "persistentVolumeClaim": {"claimName": "c", "readOnly": True}}])
    own["spec"]["ephemeralContainers"] = [
        {"name": "debugger", "image": "busybox", "volumeMounts": [{"name": "own", "mountPath": "/o"}]}
    ]
    assert mutation.guard_ephemeral_containers(own) == own


def test_a_pod_made_from_a_template_wired_to_an_earlier_source_keeps_that_data() -> None:
    """A TFJob's worker created after the volume's source changed: same data as its job's other
    workers (the template's claim and affinity), neither refused nor pointed at the new data."""
    old_label = "data.kvc.kubeflow.org/team-a-datasets-cifar-old0000000"
    earlier = dataclasses.replace(
        claim_volume(),
        volume_source={"persistentVolumeClaim": {"claimName": "datasets-cifar-old0000000"}},
        node_affinity={
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": old_label, "operator": "Exists"}]}]
            }
        },
    )
    template = wire_pod(pod(), request({"kvc/volume": "cifar"}), [earlier])
    from_template = wire_pod(template, request({"kvc/volume": "cifar"}), [claim_volume()])
    assert from_template == template


def test_a_volume_of_the_same_name_that_kvc_did_not_add_is_still_refused() -> None:
    foreign = pod(volumes=[{"name": "kvc-datasets-cifar", "persistentVolumeClaim": {"claimName": "mine"}}])
    with pytest.raises(MutationError, match="already has a volume named kvc-datasets-cifar with another source"):
        wire_pod(foreign, request({"kvc/volume": "cifar"}), [claim_volume()])


# --------------------------------------------------------------------------- training workloads


def template(container: str = "main", annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"annotations": annotations or {}}, "spec": {"containers": [{"name": container, "image": "x"}]}}


def jobset_object(annotations: dict[str, str], **templates: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": "js", "annotations": annotations},
        "spec": {
            "replicatedJobs": [
                {"name": name, "replicas": 2, "template": {"spec": {"parallelism": 4, "template": pod_template}}}
                for name, pod_template in templates.items()
            ]
        },
    }


def lws_object(annotations: dict[str, str], worker: dict[str, Any], leader: dict[str, Any] | None) -> dict[str, Any]:
    groups: dict[str, Any] = {"size": 4, "workerTemplate": worker}
    if leader is not None:
        groups["leaderTemplate"] = leader
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": "lws", "annotations": annotations},
        "spec": {"replicas": 2, "leaderWorkerTemplate": groups},
    }


def trainjob_object(annotations: dict[str, str], patches: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"runtimeRef": {"name": "torch-distributed"}, "trainer": {"numNodes": 4}}
    if patches is not None:
        spec["runtimePatches"] = patches
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": "tj", "annotations": annotations},
        "spec": spec,
    }


def node_patch(manager: str, pod_template: dict[str, Any]) -> dict[str, Any]:
    """A TrainJob runtime patch of the training node's pod template."""
    node = {"name": "node", "template": {"spec": {"template": pod_template}}}
    return {"manager": manager, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node]}}}}


ASKS = {"kvc/volume": "cifar", "kvc/mount-path": "/data", "team": "vision"}


@pytest.mark.parametrize(
    ("job", "containers"),
    [
        (jobset_object(ASKS, driver=template("driver"), workers=template("worker")), ["driver", "worker"]),
        (lws_object(ASKS, worker=template("worker"), leader=template("leader")), ["worker", "leader"]),
        (lws_object(ASKS, worker=template("worker"), leader=None), ["worker"]),
    ],
    ids=["jobset", "leaderworkerset", "leaderworkerset-without-leader"],
)
def test_every_pod_template_of_a_jobset_or_leaderworkerset_is_wired_and_gets_the_annotations(
    job: dict[str, Any], containers: list[str]
) -> None:
    original = copy.deepcopy(job)
    wired = wire_job(job, request(ASKS), [s3_volume()])
    templates = pod_templates(wired)
    assert [t.template["spec"]["containers"][0]["name"] for t in templates] == containers
    for found in templates:
        annotations = found.template["metadata"]["annotations"]
        assert annotations["kvc/volume"] == "cifar"
        assert annotations["kvc/mount-path"] == "/data"
        assert "team" not in annotations  # only KVC's own annotations are copied
        assert json.loads(annotations[INJECTED]) == ["kvc-datasets-cifar"]
        (mount,) = found.template["spec"]["containers"][0]["volumeMounts"]
        assert mount == {"name": "kvc-datasets-cifar", "mountPath": "/data", "readOnly": True}
        assert found.template["spec"]["affinity"]["nodeAffinity"]
    # Everything but the templates is left as it was; a second pass (reinvocation) adds nothing.
    assert {k: v for k, v in wired.items() if k != "spec"} == {k: v for k, v in original.items() if k != "spec"}
    assert wire_job(wired, request(ASKS), [s3_volume()]) == wired
    assert jsonpatch.make_patch(original, wired).apply(copy.deepcopy(original)) == wired
    assert job == original


def test_replicated_job_fields_around_the_template_are_kept() -> None:
    wired = wire_job(jobset_object(ASKS, workers=template()), request(ASKS), [s3_volume(phase="Pending")])
    (workers,) = wired["spec"]["replicatedJobs"]
    assert (workers["name"], workers["replicas"], workers["template"]["spec"]["parallelism"]) == ("workers", 2, 4)
    pod_template = workers["template"]["spec"]["template"]
    assert pod_template["spec"]["schedulingGates"] == [{"name": GATE}]  # still provisioning: gated
    assert pod_template["metadata"]["labels"] == {"kvc.kubeflow.org/gated": "true"}


def kvc_patch(wired: dict[str, Any]) -> dict[str, Any]:
    (ours,) = [p for p in wired["spec"]["runtimePatches"] if p["manager"] == TRAINJOB_MANAGER]
    patch: dict[str, Any] = ours
    return patch


def test_a_trainjob_gets_a_runtime_patch_of_its_own_that_wires_the_training_node() -> None:
    others = [node_patch("kueue.x-k8s.io/manager", {"spec": {"nodeSelector": {"pool": "gpu"}}})]
    job = trainjob_object(ASKS, copy.deepcopy(others))
    wired = wire_job(job, request(ASKS), [claim_volume()])
    assert wired["spec"]["runtimePatches"][:1] == others  # other managers' patches are left alone
    assert wired["spec"]["runtimeRef"] == job["spec"]["runtimeRef"]
    ours = kvc_patch(wired)
    assert ours == node_patch(
        TRAINJOB_MANAGER,
        {
            "metadata": {
                "annotations": {
                    INJECTED: '["kvc-datasets-cifar"]',
                    "kvc/volume": "cifar",
                    "kvc/mount-path": "/data",
                }
            },
            "spec": {
                "containers": [
                    {
                        "name": "node",
                        "volumeMounts": [{"name": "kvc-datasets-cifar", "mountPath": "/data", "readOnly": True}],
                    }
                ],
                "volumes": [
                    {
                        "name": "kvc-datasets-cifar",
                        "persistentVolumeClaim": {"claimName": "datasets-cifar-0123456789", "readOnly": True},
                    }
                ],
            },
        },
    )
    # A second pass (reinvocation, or a TrainJob created from one read back) adds nothing.
    assert wire_job(wired, request(ASKS), [claim_volume()]) == wired
    assert jsonpatch.make_patch(job, wired).apply(copy.deepcopy(job)) == wired


@pytest.mark.parametrize("phase", ["Ready", "Pending"])
def test_a_trainjob_patch_leaves_the_node_affinity_and_the_gate_to_the_pod_hook(phase: str) -> None:
    """A patch's nodeSelectorTerms would replace the runtime's own, and a gate would hold pods
    made once the data is Ready: the pod hook adds either to each pod when it is made."""
    wired = wire_job(trainjob_object(ASKS), request(ASKS), [s3_volume(phase=phase)])
    node = kvc_patch(wired)["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod_template = node["template"]["spec"]["template"]
    assert set(pod_template["spec"]) == {"containers", "volumes"}
    assert "labels" not in pod_template["metadata"]
    # A pod made from the runtime's template with the patch merged in is placed by the pod hook.
    made = {
        "metadata": pod_template["metadata"],
        "spec": {"containers": [{"name": "node", "image": "torch", **pod_template["spec"]["containers"][0]}]},
    }
    made["spec"]["volumes"] = pod_template["spec"]["volumes"]
    placed = wire_pod(made, request(pod_template["metadata"]["annotations"]), [s3_volume(phase=phase)])
    assert placed["spec"]["volumes"] == made["spec"]["volumes"]
    assert placed["spec"]["containers"] == made["spec"]["containers"]
    if phase == "Ready":
        assert placed["spec"]["affinity"]["nodeAffinity"]
    else:
        assert placed["spec"]["schedulingGates"] == [{"name": GATE}]


def test_kvc_containers_on_a_trainjob_names_the_training_node_containers_to_mount_into() -> None:
    asks = {"kvc/volume": "cifar", "kvc/containers": "node,sidecar"}
    wired = wire_job(trainjob_object(asks), request(asks), [s3_volume()])
    node = kvc_patch(wired)["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    containers = node["template"]["spec"]["template"]["spec"]["containers"]
    assert [(c["name"], [m["mountPath"] for m in c["volumeMounts"]]) for c in containers] == [
        ("node", ["/var/datasets/cifar"]),
        ("sidecar", ["/var/datasets/cifar"]),
    ]


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (
            {"spec": {"containers": [{"name": "node", "volumeMounts": [{"name": "mine", "mountPath": "/data"}]}]}},
            r"TrainJob spec\.runtimePatches\[0\] \(manager example\.com/team\) mounts mine at /data in container "
            r"node: choose another path with kvc/mount-path\.cifar",
        ),
        (
            {"spec": {"volumes": [{"name": "kvc-datasets-cifar", "emptyDir": {}}]}},
            r"TrainJob spec\.runtimePatches\[0\] \(manager example\.com/team\) also has a volume named "
            r"kvc-datasets-cifar, which KVC adds: rename it",
        ),
    ],
)
def test_another_patch_that_would_replace_kvcs_volume_or_mount_is_refused(other: dict[str, Any], message: str) -> None:
    job = trainjob_object(ASKS, [node_patch("example.com/team", other)])
    with pytest.raises(MutationError, match=message):
        wire_job(job, request(ASKS), [s3_volume()])
    # Elsewhere (another path, another container) it merges with KVC's patch.
    elsewhere = {"spec": {"containers": [{"name": "node", "volumeMounts": [{"name": "mine", "mountPath": "/mine"}]}]}}
    wire_job(trainjob_object(ASKS, [node_patch("example.com/team", elsewhere)]), request(ASKS), [s3_volume()])


@pytest.mark.parametrize(
    ("job", "message"),
    [
        (jobset_object(ASKS), r"^JobSet has no spec\.replicatedJobs to wire$"),
        ({**jobset_object(ASKS), "spec": {}}, r"^JobSet has no spec\.replicatedJobs to wire$"),
        (
            {**jobset_object(ASKS), "spec": {"replicatedJobs": {"workers": {}}}},
            r"^JobSet spec\.replicatedJobs must be a list, not an object$",
        ),
        (
            {**jobset_object(ASKS), "spec": {"replicatedJobs": [{"name": "workers", "template": {"spec": {}}}]}},
            r"^JobSet has no pod template at spec\.replicatedJobs\[0\]\.template\.spec\.template$",
        ),
        (
            jobset_object(ASKS, workers={"metadata": {}, "spec": {"volumes": "data"}}),
            r"^JobSet spec\.replicatedJobs\[0\]\.template\.spec\.template spec\.volumes must be a list, not a string$",
        ),
        (
            {**lws_object(ASKS, template(), None), "spec": {"leaderWorkerTemplate": {"size": 2}}},
            r"^LeaderWorkerSet has no pod template at spec\.leaderWorkerTemplate\.workerTemplate$",
        ),
        (
            lws_object(ASKS, worker=template(), leader=[]),  # type: ignore[arg-type]
            r"^LeaderWorkerSet spec\.leaderWorkerTemplate\.leaderTemplate must be an object, not a list$",
        ),
        (
            {**trainjob_object(ASKS), "spec": {"runtimePatches": {"manager": "x"}}},
            r"^TrainJob spec\.runtimePatches must be a list, not an object$",
        ),
        (
            trainjob_object(ASKS, [{"manager": TRAINJOB_MANAGER, "trainingRuntimeSpec": []}]),
            r"^TrainJob spec\.runtimePatches\[0\]\.trainingRuntimeSpec must be an object, not a list$",
        ),
        (
            trainjob_object(ASKS, [node_patch(TRAINJOB_MANAGER, {"spec": {"containers": "node"}})]),
            r"^TrainJob spec\.runtimePatches\[0\]\.trainingRuntimeSpec\.template\.spec\.replicatedJobs\[0\]"
            r"\.template\.spec\.template spec\.containers must be a list, not a string$",
        ),
    ],
    ids=[
        "jobset-no-jobs",
        "jobset-empty-spec",
        "jobset-jobs-not-a-list",
        "jobset-no-pod-template",
        "jobset-template-volumes",
        "lws-no-worker",
        "lws-leader-not-an-object",
        "trainjob-patches-not-a-list",
        "trainjob-patch-not-an-object",
        "trainjob-containers-not-a-list",
    ],
)
def test_a_malformed_workload_is_refused_naming_the_field(job: dict[str, Any], message: str) -> None:
    with pytest.raises(MutationError, match=message):
        wire_job(job, request(ASKS), [s3_volume()])


def test_templates_are_read_leniently_where_a_refusal_is_not_wanted() -> None:
    """The fast path and the controller read stored workloads: a malformed part holds no template."""
    job = jobset_object(ASKS, workers=template())
    job["spec"]["replicatedJobs"].append("not a job")
    assert [t.where for t in pod_templates(job, strict=False)] == ["spec.replicatedJobs[0].template.spec.template"]
    with pytest.raises(MutationError, match=r"JobSet spec\.replicatedJobs\[1\] must be an object, not a string"):
        pod_templates(job)
