"""The cluster admin's policy against tenants, on the real control plane: tolerations,
NFS servers and the caps on replicas (kvc.policy, flags of `kvc run controller`).

Each test plants what a tenant could try: tolerating every taint or the control plane's,
an NFS export of a server nobody allowed, more replicas than a node or a namespace may
have. The module's controller runs with a small policy of its own (``POLICY``).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from e2e.cluster import ControlPlane
from e2e.conftest import NODE_NAMES
from e2e.helpers import VolumeManagers, wait_for
from e2e.kvc import KvcAgent, KvcController
from e2e.s3server import S3Server, credentials_secret
from kvc.api import names

ALLOWED_TAINT = {"key": "kvc.test/dedicated", "value": "data", "effect": "NoSchedule"}
CONTROL_PLANE_TAINT = {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}
NODE_CAP, NAMESPACE_CAP = 2, 3
POLICY = (
    "--allowed-toleration=kvc.test/dedicated=data:NoSchedule",
    f"--max-replicas-per-node={NODE_CAP}",
    f"--max-replicas-per-namespace={NAMESPACE_CAP}",
)


@pytest.fixture(scope="module")
def policy_controller(control_plane: ControlPlane, controller_process: KvcController) -> Iterator[KvcController]:
    """The session's controller makes way for one with ``POLICY``, and comes back afterwards."""
    controller_process.stop()
    strict = KvcController(control_plane, extra_args=POLICY)
    strict.name = "kvc-controller-policy"
    try:
        yield strict.start()
    finally:
        strict.stop()
        controller_process.start()


@pytest.fixture
def vms(api: Any, namespace: str, policy_controller: KvcController, agents: dict[str, KvcAgent]) -> VolumeManagers:
    client.CoreV1Api(api).create_namespaced_secret(namespace, credentials_secret("aws-creds"))
    return VolumeManagers(api, namespace)


@pytest.fixture(scope="module")
def bucket(s3: S3Server) -> str:
    name = f"policy-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=name)
    s3.client().put_object(Bucket=name, Key="set/a.txt", Body=b"a")
    return name


def s3_volume(s3: S3Server, bucket: str, replicas: int = 1, **fields: Any) -> dict[str, Any]:
    return {
        "id": "data",
        "sourceType": "S3",
        "replicas": replicas,
        "accessMode": "ReadOnlyMany",
        "options": {
            "sourceURL": f"s3://{bucket}/set/",
            "endpointURL": s3.endpoint_url,
            "awsCredentialsSecretName": "aws-creds",
        },
        **fields,
    }


def on_node(node: str) -> dict[str, Any]:
    term = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
    return {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}


def assignments(api: Any) -> dict[str, list[dict[str, Any]]]:
    """Each VolumeNode's spec.replicas."""
    listed = client.CustomObjectsApi(api).list_cluster_custom_object(
        names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL
    )
    return {v["metadata"]["name"]: (v.get("spec") or {}).get("replicas") or [] for v in listed["items"]}


def assigned_to(api: Any, namespace: str, name: str) -> list[str]:
    """The nodes whose VolumeNode holds a replica of that VolumeManager."""
    return sorted(
        node
        for node, replicas in assignments(api).items()
        for r in replicas
        if r["volumeManager"]["namespace"] == namespace and r["volumeManager"]["name"] == name
    )


def failed_with(vms: VolumeManagers, name: str) -> str:
    vm = vms.wait_state(name, "Failed")
    (volume,) = vm["status"]["volumes"]
    assert volume["phase"] == "Failed"
    return str(volume["message"])


@contextlib.contextmanager
def tainted(api: Any, node: str, taint: dict[str, str]) -> Iterator[None]:
    core = client.CoreV1Api(api)
    before = [t.to_dict() for t in core.read_node(node).spec.taints or []]
    kept = [{k: v for k, v in t.items() if k in ("key", "value", "effect") and v is not None} for t in before]
    core.patch_node(node, {"spec": {"taints": [*kept, taint]}})
    try:
        yield
    finally:
        core.patch_node(node, {"spec": {"taints": kept or None}})


# --------------------------------------------------------------------------- tolerations


def test_a_volume_tolerating_every_taint_is_failed_naming_the_flag(
    vms: VolumeManagers, s3: S3Server, bucket: str, api: Any
) -> None:
    vms.create("everywhere", [s3_volume(s3, bucket, tolerations=[{"operator": "Exists"}])])
    message = failed_with(vms, "everywhere")
    assert message.startswith("tolerations[0] tolerates every taint")
    assert "--allowed-toleration" in message
    assert assigned_to(api, vms.namespace, "everywhere") == []


def test_the_control_plane_stays_closed_while_an_allowed_pool_opens(
    vms: VolumeManagers, s3: S3Server, bucket: str, api: Any
) -> None:
    control_plane_node, pool_node = NODE_NAMES[0], NODE_NAMES[1]
    control_plane_toleration = {**CONTROL_PLANE_TAINT, "operator": "Exists"}
    pool_toleration = {**ALLOWED_TAINT, "operator": "Equal"}
    with tainted(api, control_plane_node, CONTROL_PLANE_TAINT), tainted(api, pool_node, ALLOWED_TAINT):
        vms.create(
            "on-control-plane",
            [s3_volume(s3, bucket, tolerations=[control_plane_toleration], nodeAffinity=on_node(control_plane_node))],
        )
        vms.create("in-pool", [s3_volume(s3, bucket, tolerations=[pool_toleration], nodeAffinity=on_node(pool_node))])
        message = failed_with(vms, "on-control-plane")
        assert message.startswith("tolerations[0] node-role.kubernetes.io/control-plane:NoSchedule is not allowed")
        assert "--allowed-toleration (allowed now: kvc.test/dedicated=data:NoSchedule)" in message
        vm = vms.wait_state("in-pool", "Running", timeout=90)
        assert [n["name"] for n in vm["status"]["volumes"][0]["nodes"]] == [pool_node]
        assert assigned_to(api, vms.namespace, "on-control-plane") == []


# --------------------------------------------------------------------------- NFS


def test_an_nfs_export_of_a_server_nobody_allowed_is_failed_and_makes_no_pv(vms: VolumeManagers, api: Any) -> None:
    export = {"server": "fileserver.internal.example.org", "path": "/home"}
    vms.create("foreign", [{"id": "home", "sourceType": "NFS", "accessMode": "ReadWriteMany", "options": export}])
    message = failed_with(vms, "foreign")
    assert message.startswith("NFS export fileserver.internal.example.org:/home is not allowed")
    assert "--allowed-nfs-server" in message
    uid = vms.get("foreign")["metadata"]["uid"]
    assert vms.volumes_of(uid) == []
    assert vms.claims("foreign") == []


# --------------------------------------------------------------------------- caps


@pytest.fixture
def more_namespaces(api: Any) -> Iterator[list[str]]:
    core = client.CoreV1Api(api)
    made = [f"kvc-e2e-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for name in made:
        core.create_namespace({"metadata": {"name": name, "labels": {"kvc.test/e2e": "true"}}})
        core.create_namespaced_secret(name, credentials_secret("aws-creds"))
    yield made
    for name in made:
        core.delete_namespace(name)


def test_replicas_stay_within_the_caps_per_node_and_per_namespace(
    vms: VolumeManagers, more_namespaces: list[str], s3: S3Server, bucket: str, api: Any
) -> None:
    # Earlier tests' replicas are released once their namespaces are gone: start from empty nodes.
    wait_for(lambda: not any(assignments(api).values()), timeout=90, what="the VolumeNodes to be empty")
    team_b, team_c = (VolumeManagers(api, namespace) for namespace in more_namespaces)
    everywhere = s3_volume(s3, bucket, replicas=len(NODE_NAMES))

    # A namespace's volumes may have NAMESPACE_CAP replicas on nodes, not one more.
    vms.create("wide", [everywhere])
    wait_for(lambda: len(assigned_to(api, vms.namespace, "wide")) == 3, what="wide's replicas assigned")
    vms.create("one-more", [s3_volume(s3, bucket)])
    message = failed_with(vms, "one-more")
    assert message == (
        f"namespace {vms.namespace} has 3 replicas of other volumes on nodes: 1 more would exceed the cluster "
        "admin's cap of 3 (controller flag --max-replicas-per-namespace); lower replicas or delete volumes no "
        "longer needed"
    )
    assert assigned_to(api, vms.namespace, "one-more") == []

    # Another namespace fills every node up to NODE_CAP; a third finds no room, says why, and
    # waits (Pending) until replicas are released.
    team_b.create("wide", [everywhere])
    wait_for(lambda: len(assigned_to(api, team_b.namespace, "wide")) == 3, what="team b's replicas assigned")
    team_c.create("late", [s3_volume(s3, bucket)])
    late = wait_for(lambda: (v := team_c.volume("late", "data")).get("phase") == "Pending" and v, what="late Pending")
    assert f"other nodes are 3 full (--max-replicas-per-node={NODE_CAP})" in late["message"]
    assert all(len(replicas) <= NODE_CAP for replicas in assignments(api).values())
    assert assigned_to(api, team_c.namespace, "late") == []

    team_b.delete("wide")
    wait_for(lambda: len(assigned_to(api, team_c.namespace, "late")) == 1, timeout=90, what="late placed")
    assert all(len(replicas) <= NODE_CAP for replicas in assignments(api).values())
