"""S3 volumes end to end: placement, agents fetching onto simulated nodes, node labels,
status, scheduling onto data nodes, healing and deletion."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from e2e.cluster import ControlPlane, NodeSpec
from e2e.helpers import VolumeManagers, restricted_container, restricted_pod, tree, wait_for
from e2e.kvc import KvcAgent, KvcController
from e2e.s3server import SECRET_ACCESS_KEY, S3Server, authenticating_server, credentials_secret
from kvc.api import names

DATA_LABEL_PREFIX = f"data.{names.GROUP}/"


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
        credentials_secret("aws-creds"),
    )
    return "aws-creds"


def s3_volume(
    s3: S3Server, bucket: str, volume_id: str = "cifar", replicas: int = 2, capacity: str = "100Mi", **options: str
) -> dict[str, Any]:
    return {
        "id": volume_id,
        "sourceType": "S3",
        "replicas": replicas,
        "accessMode": "ReadOnlyMany",
        "capacity": capacity,
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

    # kube-scheduler puts a pod that mounts the volume's claim on a node that holds the data:
    # the claim's PV requires the data label, whatever the pod's own affinity says.
    assert volume["claimName"]
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(
        vms.namespace,
        restricted_pod(
            "trainer",
            containers=[restricted_container(volumeMounts=[{"name": "data", "mountPath": "/data"}])],
            volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": volume["claimName"], "readOnly": True}}],
        ),
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
    # The claim workloads mount, its PV, and the agents' copy of the credentials exist...
    core = client.CoreV1Api(api)
    uid = vms.get("gone")["metadata"]["uid"]
    assert [c.metadata.name for c in vms.claims("gone")] == [volume["claimName"]]
    assert [v.metadata.name for v in vms.volumes_of(uid)] == [volume["persistentVolumeName"]]
    selector = f"{names.LABEL_VOLUMEMANAGER_UID}={uid}"
    (copied,) = core.list_namespaced_secret(names.DEFAULT_CREDENTIALS_NAMESPACE, label_selector=selector).items
    assert copied.metadata.annotations["kvc.kubeflow.org/source-secret"] == f"{vms.namespace}/{credentials}"
    custom = client.CustomObjectsApi(api)
    vnode = custom.get_cluster_custom_object(names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL, holders[0])
    (assigned,) = [r for r in vnode["spec"]["replicas"] if r["volumeManager"]["uid"] == uid]
    assert assigned["credentialsSecret"] == {
        "namespace": names.DEFAULT_CREDENTIALS_NAMESPACE,
        "name": copied.metadata.name,
        "source": {"namespace": vms.namespace, "name": credentials},
    }
    vms.delete("gone")
    wait_for(lambda: not vms.exists("gone"), what="VolumeManager gone")
    # ...and go with it.
    assert not core.list_namespaced_secret(names.DEFAULT_CREDENTIALS_NAMESPACE, label_selector=selector).items
    wait_for(lambda: not vms.volumes_of(uid), what="the PV removed")
    assert core.read_namespaced_secret(credentials, vms.namespace)  # the user's own Secret stays
    assert labelled_nodes(api, label) == []
    wait_for(lambda: not any(agents[n].local(path).exists() for n in holders), what="data deleted on the nodes")
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
    wait_for(lambda: tree_if_present(local) == expected, timeout=60, what="data restored")
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


# --------------------------------------------------------------------------- healing and failures


def _partial_download(agents: dict[str, KvcAgent], namespace: str) -> tuple[str, Path] | None:
    """(node, staging directory) of a replica of ``namespace`` being downloaded right now."""
    for node, agent in agents.items():
        for staging in (agent.data_root / namespace).glob("*/*.partial"):
            if any(p.is_file() and p.stat().st_size > 0 for p in staging.rglob("*")):
                return node, staging
    return None


def tree_if_present(local: Path) -> dict[str, str] | None:
    """The tree of a replica the agent may be moving right now (it repairs out of sight)."""
    try:
        return tree(local)
    except FileNotFoundError:
        return None


def _holders(vms: VolumeManagers, name: str) -> list[str]:
    return sorted(n["name"] for n in vms.volume(name, "cifar").get("nodes", []) if n["phase"] == "Ready")


def test_a_replica_whose_agent_stops_is_placed_elsewhere_and_its_label_removed(
    vms: VolumeManagers,
    s3: S3Server,
    dataset: tuple[str, dict[str, str]],
    credentials: str,
    agents: dict[str, KvcAgent],
    api: Any,
) -> None:
    bucket, expected = dataset
    vms.create("healing", [s3_volume(s3, bucket, replicas=2)])
    volume = vms.wait_state("healing", "Running", timeout=120)["status"]["volumes"][0]
    label = volume["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0][
        "matchExpressions"
    ][0]["key"]
    before = _holders(vms, "healing")
    lost = before[0]
    agents[lost].kill()
    # The agent's silence makes the replica lost: the volume is Degraded while it moves.
    wait_for(
        lambda: vms.volume("healing", "cifar").get("phase") == "Degraded",
        timeout=60,
        what="Degraded",
    )
    assert lost not in labelled_nodes(api, label)

    def replaced() -> list[str] | None:
        holders = _holders(vms, "healing")
        return holders if len(holders) == 2 and lost not in holders else None

    after = wait_for(replaced, timeout=120, what="re-placed")
    assert vms.volume("healing", "cifar")["phase"] == "Ready"
    assert labelled_nodes(api, label) == after
    (new,) = set(after) - set(before)
    assert tree(agents[new].local(volume["volumeSource"]["hostPath"]["path"])) == expected


def test_a_deleted_volumenode_comes_back_with_its_replicas_and_the_data_stays_under_its_pod(
    vms: VolumeManagers,
    s3: S3Server,
    dataset: tuple[str, dict[str, str]],
    credentials: str,
    agents: dict[str, KvcAgent],
    api: Any,
) -> None:
    """`kubectl delete volumenode` on a node whose data a running pod reads: the agent creates
    the object again with the same assignment, and the data is neither deleted nor fetched again."""
    bucket, expected = dataset
    vms.create("kept", [s3_volume(s3, bucket, replicas=1)])
    volume = vms.wait_state("kept", "Running", timeout=120)["status"]["volumes"][0]
    (node,) = _holders(vms, "kept")
    local = agents[node].local(volume["volumeSource"]["hostPath"]["path"])
    inodes = {path: path.stat().st_ino for path in local.rglob("*") if path.is_file()}
    core = client.CoreV1Api(api)
    claim = {"persistentVolumeClaim": {"claimName": volume["claimName"], "readOnly": True}}
    core.create_namespaced_pod(
        vms.namespace, restricted_pod("reader", nodeName=node, volumes=[{"name": "data", **claim}])
    )
    wait_for(lambda: core.read_namespaced_pod("reader", vms.namespace).status.phase == "Running", what="pod Running")
    custom = client.CustomObjectsApi(api)
    before = custom.get_cluster_custom_object(names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL, node)
    key = next(r["name"] for r in before["spec"]["replicas"] if r["volumeId"] == "cifar" and "kept" in r["name"])

    custom.delete_cluster_custom_object(names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL, node)

    def recreated() -> dict[str, Any] | None:
        try:
            vnode = custom.get_cluster_custom_object(names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL, node)
        except client.ApiException:
            return None
        return vnode if vnode["metadata"]["uid"] != before["metadata"]["uid"] else None

    again = wait_for(recreated, timeout=30, what="the VolumeNode created again")
    assert key in [r["name"] for r in again["spec"]["replicas"]]
    # Long enough for the agent to act on the deletion and the controller to run passes on it.
    wait_for(
        lambda: _holders(vms, "kept") == [node] and vms.volume("kept", "cifar").get("phase") == "Ready",
        timeout=60,
        what="the replica Ready on its node again",
    )
    time.sleep(6)
    assert tree(local) == expected
    assert {path: path.stat().st_ino for path in local.rglob("*") if path.is_file()} == inodes
    assert _holders(vms, "kept") == [node]
    assert core.read_namespaced_pod("reader", vms.namespace).status.phase == "Running"


def test_a_deleted_node_loses_its_replica_to_another_node(
    vms: VolumeManagers,
    s3: S3Server,
    dataset: tuple[str, dict[str, str]],
    credentials: str,
    control_plane: ControlPlane,
    api: Any,
) -> None:
    bucket, _ = dataset
    name = f"kvc-doomed-{uuid.uuid4().hex[:5]}"
    control_plane.add_nodes([NodeSpec(name, labels={"kvc.test/doomed": "yes"})])
    doomed = KvcAgent(control_plane, name).start()
    doomed.wait_reporting()
    preferred = {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "preference": {"matchExpressions": [{"key": "kvc.test/doomed", "operator": "Exists"}]}}
        ]
    }
    try:
        vms.create("moving", [{**s3_volume(s3, bucket, replicas=1), "nodeAffinity": preferred}])
        vms.wait_state("moving", "Running", timeout=120)
        assert _holders(vms, "moving") == [name]
        doomed.kill()
        client.CoreV1Api(api).delete_node(name)

        def moved() -> list[str] | None:
            holders = _holders(vms, "moving")
            return holders if holders and name not in holders else None

        holders = wait_for(moved, timeout=120, what="re-placed")
        assert len(holders) == 1
    finally:
        doomed.stop()


def test_agent_killed_mid_transfer_resumes_and_is_never_ready_early(
    vms: VolumeManagers,
    s3: S3Server,
    credentials: str,
    agents: dict[str, KvcAgent],
) -> None:
    s3_client = s3.client()
    bucket = f"big-{uuid.uuid4().hex[:8]}"
    s3_client.create_bucket(Bucket=bucket)
    body = os.urandom(200 * 1024 * 1024)
    s3_client.put_object(Bucket=bucket, Key="cifar/weights.bin", Body=body)
    vms.create("resumed", [s3_volume(s3, bucket, replicas=1, capacity="1Gi")])
    node, staging = wait_for(
        lambda: _partial_download(agents, vms.namespace), timeout=60, interval=0.01, what="a partial download"
    )
    agents[node].kill()
    partial = staging / "weights.bin"
    local = staging.with_name(staging.name.removesuffix(".partial"))
    assert not local.exists()  # nothing published while incomplete
    assert 0 < partial.stat().st_size < len(body)
    assert vms.volume("resumed", "cifar").get("phase") != "Ready"
    agents[node].start()
    vms.wait_state("resumed", "Running", timeout=120)
    assert (local / "weights.bin").read_bytes() == body
    path = vms.volume("resumed", "cifar")["volumeSource"]["hostPath"]["path"]
    assert agents[node].local(path) == local
    assert _holders(vms, "resumed") == [node]
    component = agents[node].component
    assert component is not None
    assert "Traceback" not in component.log_path.read_text()


def test_missing_bucket_and_key_are_reported_in_the_volume_status(
    vms: VolumeManagers, s3: S3Server, dataset: tuple[str, dict[str, str]], credentials: str
) -> None:
    bucket, _ = dataset
    no_bucket = s3_volume(s3, "kvc-no-such-bucket", "nobucket", replicas=1)
    no_key = s3_volume(s3, bucket, "nokey", replicas=1)
    no_key["options"]["sourceURL"] = f"s3://{bucket}/cifar/missing.bin"
    vms.create("missing", [no_bucket, no_key])
    wait_for(
        lambda: all(vms.volume("missing", i).get("phase") == "Failed" for i in ("nobucket", "nokey")),
        timeout=60,
        what="both volumes Failed",
    )
    assert "bucket kvc-no-such-bucket does not exist" in vms.volume("missing", "nobucket")["message"]
    assert f"object s3://{bucket}/cifar/missing.bin not found" in vms.volume("missing", "nokey")["message"]
    assert vms.get("missing")["status"]["state"] == "Failed"


def test_s3_server_restart_mid_transfer_is_retried_and_completes(
    vms: VolumeManagers, s3: S3Server, credentials: str, agents: dict[str, KvcAgent]
) -> None:
    s3_client = s3.client()
    bucket = f"flaky-{uuid.uuid4().hex[:8]}"
    s3_client.create_bucket(Bucket=bucket)
    objects = {f"cifar/part-{i:02d}.bin": os.urandom(8 * 1024 * 1024) for i in range(24)}
    for key, body in objects.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    vms.create("flaky", [s3_volume(s3, bucket, replicas=1, capacity="1Gi")])
    wait_for(lambda: _partial_download(agents, vms.namespace), timeout=60, interval=0.01, what="a transfer in progress")
    s3.stop()
    s3.start()  # moto keeps objects in memory: the restarted server is empty until re-seeded
    s3_client = s3.client()
    s3_client.create_bucket(Bucket=bucket)
    for key, body in objects.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    vm = vms.wait_state("flaky", "Running", timeout=180)
    node = vm["status"]["volumes"][0]["nodes"][0]
    assert node["bytes"] == node["totalBytes"] == 24 * 8 * 1024 * 1024


def test_distribution_strategy_puts_each_part_of_the_data_on_its_own_nodes(
    vms: VolumeManagers,
    s3: S3Server,
    dataset: tuple[str, dict[str, str]],
    credentials: str,
    agents: dict[str, KvcAgent],
) -> None:
    bucket, expected = dataset
    strategy = '{"train/batch-[0-2]/*": 2, "meta/*": 1}'
    vms.create("sharded", [s3_volume(s3, bucket, replicas=3, distributionStrategy=strategy)])
    volume = vms.wait_state("sharded", "Running", timeout=120)["status"]["volumes"][0]
    path = volume["volumeSource"]["hostPath"]["path"]
    parts = sorted(tuple(sorted(tree(agents[n["name"]].local(path)))) for n in volume["nodes"])
    train = tuple(sorted(k for k in expected if k.startswith(("train/batch-0/", "train/batch-1/", "train/batch-2/"))))
    meta = ("meta/labels.txt",)
    assert parts == sorted([train, train, meta])


def test_data_path_is_honoured_under_an_allowed_root_and_refused_elsewhere(
    vms: VolumeManagers,
    s3: S3Server,
    dataset: tuple[str, dict[str, str]],
    credentials: str,
    agents: dict[str, KvcAgent],
) -> None:
    bucket, expected = dataset
    vms.create(
        "placed",
        [
            s3_volume(s3, bucket, "fast", replicas=1, dataPath="/data/kvc/nvme"),
            s3_volume(s3, bucket, "sneaky", replicas=1, dataPath="/etc/kubernetes"),
        ],
    )
    wait_for(lambda: vms.volume("placed", "fast").get("phase") == "Ready", timeout=120, what="fast Ready")
    fast = vms.volume("placed", "fast")
    path = fast["volumeSource"]["hostPath"]["path"]
    assert path.startswith(f"/data/kvc/nvme/{vms.namespace}/placed/fast-")
    assert tree(agents[fast["nodes"][0]["name"]].local(path)) == expected
    sneaky = vms.volume("placed", "sneaky")
    assert sneaky["phase"] == "Failed"
    assert sneaky["message"] == (
        "options.dataPath /etc/kubernetes is not under a data root the cluster admin allows (/data/kvc)"
    )


def test_wrong_credentials_fail_with_a_clear_message_and_heal_when_the_secret_is_fixed(
    vms: VolumeManagers, api: Any, namespace: str, tmp_path: Path
) -> None:
    server, access_key, secret_key = authenticating_server(tmp_path / "auth-s3.log")
    try:
        good = server.client(access_key=access_key, secret_key=secret_key)
        good.create_bucket(Bucket="private")
        good.put_object(Bucket="private", Key="cifar/data.bin", Body=b"secret data")
        core = client.CoreV1Api(api)
        wrong = credentials_secret("aws-creds", "AKIAWRONGWRONGWRONG", "not-the-secret")
        core.create_namespaced_secret(namespace, wrong)
        vms.create("private", [s3_volume(server, "private", replicas=1)])
        volume = wait_for(
            lambda: (v := vms.volume("private", "cifar")).get("phase") == "Failed" and v, timeout=60, what="Failed"
        )
        assert (
            "access to s3://private/cifar/ denied (InvalidAccessKeyId): check the credentials Secret"
            in volume["message"]
        )
        assert "not-the-secret" not in json.dumps(vms.get("private"))
        core.replace_namespaced_secret("aws-creds", namespace, credentials_secret("aws-creds", access_key, secret_key))
        vm = vms.wait_state("private", "Running", timeout=120)
        node = vm["status"]["volumes"][0]["nodes"][0]
        assert node["bytes"] == len(b"secret data")
    finally:
        server.stop()


def test_credentials_never_appear_in_logs_status_or_events(control_plane: ControlPlane, api: Any) -> None:
    """Runs after the tests above: every log, status and event they produced is searched."""
    secrets = [SECRET_ACCESS_KEY, "not-the-secret", "s3cr3t-token"]
    for log in control_plane.logs_dir.glob("kvc-*.log"):
        text = log.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"{secret!r} leaked into {log.name}"
    custom = client.CustomObjectsApi(api)
    everything = json.dumps(custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.VOLUMEMANAGER_PLURAL))
    everything += json.dumps(custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL))
    everything += str(client.CoreV1Api(api).list_event_for_all_namespaces().items)
    for secret in secrets:
        assert secret not in everything


# --------------------------------------------------------------------------- a realistic data set

BIG_SEED = 20261128


@pytest.fixture(scope="module")
def big_dataset(s3: S3Server) -> tuple[str, dict[str, str]]:
    """>= 2,000 small files in nested prefixes, 256 MiB of large files, a tar.gz and
    malicious keys, generated from a fixed seed; returns (bucket, expected tree of big/)."""
    rng = random.Random(BIG_SEED)
    s3_client = s3.client()
    bucket = f"big-{uuid.uuid4().hex[:8]}"
    s3_client.create_bucket(Bucket=bucket)
    expected = {}

    def put(key: str, body: bytes) -> None:
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
        if key.startswith("big/") and ".." not in key and not key.startswith("big//"):
            expected[key.removeprefix("big/")] = hashlib.sha256(body).hexdigest()

    with ThreadPoolExecutor(max_workers=8) as pool:
        small = [
            (f"big/images/class-{i % 20:02d}/shard-{i % 7}/img-{i:05d}.jpg", rng.randbytes(rng.randrange(200, 6000)))
            for i in range(2100)
        ]
        list(pool.map(lambda item: put(*item), small))
    for i in range(4):
        put(f"big/weights/part-{i}.bin", rng.randbytes(64 * 1024 * 1024))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for i in range(50):
            data = rng.randbytes(1000)
            info = tarfile.TarInfo(f"annotations/{i:03d}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    put("big/archives/annotations.tar.gz", buffer.getvalue())
    put("big/../escape.txt", b"must never be written")
    put("big//etc/passwd", b"must never be written")
    return bucket, expected


def test_a_realistic_data_set_is_identical_on_every_assigned_node(
    vms: VolumeManagers,
    s3: S3Server,
    big_dataset: tuple[str, dict[str, str]],
    credentials: str,
    agents: dict[str, KvcAgent],
    control_plane: ControlPlane,
) -> None:
    bucket, expected = big_dataset
    assert len(expected) >= 2000
    assert sum(1 for k in expected if k.startswith("weights/")) * 64 * 1024 * 1024 >= 256 * 1024 * 1024
    volume = s3_volume(s3, bucket, "images", replicas=2)
    volume["options"]["sourceURL"] = f"s3://{bucket}/big/"
    volume["capacity"] = "1Gi"
    vms.create("realistic", [volume])
    status = vms.wait_state("realistic", "Running", timeout=600)["status"]["volumes"][0]
    path = status["volumeSource"]["hostPath"]["path"]
    for node in status["nodes"]:
        local = agents[node["name"]].local(path)
        assert tree(local) == expected, f"{node['name']} differs from the source"
    assert all("skipped 2 unsafe names" in node["message"] for node in status["nodes"]), status["nodes"]
    for agent in agents.values():  # nothing escaped any node's data root
        assert not list(agent.data_root.parent.glob("escape.txt"))
        assert not list(agent.data_root.rglob("passwd"))


def test_deletion_does_not_wait_for_a_dead_node_whose_agent_cleans_up_when_back(
    vms: VolumeManagers,
    s3: S3Server,
    dataset: tuple[str, dict[str, str]],
    credentials: str,
    agents: dict[str, KvcAgent],
) -> None:
    bucket, _ = dataset
    vms.create("abandoned", [s3_volume(s3, bucket, replicas=1)])
    volume = vms.wait_state("abandoned", "Running", timeout=120)["status"]["volumes"][0]
    node = volume["nodes"][0]["name"]
    local = agents[node].local(volume["volumeSource"]["hostPath"]["path"])
    assert local.is_dir()
    agents[node].kill()
    vms.delete("abandoned")
    wait_for(lambda: not vms.exists("abandoned"), timeout=30, what="deletion despite the dead agent")
    assert local.is_dir()  # nobody could delete it yet
    agents[node].start()
    wait_for(lambda: not local.exists(), timeout=60, what="the returning agent to delete the data")


@pytest.mark.parametrize(
    "mounted_as",
    [
        "claim",
        # As pods wired by earlier versions (or with the webhook's hostPath opt-in) mount it.
        pytest.param("hostPath", marks=pytest.mark.pod_security("privileged")),
    ],
)
def test_deletion_keeps_data_a_running_pod_mounts_until_the_pod_is_gone(
    vms: VolumeManagers,
    s3: S3Server,
    dataset: tuple[str, dict[str, str]],
    credentials: str,
    agents: dict[str, KvcAgent],
    api: Any,
    mounted_as: str,
) -> None:
    bucket, _ = dataset
    vms.create("in-use", [s3_volume(s3, bucket, replicas=1)])
    volume = vms.wait_state("in-use", "Running", timeout=120)["status"]["volumes"][0]
    node = volume["nodes"][0]["name"]
    core = client.CoreV1Api(api)
    source = (
        {"persistentVolumeClaim": {"claimName": volume["claimName"], "readOnly": True}}
        if mounted_as == "claim"
        else {"hostPath": volume["volumeSource"]["hostPath"]}
    )
    reader = restricted_pod("reader", nodeName=node, volumes=[{"name": "data", **source}])
    core.create_namespaced_pod(vms.namespace, reader)
    wait_for(lambda: core.read_namespaced_pod("reader", vms.namespace).status.phase == "Running", what="pod Running")
    vms.delete("in-use")
    message = wait_for(
        lambda: "kept until pod(s) reader stop" in (m := vms.get("in-use").get("status", {}).get("message", "")) and m,
        timeout=30,
        what="deletion to wait for the pod",
    )
    assert vms.get("in-use")["status"]["state"] == "Deleting", message
    local = agents[node].local(volume["volumeSource"]["hostPath"]["path"])
    assert local.is_dir()
    core.delete_namespaced_pod("reader", vms.namespace, grace_period_seconds=0)
    wait_for(lambda: not vms.exists("in-use"), timeout=60, what="deletion once the pod is gone")
    wait_for(lambda: not local.exists(), timeout=60, what="data deleted")


def test_controller_killed_while_replicas_download_converges(
    vms: VolumeManagers,
    s3: S3Server,
    dataset: tuple[str, dict[str, str]],
    credentials: str,
    agents: dict[str, KvcAgent],
    controller: KvcController,
    api: Any,
) -> None:
    bucket, expected = dataset
    for i in range(3):
        vms.create(f"busy-{i}", [s3_volume(s3, bucket, replicas=2)])
    time.sleep(1.0)
    controller.kill()
    time.sleep(1.0)
    controller.start()
    custom = client.CustomObjectsApi(api)
    for i in range(3):
        volume = vms.wait_state(f"busy-{i}", "Running", timeout=120)["status"]["volumes"][0]
        key_part = f"{vms.namespace}.busy-{i}.cifar-"
        holders = [
            v["metadata"]["name"]
            for v in custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL)["items"]
            if any(r["name"].startswith(key_part) for r in v["spec"].get("replicas", []))
        ]
        assert sorted(holders) == sorted(n["name"] for n in volume["nodes"])  # exactly 2, no duplicates
        for node in holders:
            assert tree(agents[node].local(volume["volumeSource"]["hostPath"]["path"])) == expected


def test_a_replica_corrupted_in_place_is_detected_and_fetched_again(
    vms: VolumeManagers,
    s3: S3Server,
    dataset: tuple[str, dict[str, str]],
    credentials: str,
    agents: dict[str, KvcAgent],
) -> None:
    bucket, expected = dataset
    vms.create("rotted", [s3_volume(s3, bucket, replicas=1)])
    volume = vms.wait_state("rotted", "Running", timeout=120)["status"]["volumes"][0]
    local = agents[volume["nodes"][0]["name"]].local(volume["volumeSource"]["hostPath"]["path"])
    victim = local / "labels.txt" if (local / "labels.txt").exists() else local / "meta" / "labels.txt"
    victim.write_bytes(bytes(len(victim.read_bytes())))  # same size, other content: only checksums tell
    wait_for(lambda: tree_if_present(local) == expected, timeout=90, interval=0.5, what="data repaired")
    wait_for(lambda: vms.volume("rotted", "cifar").get("phase") == "Ready", what="Ready again")


def test_another_namespace_cannot_claim_a_tenants_data(
    vms: VolumeManagers, s3: S3Server, dataset: tuple[str, dict[str, str]], credentials: str, api: Any
) -> None:
    """Tenant B names tenant A's PersistentVolume in a claim of its own: the PV is bound to A's
    claim (its uid), so kube-controller-manager refuses, and B's claim never binds."""
    bucket, _ = dataset
    vms.create("private", [s3_volume(s3, bucket, replicas=1)])
    volume = vms.wait_state("private", "Running", timeout=120)["status"]["volumes"][0]
    core = client.CoreV1Api(api)
    other = f"{vms.namespace}-b"
    core.create_namespace({"metadata": {"name": other, "labels": {"kvc.test/e2e": "true"}}})
    try:
        stolen = {
            "metadata": {"name": "stolen"},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": names.NODE_LOCAL_STORAGE_CLASS,
                "volumeName": volume["persistentVolumeName"],
                "resources": {"requests": {"storage": "100Mi"}},
            },
        }
        core.create_namespaced_persistent_volume_claim(other, stolen)
        refused = wait_for(
            lambda: [
                e
                for e in core.list_namespaced_event(other, field_selector="involvedObject.name=stolen").items
                if e.reason == "FailedBinding"
            ],
            what="kube-controller-manager to refuse the binding",
        )
        assert "already bound to a different claim" in refused[0].message
        assert core.read_namespaced_persistent_volume_claim("stolen", other).status.phase == "Pending"
        pv = core.read_persistent_volume(volume["persistentVolumeName"])
        assert (pv.spec.claim_ref.namespace, pv.spec.claim_ref.name) == (vms.namespace, volume["claimName"])
    finally:
        core.delete_namespace(other)
