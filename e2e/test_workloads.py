"""TrainJob, JobSet and LeaderWorkerSet, under the CRDs their projects publish (pinned in
e2e/manifests): KVC wires the stored objects, and the pods their operators would make from
them land on the nodes holding the data, with the data mounted.

No operator runs here: the pods are made from the stored objects' templates as each operator
makes them (``operator_pods``), so what the CRDs prune from a wired template is missing
from its pods too.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client

from e2e.cluster import ControlPlane
from e2e.helpers import (
    VolumeManagers,
    apply_workload_crds,
    create_workload,
    jobset,
    leaderworkerset,
    operator_pods,
    read_workload,
    s3_config,
    trainjob,
    trainjob_runtime_node,
    wait_for,
    wait_running,
)
from e2e.kvc import KvcAgent, KvcController, KvcWebhook
from e2e.s3server import S3Server
from kvc.wiring.mutation import GATE, INJECTED, TRAINJOB_MANAGER

VOLUME = "kvc-datasets-cifar"


@pytest.fixture
def vms(
    api: Any, namespace: str, controller: KvcController, agents: dict[str, KvcAgent], webhook: KvcWebhook
) -> VolumeManagers:
    return VolumeManagers(api, namespace)


@pytest.fixture(scope="module")
def workload_crds(control_plane: ControlPlane, kvc_crds: None) -> None:
    apply_workload_crds(control_plane)


def node_template(stored_trainjob: dict[str, Any]) -> dict[str, Any]:
    """The pod template KVC's runtime patch gives the TrainJob's training node."""
    (patch,) = [p for p in stored_trainjob["spec"]["runtimePatches"] if p["manager"] == TRAINJOB_MANAGER]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    template: dict[str, Any] = node["template"]["spec"]["template"]
    return template


def assert_wired(template: dict[str, Any], containers: list[str], mount_path: str) -> None:
    """A stored pod template (or runtime patch) carries the wiring: annotations, marker, claim, mounts."""
    annotations = template["metadata"]["annotations"]
    assert annotations["kvc/volume"] == "cifar"
    assert json.loads(annotations[INJECTED]) == [VOLUME]
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == VOLUME]
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    mounted = {c["name"]: c.get("volumeMounts", []) for c in template["spec"]["containers"]}
    for name in containers:
        assert {"name": VOLUME, "mountPath": mount_path, "readOnly": True} in mounted[name]


def test_trainjob_jobset_and_leaderworkerset_pods_land_on_the_data_nodes_with_the_data(
    vms: VolumeManagers,
    s3: S3Server,
    s3_data: str,
    api: Any,
    workload_crds: None,
) -> None:
    vms.create("datasets", [s3_config(s3, s3_data)])
    volume = vms.wait_state("datasets", "Running", timeout=120)["status"]["volumes"][0]
    holders = {n["name"] for n in volume["nodes"]}
    custom = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)
    ns = vms.namespace
    asks = {"kvc/volume": "cifar", "kvc/mount-path": "/data"}
    create_workload(custom, ns, trainjob("llama", asks, nodes=2))
    create_workload(custom, ns, jobset("resnet", asks, {"driver": 1, "workers": 2}))
    create_workload(custom, ns, leaderworkerset("serve", asks, size=3))

    # What the API server stored, after each CRD's pruning: the wiring survived it.
    stored_trainjob = read_workload(custom, ns, "TrainJob", "llama")
    assert_wired(node_template(stored_trainjob), ["node"], "/data")
    assert node_template(stored_trainjob)["metadata"]["annotations"]["kvc/mount-path"] == "/data"
    stored_jobset = read_workload(custom, ns, "JobSet", "resnet")
    for replicated in stored_jobset["spec"]["replicatedJobs"]:
        assert_wired(replicated["template"]["spec"]["template"], ["main"], "/data")
    stored_lws = read_workload(custom, ns, "LeaderWorkerSet", "serve")
    groups = stored_lws["spec"]["leaderWorkerTemplate"]
    assert_wired(groups["leaderTemplate"], ["leader"], "/data")
    assert_wired(groups["workerTemplate"], ["worker"], "/data")

    pods = [
        *operator_pods(stored_trainjob, trainjob_runtime_node()),
        *operator_pods(stored_jobset),
        *operator_pods(stored_lws),
    ]
    assert len(pods) == 2 + 3 + 3
    created = [core.create_namespaced_pod(ns, pod) for pod in pods]
    for pod in created:
        (kvc_volume,) = [v for v in pod.spec.volumes if v.name.startswith("kvc-")]  # the pod hook added no other
        assert kvc_volume.persistent_volume_claim.claim_name == volume["claimName"]
        mounts = [(m.name, m.mount_path, m.read_only) for m in pod.spec.containers[0].volume_mounts]
        assert (VOLUME, "/data", True) in mounts
        assert not pod.spec.scheduling_gates  # the data is Ready: placed at once
    for pod in created:
        running = wait_running(core, ns, pod.metadata.name)
        assert running.spec.node_name in holders, f"{pod.metadata.name} runs where the data is not"


def test_workload_pods_made_before_their_data_is_ready_wait_for_it_and_then_land_on_it(
    vms: VolumeManagers,
    s3: S3Server,
    s3_data: str,
    api: Any,
    workload_crds: None,
    agents: dict[str, KvcAgent],
) -> None:
    """A TrainJob's runtime patch carries no gate (its pods are gated by the pod hook when they
    are made); a JobSet's templates are gated when the job is wired. Either way the pods wait
    for the data, and are placed on it once it is Ready."""
    custom = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)
    ns = vms.namespace
    # Agents stopped: the replicas are assigned (their heartbeats are fresh) but nothing is
    # fetched, so the data stays pending while the workloads and their pods are made.
    for agent in agents.values():
        agent.stop()
    try:
        vms.create("datasets", [s3_config(s3, s3_data)])
        wait_for(lambda: vms.volume("datasets", "cifar").get("claimName"), what="the volume's claim")
        create_workload(custom, ns, trainjob("llama", {"kvc/volume": "cifar"}, nodes=2))
        create_workload(custom, ns, jobset("resnet", {"kvc/volume": "cifar"}, {"workers": 2}))
        stored_trainjob = read_workload(custom, ns, "TrainJob", "llama")
        assert "schedulingGates" not in node_template(stored_trainjob)["spec"]
        stored_jobset = read_workload(custom, ns, "JobSet", "resnet")
        (workers,) = stored_jobset["spec"]["replicatedJobs"]
        assert workers["template"]["spec"]["template"]["spec"]["schedulingGates"] == [{"name": GATE}]
        pods = [*operator_pods(stored_trainjob, trainjob_runtime_node()), *operator_pods(stored_jobset)]
        created = [core.create_namespaced_pod(ns, pod) for pod in pods]
        for pod in created:
            assert [gate.name for gate in pod.spec.scheduling_gates] == [GATE], pod.metadata.name
    finally:
        for agent in agents.values():
            agent.start()
    volume = vms.wait_state("datasets", "Running", timeout=120)["status"]["volumes"][0]
    holders = {n["name"] for n in volume["nodes"]}
    for pod in created:
        running = wait_running(core, ns, pod.metadata.name, timeout=120)
        assert running.spec.node_name in holders, f"{pod.metadata.name} runs where the data is not"
        assert [v.persistent_volume_claim.claim_name for v in running.spec.volumes if v.name == VOLUME] == [
            volume["claimName"]
        ]
