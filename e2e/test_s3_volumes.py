"""S3 volumes end to end: placement, agents fetching onto simulated nodes, node labels,
status, scheduling onto data nodes, healing and deletion."""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from e2e.cluster import ControlPlane, NodeSpec
from e2e.helpers import VolumeManagers, wait_for
from e2e.kvc import KvcAgent, KvcController
from e2e.s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server
from kvc.agent.files import MANIFEST
from kvc.api import names

DATA_LABEL_PREFIX = f"data.{names.GROUP}/"


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


@pytest.fixture
def dataset(s3: S3Server) -> tuple[str, dict[str, str]]:
    """A bucket with nested small files and a larger one; returns (bucket, relative path -> sha256)."""
    s3_client = s3.client()
    bucket = f"data-{uuid.uuid4().hex[:8]}"
    s3_client.create_bucket(Bucket=bucket)
    expected = {}
    objects = {f"cifar/train/batch-{i // 50}/img-{i:04d}.png": os.urandom(512 + i) for i in range(300)}
    objects["cifar/meta/labels.txt"] = b"\n".join(f"class-{i}".encode() for i in range(100))
    objects["cifar/big/archive.bin"] = os.urandom(6 * 1024 * 1024 + 3)
    for key, body in objects.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
        expected[key.removeprefix("cifar/")] = hashlib.sha256(body).hexdigest()
    return bucket, expected


@pytest.fixture
def credentials(api: Any, namespace: str) -> str:
    client.CoreV1Api(api).create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "aws-creds"},
            "data": {
                "awsAccessKeyID": base64.b64encode(ACCESS_KEY_ID.encode()).decode(),
                "awsSecretAccessKey": base64.b64encode(SECRET_ACCESS_KEY.encode()).decode(),
            },
        },
    )
    return "aws-creds"


def s3_volume(s3: S3Server, bucket: str, volume_id: str = "cifar", replicas: int = 2, **options: str) -> dict[str, Any]:
    return {
        "id": volume_id,
        "sourceType": "S3",
        "replicas": replicas,
        "accessMode": "ReadOnlyMany",
        "capacity": "100Mi",
        "labels": {"kind": "dataset"},
        "options": {
            "sourceURL": f"s3://{bucket}/cifar/",
            "endpointURL": s3.endpoint_url,
            "awsCredentialsSecretName": "aws-creds",
            **options,
        },
    }


def labelled_nodes(api: Any, label: str) -> list[str]:
    return sorted(n.metadata.name for n in client.CoreV1Api(api).list_node(label_selector=label).items)


@pytest.fixture
def vms(api: Any, namespace: str, controller: KvcController, agents: dict[str, KvcAgent]) -> VolumeManagers:
    return VolumeManagers(api, namespace)


def test_s3_data_lands_on_two_nodes_verified_labelled_and_schedulable(
    vms: VolumeManagers,
    s3: S3Server,
    dataset: tuple[str, dict[str, str]],
    credentials: str,
    agents: dict[str, KvcAgent],
    api: Any,
) -> None:
    bucket, expected = dataset
    vms.create("datasets", [s3_volume(s3, bucket)])
    vm = vms.wait_state("datasets", "Running", timeout=120)
    volume = vm["status"]["volumes"][0]
    assert volume["phase"] == "Ready"
    assert volume["replicas"] == {"desired": 2, "ready": 2}
    path = volume["volumeSource"]["hostPath"]["path"]
    assert path.startswith(f"/var/lib/kvc/{vms.namespace}/datasets/cifar-")
    assert volume["volumeSource"]["hostPath"]["type"] == "Directory"
    (term,) = volume["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (expression,) = term["matchExpressions"]
    label = expression["key"]
    assert expression["operator"] == "Exists"
    assert label.startswith(DATA_LABEL_PREFIX)

    holders = sorted(n["name"] for n in volume["nodes"])
    assert len(holders) == 2
    assert all(n["phase"] == "Ready" and n["bytes"] == n["totalBytes"] > 6_000_000 for n in volume["nodes"])
    assert labelled_nodes(api, label) == holders
    for node, agent in agents.items():
        local = agent.local(path)
        if node in holders:
            assert tree(local) == expected, f"data on {node} differs from the source"
        else:
            assert not local.exists()

    # kube-scheduler puts a pod with the volume's affinity on a node that holds the data.
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(
        vms.namespace,
        {
            "metadata": {"name": "trainer"},
            "spec": {
                "affinity": {"nodeAffinity": volume["nodeAffinity"]},
                "containers": [
                    {"name": "main", "image": "busybox:1.36", "volumeMounts": [{"name": "data", "mountPath": "/data"}]}
                ],
                "volumes": [{"name": "data", "hostPath": volume["volumeSource"]["hostPath"]}],
            },
        },
    )
    pod = wait_for(
        lambda: (p := core.read_namespaced_pod("trainer", vms.namespace)).spec.node_name and p, what="pod bound"
    )
    assert pod.spec.node_name in holders


def test_more_replicas_than_nodes_is_degraded_then_heals_when_a_node_joins(
    vms: VolumeManagers,
    s3: S3Server,
    dataset: tuple[str, dict[str, str]],
    credentials: str,
    control_plane: ControlPlane,
    api: Any,
) -> None:
    bucket, expected = dataset
    vms.create("wide", [s3_volume(s3, bucket, replicas=4)])

    def degraded() -> dict[str, Any] | None:
        volume = vms.volume("wide", "cifar")
        ready = (volume.get("replicas") or {}).get("ready")
        return volume if volume.get("phase") == "Degraded" and ready == 3 else None

    volume = wait_for(degraded, timeout=120, what="Degraded with 3 ready replicas")
    assert volume["message"] == ("3/4 replicas ready; only 3 of 4 replicas can be placed: 3 eligible nodes")
    assert vms.get("wide")["status"]["state"] == "Running"  # usable meanwhile
    name = f"kvc-extra-{uuid.uuid4().hex[:5]}"
    control_plane.add_nodes([NodeSpec(name)])
    extra = KvcAgent(control_plane, name).start()
    try:
        volume = wait_for(
            lambda: (v := vms.volume("wide", "cifar")).get("phase") == "Ready" and v,
            timeout=120,
            what="healed to Ready",
        )
        assert volume["replicas"] == {"desired": 4, "ready": 4}
        assert tree(extra.local(volume["volumeSource"]["hostPath"]["path"])) == expected
    finally:
        vms.delete("wide")
        wait_for(lambda: not vms.exists("wide"), what="deleted")
        extra.stop()
        client.CoreV1Api(api).delete_node(name)


def test_deleting_the_volumemanager_unlabels_nodes_and_removes_the_data(
    vms: VolumeManagers,
    s3: S3Server,
    dataset: tuple[str, dict[str, str]],
    credentials: str,
    agents: dict[str, KvcAgent],
    api: Any,
) -> None:
    bucket, _ = dataset
    vms.create("gone", [s3_volume(s3, bucket)])
    volume = vms.wait_state("gone", "Running", timeout=120)["status"]["volumes"][0]
    label = volume["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
        "matchExpressions"
    ][0]["key"]
    path = volume["volumeSource"]["hostPath"]["path"]
    holders = [n["name"] for n in volume["nodes"]]
    assert all(agents[n].local(path).is_dir() for n in holders)
    vms.delete("gone")
    wait_for(lambda: not vms.exists("gone"), what="VolumeManager gone")
    assert labelled_nodes(api, label) == []
    wait_for(lambda: not any(agents[n].local(path).exists() for n in holders), what="data deleted on the nodes")
    custom = client.CustomObjectsApi(api)
    for node in holders:
        vnode = custom.get_cluster_custom_object(names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL, node)
        assert not [
            r for r in vnode["spec"].get("replicas", []) if r["volumeId"] == "cifar" and vms.namespace in r["name"]
        ]


def test_a_replica_removed_from_disk_is_fetched_again(
    vms: VolumeManagers,
    s3: S3Server,
    dataset: tuple[str, dict[str, str]],
    credentials: str,
    agents: dict[str, KvcAgent],
) -> None:
    bucket, expected = dataset
    vms.create("wiped", [s3_volume(s3, bucket, replicas=1)])
    volume = vms.wait_state("wiped", "Running", timeout=120)["status"]["volumes"][0]
    node = volume["nodes"][0]["name"]
    local = agents[node].local(volume["volumeSource"]["hostPath"]["path"])
    victim = next(p for p in local.rglob("*.png"))
    victim.unlink()
    wait_for(lambda: tree(local) == expected if local.is_dir() else False, timeout=60, what="data restored")
    wait_for(lambda: vms.volume("wiped", "cifar").get("phase") == "Ready", what="Ready again")


def test_bad_s3_settings_fail_with_a_message_naming_the_field(vms: VolumeManagers, s3: S3Server) -> None:
    vms.create(
        "bad-s3",
        [
            {"id": "no-url", "sourceType": "S3", "options": {"awsCredentialsSecretName": "x"}},
            {
                "id": "bad-url",
                "sourceType": "S3",
                "options": {"sourceURL": "https://b/k", "awsCredentialsSecretName": "x"},
            },
            {
                "id": "plaintext",
                "sourceType": "S3",
                "options": {
                    "sourceURL": "s3://b/k",
                    "awsCredentialsSecretName": "x",
                    "endpointURL": "http://minio.example.com",
                },
            },
            {
                "id": "timeout",
                "sourceType": "S3",
                "options": {"sourceURL": "s3://b/k", "awsCredentialsSecretName": "x", "timeoutForDataDownload": "ten"},
            },
        ],
    )
    vm = vms.wait_state("bad-s3", "Failed")
    messages = {v["id"]: v["message"] for v in vm["status"]["volumes"]}
    assert messages["no-url"] == (
        "options.sourceURL is required for S3 volumes: "
        "s3://bucket/key for one object, or s3://bucket/prefix/ for every object under it"
    )
    assert messages["bad-url"] == "options.sourceURL must start with s3://, not 'https://b/k'"
    assert messages["plaintext"].startswith("options.endpointURL uses plaintext http")
    assert messages["timeout"] == "options.timeoutForDataDownload: 'ten' is not a Go duration such as 90s, 10m or 1h30m"


def test_missing_credentials_secret_is_reported_by_the_agent(
    vms: VolumeManagers, s3: S3Server, dataset: tuple[str, dict[str, str]]
) -> None:
    bucket, _ = dataset
    vms.create("nocreds", [s3_volume(s3, bucket, replicas=1)])
    volume = wait_for(
        lambda: (v := vms.volume("nocreds", "cifar")).get("phase") == "Failed" and v, timeout=60, what="Failed"
    )
    assert f"credentials Secret aws-creds not found in namespace {vms.namespace}" in volume["message"]
