"""The admission webhook called by the real API server over TLS, with kube-scheduler
placing the wired pods."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from e2e.cluster import ControlPlane
from e2e.helpers import VolumeManagers, wait_for
from e2e.kvc import KvcAgent, KvcController, KvcWebhook
from e2e.s3server import S3Server, credentials_secret
from webhook.mutation import GATE, INJECTED


def annotated_pod(name: str, annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [{"name": "main", "image": "busybox:1.36", "command": ["sleep", "3600"]}]},
    }


@pytest.fixture(scope="module")
def webhook(control_plane: ControlPlane, api: Any, kvc_crds: None) -> Iterator[KvcWebhook]:
    running = KvcWebhook(control_plane).start()
    admission = client.AdmissionregistrationV1Api(api)
    registration = running.registration()
    admission.create_mutating_webhook_configuration(registration)
    core = client.CoreV1Api(api)

    def active() -> bool:
        # A request the webhook denies proves the API server now calls it.
        try:
            core.create_namespaced_pod("default", annotated_pod("probe", {"kvc/volume": "probe"}), dry_run="All")
        except ApiException as exc:
            return "KVC: volume probe not found" in str(exc.body)
        return False

    wait_for(active, what="the webhook registration to take effect")
    yield running
    admission.delete_mutating_webhook_configuration(registration["metadata"]["name"])
    running.stop()


@pytest.fixture
def vms(
    api: Any, namespace: str, controller: KvcController, agents: dict[str, KvcAgent], webhook: KvcWebhook
) -> VolumeManagers:
    return VolumeManagers(api, namespace)


@pytest.fixture
def s3_data(s3: S3Server, api: Any, namespace: str) -> str:
    s3_client = s3.client()
    bucket = f"hook-{namespace}"
    s3_client.create_bucket(Bucket=bucket)
    for i in range(20):
        s3_client.put_object(Bucket=bucket, Key=f"cifar/{i}.bin", Body=bytes([i]) * 1000)
    client.CoreV1Api(api).create_namespaced_secret(
        namespace,
        credentials_secret("aws-creds"),
    )
    return bucket


def s3_config(s3: S3Server, bucket: str, replicas: int = 2) -> dict[str, Any]:
    return {
        "id": "cifar",
        "sourceType": "S3",
        "replicas": replicas,
        "accessMode": "ReadOnlyMany",
        "options": {
            "sourceURL": f"s3://{bucket}/cifar/",
            "endpointURL": s3.endpoint_url,
            "awsCredentialsSecretName": "aws-creds",
        },
    }


def test_annotated_pods_are_wired_and_scheduled_onto_the_data_nodes(
    vms: VolumeManagers, s3: S3Server, s3_data: str, api: Any
) -> None:
    vms.create("datasets", [s3_config(s3, s3_data)])
    volume = vms.wait_state("datasets", "Running", timeout=120)["status"]["volumes"][0]
    holders = {n["name"] for n in volume["nodes"]}
    core = client.CoreV1Api(api)
    for i in range(6):
        core.create_namespaced_pod(vms.namespace, annotated_pod(f"trainer-{i}", {"kvc/volume": "cifar"}))

    def running(name: str) -> Any:
        pod = core.read_namespaced_pod(name, vms.namespace)
        return pod if pod.status.phase == "Running" else None

    for i in range(6):
        pod = wait_for(functools.partial(running, f"trainer-{i}"), what=f"trainer-{i} Running")
        assert pod.spec.node_name in holders
        (mount,) = pod.spec.containers[0].volume_mounts[-1:]
        assert mount.mount_path == "/var/datasets/cifar"
        assert mount.read_only is True
        kvc_volume = next(v for v in pod.spec.volumes if v.name == mount.name)
        assert kvc_volume.host_path.path == volume["volumeSource"]["hostPath"]["path"]
        assert json.loads(pod.metadata.annotations[INJECTED]) == [mount.name]


def test_a_plain_pod_is_admitted_unchanged(vms: VolumeManagers, api: Any) -> None:
    core = client.CoreV1Api(api)
    created = core.create_namespaced_pod(vms.namespace, annotated_pod("plain", {}))
    assert INJECTED not in (created.metadata.annotations or {})
    assert all(not v.name.startswith("kvc-") for v in created.spec.volumes or [])


def test_an_nfs_volume_arrives_as_a_pvc_mount(vms: VolumeManagers, api: Any) -> None:
    vms.create(
        "shared",
        [
            {
                "id": "scratch",
                "sourceType": "NFS",
                "accessMode": "ReadWriteMany",
                "options": {"server": "nfs.example.com", "path": "/x"},
            }
        ],
    )
    volume = vms.wait_state("shared", "Running")["status"]["volumes"][0]
    core = client.CoreV1Api(api)
    created = core.create_namespaced_pod(
        vms.namespace,
        annotated_pod("writer", {"kvc/volume": "scratch", "kvc/read-only": "false", "kvc/mount-path": "/scratch"}),
    )
    claim = next(v for v in created.spec.volumes if v.persistent_volume_claim is not None)
    assert claim.persistent_volume_claim.claim_name == volume["claimName"]
    assert created.spec.containers[0].volume_mounts[-1].mount_path == "/scratch"
    assert not created.spec.containers[0].volume_mounts[-1].read_only  # false is omitted by the API
    assert created.spec.affinity is None


def test_a_pod_for_data_still_downloading_is_gated(vms: VolumeManagers, s3: S3Server, s3_data: str, api: Any) -> None:
    vms.create("slow", [s3_config(s3, s3_data, replicas=5)])  # more replicas than nodes: never all Ready
    wait_for(lambda: vms.volume("slow", "cifar").get("volumeSource"), what="the volume to be reported")
    if vms.volume("slow", "cifar")["phase"] in ("Ready", "Degraded"):
        pytest.skip("the data became usable before the pod could be created")
    core = client.CoreV1Api(api)
    created = core.create_namespaced_pod(vms.namespace, annotated_pod("waiting", {"kvc/volume": "slow/cifar"}))
    assert [g.name for g in created.spec.scheduling_gates] == [GATE]


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({"kvc/volume": "nope"}, "KVC: volume nope not found in namespace"),
        ({"kvc/volume": "cifar", "kvc/read-only": "maybe"}, 'KVC: kvc/read-only must be "true" or "false"'),
        ({"kvc/volume": "Bad_Id"}, "KVC: kvc/volume: 'Bad_Id' is not a volume id"),
    ],
)
def test_denials_reach_kubectl_with_their_message(
    vms: VolumeManagers, control_plane: ControlPlane, annotations: dict[str, str], message: str
) -> None:
    manifest = {"apiVersion": "v1", "kind": "Pod", **annotated_pod("denied", annotations)}
    result = control_plane.kubectl(
        "apply", "-n", vms.namespace, "-f", "-", input_text=json.dumps(manifest), check=False
    )
    assert result.returncode != 0
    assert 'admission webhook "volumes.kvc.kubeflow.org" denied the request' in result.stderr
    assert message in result.stderr


def test_a_gated_pod_is_released_onto_a_data_node_when_its_data_turns_ready(
    vms: VolumeManagers, s3: S3Server, s3_data: str, api: Any
) -> None:
    core = client.CoreV1Api(api)
    label = f"kvc.test/gate-{vms.namespace}"
    only_there = {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": label, "operator": "Exists"}]}]
        }
    }
    vms.create("later", [{**s3_config(s3, s3_data, replicas=1), "nodeAffinity": only_there}])
    wait_for(lambda: vms.volume("later", "cifar").get("phase") == "Pending", what="Pending: no eligible node yet")
    created = core.create_namespaced_pod(vms.namespace, annotated_pod("patient", {"kvc/volume": "cifar"}))
    assert [g.name for g in created.spec.scheduling_gates] == [GATE]
    target = sorted(n.metadata.name for n in core.list_node().items if n.metadata.name.startswith("kvc-node-"))[0]
    core.patch_node(target, {"metadata": {"labels": {label: "yes"}}})
    try:
        pod = wait_for(
            lambda: (p := core.read_namespaced_pod("patient", vms.namespace)).status.phase == "Running" and p,
            timeout=120,
            what="the released pod to run",
        )
        assert pod.spec.node_name == target
        assert not pod.spec.scheduling_gates
        expressions = (
            pod.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution.node_selector_terms[
                0
            ].match_expressions
        )
        assert any(e.key.startswith("data.kvc.kubeflow.org/") for e in expressions)
    finally:
        core.patch_node(target, {"metadata": {"labels": {label: None}}})
