"""The controller against the real control plane: NFS and PVC volumes, updates, deletion,
bad input, restarts. kube-controller-manager binds the claims; nothing is mocked."""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from e2e.cluster import ControlPlane
from e2e.helpers import VolumeManagers, restricted_container, restricted_pod, wait_for
from e2e.kvc import KvcController
from kvc.api import names


def nfs_volume(volume_id: str = "shared", **options: str) -> dict[str, Any]:
    return {
        "id": volume_id,
        "sourceType": "NFS",
        "accessMode": "ReadWriteMany",
        "capacity": "2Gi",
        "labels": {"team": "vision", "kind": "dataset"},
        "options": {"server": "nfs.example.com", "path": f"/exports/{volume_id}", **options},
    }


@pytest.fixture
def vms(api: Any, namespace: str, controller: KvcController) -> VolumeManagers:
    return VolumeManagers(api, namespace)


def _live(objects: list[Any]) -> list[Any]:
    return [o for o in objects if o.metadata.deletion_timestamp is None]


# --------------------------------------------------------------------------- NFS


def test_nfs_volume_gets_a_bound_pv_and_pvc_and_the_volumemanager_runs(
    vms: VolumeManagers, control_plane: ControlPlane
) -> None:
    began = time.monotonic()
    created = vms.create("datasets", [nfs_volume("shared", mountOptions="nfsvers=4.1,hard")])
    vm = vms.wait_state("datasets", "Running")
    # Bound at once, not at kube-controller-manager's next look at pending claims (15 s).
    assert time.monotonic() - began < 12
    uid = created["metadata"]["uid"]

    status = vm["status"]
    assert status["ready"] == "1/1"
    assert status["message"] == "all 1 volumes ready"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert conditions["Progressing"]["status"] == "False"
    assert conditions["Degraded"]["status"] == "False"
    volume = status["volumes"][0]
    assert volume["phase"] == "Ready"
    claim_name = volume["volumeSource"]["persistentVolumeClaim"]["claimName"]

    claim = vms.core.read_namespaced_persistent_volume_claim(claim_name, vms.namespace)
    assert claim.status.phase == "Bound"
    assert claim.spec.storage_class_name == names.NFS_STORAGE_CLASS
    assert claim.spec.access_modes == ["ReadWriteMany"]
    assert [(o.kind, o.name, o.uid, o.controller) for o in claim.metadata.owner_references] == [
        ("VolumeManager", "datasets", uid, True)
    ]
    for labelled in (claim,):
        assert labelled.metadata.labels["team"] == "vision"
        assert labelled.metadata.labels[names.LABEL_MANAGED_BY] == "kvc"
        assert labelled.metadata.labels[names.LABEL_VOLUME_ID] == "shared"

    (pv,) = vms.volumes_of(uid)
    assert pv.metadata.name == volume["persistentVolumeName"] == claim.spec.volume_name
    assert not pv.metadata.owner_references  # cluster-scoped: removed by the finalizer instead
    assert pv.metadata.labels["kind"] == "dataset"
    assert pv.spec.nfs.server == "nfs.example.com"
    assert pv.spec.nfs.path == "/exports/shared"
    assert pv.spec.mount_options == ["nfsvers=4.1", "hard"]
    assert pv.spec.persistent_volume_reclaim_policy == "Retain"
    assert pv.spec.capacity == {"storage": "2Gi"}
    # Made after the claim, bound to its uid: kube-controller-manager had no binding of its own
    # to write into the PV (it marks those it binds itself).
    assert pv.spec.claim_ref.uid == claim.metadata.uid
    assert "pv.kubernetes.io/bound-by-controller" not in (pv.metadata.annotations or {})
    assert names.ANNOTATION_VOLUME_CREATED in claim.metadata.annotations

    # The controller's only write to the object itself is its finalizer (kopf's copy of the
    # handled spec, one more PATCH per VolumeManager, is not kept: the generation tells).
    metadata = vms.get("datasets")["metadata"]
    assert metadata["finalizers"] == [names.FINALIZER]
    assert not [key for key in metadata.get("annotations") or {} if key.startswith(names.GROUP)]
    own_writes = [
        entry["fieldsV1"]
        for entry in metadata["managedFields"]
        if entry["manager"] == "kopf" and not entry.get("subresource")
    ]
    assert own_writes == [{"f:metadata": {"f:finalizers": {".": {}, f'v:"{names.FINALIZER}"': {}}}}]

    reasons = [(e.type, e.reason) for e in vms.events("datasets")]
    assert ("Normal", "VolumeReady") in reasons
    assert ("Normal", "Running") in reasons
    table = control_plane.kubectl("get", "vmgr", "datasets", "-n", vms.namespace, "--no-headers").stdout.split()
    assert table[1:3] == ["Running", "1/1"]


def test_a_deleted_claim_is_made_again_with_a_pv_for_it(vms: VolumeManagers) -> None:
    vms.create("remade", [nfs_volume("shared")])
    volume = vms.wait_state("remade", "Running")["status"]["volumes"][0]
    claim_name, volume_name = volume["claimName"], volume["persistentVolumeName"]
    first = vms.core.read_namespaced_persistent_volume_claim(claim_name, vms.namespace).metadata.uid
    vms.core.delete_namespaced_persistent_volume_claim(claim_name, vms.namespace)

    def bound_again() -> bool:
        try:
            claim = vms.core.read_namespaced_persistent_volume_claim(claim_name, vms.namespace)
            pv = vms.core.read_persistent_volume(volume_name)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return bool(
            claim.metadata.uid != first
            and claim.status.phase == "Bound"
            and pv.spec.claim_ref.uid == claim.metadata.uid
        )

    # A Retain PV keeps naming the deleted claim (Released): made again for the new one.
    wait_for(bound_again, timeout=90, what="the claim made again and bound to a PV made again")
    vms.wait_state("remade", "Running")


def test_read_only_nfs_volume_is_mounted_read_only(vms: VolumeManagers) -> None:
    vms.create("models", [{**nfs_volume("weights"), "accessMode": "ReadOnlyMany"}])
    volume = vms.wait_state("models", "Running")["status"]["volumes"][0]
    assert volume["volumeSource"]["persistentVolumeClaim"]["readOnly"] is True
    pv = vms.core.read_persistent_volume(volume["persistentVolumeName"])
    assert pv.spec.nfs.read_only is True
    assert pv.spec.access_modes == ["ReadOnlyMany"]


# --------------------------------------------------------------------------- PVC


def test_pvc_volume_waits_for_a_missing_claim_then_becomes_ready(vms: VolumeManagers) -> None:
    vms.create("existing", [{"id": "scratch", "sourceType": "PVC", "options": {"claimName": "team-scratch"}}])
    vm = vms.wait_state("existing", "Pending")
    volume = vm["status"]["volumes"][0]
    assert volume["phase"] == "Pending"
    assert volume["message"] == (
        f"PersistentVolumeClaim team-scratch not found in namespace {vms.namespace}: create it, "
        "or set options.claimName to an existing claim"
    )

    storage_class = f"manual-{vms.namespace}"
    vms.core.create_persistent_volume(
        {
            "metadata": {"name": f"pv-{vms.namespace}"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": storage_class,
                "hostPath": {"path": "/tmp/scratch"},
            },
        }
    )
    try:
        vms.core.create_namespaced_persistent_volume_claim(
            vms.namespace,
            {
                "metadata": {"name": "team-scratch"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": storage_class,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )
        vm = vms.wait_state("existing", "Running")
        volume = vm["status"]["volumes"][0]
        assert volume["volumeSource"] == {"persistentVolumeClaim": {"claimName": "team-scratch", "readOnly": False}}
        vms.delete("existing")
        wait_for(lambda: not vms.exists("existing"), what="VolumeManager deleted")
        # The user's claim is theirs: deleting the VolumeManager leaves it alone.
        assert (
            vms.core.read_namespaced_persistent_volume_claim("team-scratch", vms.namespace).metadata.deletion_timestamp
            is None
        )
    finally:
        vms.core.delete_persistent_volume(f"pv-{vms.namespace}")


# --------------------------------------------------------------------------- bad input


def test_bad_volumes_fail_with_messages_naming_the_field_and_good_ones_are_unaffected(vms: VolumeManagers) -> None:
    vms.create(
        "mixed",
        [
            nfs_volume("good"),
            {"id": "no-server", "sourceType": "NFS", "accessMode": "ReadWriteMany", "options": {"path": "/x"}},
            {"id": "no-path", "sourceType": "NFS", "accessMode": "ReadWriteMany", "options": {"server": "nfs"}},
            {**nfs_volume("rwo"), "accessMode": "ReadWriteOnce"},
            {
                "id": "relative",
                "sourceType": "NFS",
                "accessMode": "ReadWriteMany",
                "options": {"server": "nfs", "path": "data"},
            },
            {"id": "no-claim", "sourceType": "PVC", "options": {}},
            {"id": "bad-claim", "sourceType": "PVC", "options": {"claimName": "Not_A_Name"}},
            {"id": "ceph", "sourceType": "Ceph", "options": {"pool": "x"}},
        ],
    )
    vm = vms.wait_state("mixed", "Failed")
    by_id = {v["id"]: v for v in vm["status"]["volumes"]}
    assert [v["id"] for v in vm["status"]["volumes"]] == [
        "good",
        "no-server",
        "no-path",
        "rwo",
        "relative",
        "no-claim",
        "bad-claim",
        "ceph",
    ]
    expected = {
        "no-server": "options.server is required for NFS volumes: the NFS server's host name or IP address",
        "no-path": "options.path is required for NFS volumes: the exported directory, e.g. /exports/data",
        "rwo": "accessMode ReadWriteOnce is not supported by NFS volumes: use ReadOnlyMany or ReadWriteMany",
        "relative": "options.path must be an absolute export path such as /exports/data, not 'data'",
        "no-claim": (
            "options.claimName is required for PVC volumes: the name of a PersistentVolumeClaim in this namespace"
        ),
        "bad-claim": "options.claimName 'Not_A_Name' is not a valid PersistentVolumeClaim name",
        "ceph": "unknown sourceType 'Ceph': known types are HTTP, NFS, PVC, S3",
    }
    for volume_id, message in expected.items():
        assert by_id[volume_id]["phase"] == "Failed", volume_id
        assert by_id[volume_id]["message"] == message
    # The valid volume next to them is provisioned and usable all the same.
    wait_for(lambda: vms.volume("mixed", "good").get("phase") == "Ready", what="good volume Ready")
    assert len(_live(vms.claims("mixed"))) == 1
    assert "ceph: unknown sourceType 'Ceph'" in vms.get("mixed")["status"]["message"]
    warnings = [e for e in vms.events("mixed") if e.type == "Warning" and e.reason == "VolumeFailed"]
    assert any("volume ceph: unknown sourceType" in e.message for e in warnings)

    # Fixing a volume heals it without touching the others.
    good_claim_uid = _live(vms.claims("mixed"))[0].metadata.uid
    vms.set_volumes("mixed", [nfs_volume("good"), nfs_volume("no-server")])
    vms.wait_state("mixed", "Running")
    claims = {c.metadata.labels[names.LABEL_VOLUME_ID]: c for c in _live(vms.claims("mixed"))}
    assert set(claims) == {"good", "no-server"}
    assert claims["good"].metadata.uid == good_claim_uid


# --------------------------------------------------------------------------- updates


def test_adding_and_removing_a_volume_touches_only_that_volume(vms: VolumeManagers) -> None:
    vms.create("grow", [nfs_volume("first")])
    vms.wait_state("grow", "Running")
    first_uid = vms.claims("grow")[0].metadata.uid
    uid = vms.get("grow")["metadata"]["uid"]

    vms.set_volumes("grow", [nfs_volume("first"), nfs_volume("second")])
    vm = vms.wait_state("grow", "Running")
    assert vm["status"]["ready"] == "2/2"
    claims = {c.metadata.labels[names.LABEL_VOLUME_ID]: c.metadata.uid for c in _live(vms.claims("grow"))}
    assert claims["first"] == first_uid
    assert set(claims) == {"first", "second"}

    vms.set_volumes("grow", [nfs_volume("second")])
    vm = vms.wait_state("grow", "Running")
    assert [v["id"] for v in vm["status"]["volumes"]] == ["second"]
    wait_for(
        lambda: {c.metadata.labels[names.LABEL_VOLUME_ID] for c in _live(vms.claims("grow"))} == {"second"},
        what="first claim removed",
    )
    wait_for(lambda: len(vms.volumes_of(uid)) == 1, what="first PV removed")
    assert vms.claims("grow")[0].metadata.uid == claims["second"]


def _pod_using(claim_name: str, name: str) -> dict[str, Any]:
    return restricted_pod(
        name,
        containers=[restricted_container(volumeMounts=[{"name": "data", "mountPath": "/data"}])],
        volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": claim_name}}],
    )


def test_changing_the_nfs_source_makes_a_new_pair_and_keeps_the_old_while_a_pod_uses_it(
    vms: VolumeManagers,
) -> None:
    vms.create("moving", [nfs_volume("data")])
    old = vms.wait_state("moving", "Running")["status"]["volumes"][0]
    uid = vms.get("moving")["metadata"]["uid"]
    vms.core.create_namespaced_pod(vms.namespace, _pod_using(old["claimName"], "reader"))

    vms.set_volumes("moving", [nfs_volume("data", path="/exports/data-v2")])
    new = vms.wait_state("moving", "Running")["status"]["volumes"][0]
    assert new["claimName"] != old["claimName"]
    assert vms.core.read_persistent_volume(new["persistentVolumeName"]).spec.nfs.path == "/exports/data-v2"
    # The old pair stays while the pod mounts it, and the status says why.
    wait_for(lambda: "kept until pod(s) reader stop using it" in vms.get("moving")["status"]["message"], what="note")
    assert {c.metadata.name for c in _live(vms.claims("moving"))} == {old["claimName"], new["claimName"]}

    vms.core.delete_namespaced_pod("reader", vms.namespace, grace_period_seconds=0)
    wait_for(
        lambda: {c.metadata.name for c in _live(vms.claims("moving"))} == {new["claimName"]}, what="old claim removed"
    )
    wait_for(
        lambda: [pv.metadata.name for pv in vms.volumes_of(uid)] == [new["persistentVolumeName"]], what="old PV removed"
    )
    wait_for(lambda: vms.get("moving")["status"]["message"] == "all 1 volumes ready", what="note cleared")


# --------------------------------------------------------------------------- deletion and restarts


def test_deleting_a_volumemanager_removes_every_sub_resource(vms: VolumeManagers) -> None:
    vms.create("doomed", [nfs_volume("a"), nfs_volume("b")])
    vms.wait_state("doomed", "Running")
    uid = vms.get("doomed")["metadata"]["uid"]
    assert vms.get("doomed")["metadata"]["finalizers"] == [names.FINALIZER]
    vms.delete("doomed")
    wait_for(lambda: not vms.exists("doomed"), what="VolumeManager gone")
    wait_for(lambda: not vms.volumes_of(uid), what="PVs gone")
    selector = f"{names.LABEL_VOLUMEMANAGER_UID}={uid}"
    wait_for(
        lambda: not vms.core.list_namespaced_persistent_volume_claim(vms.namespace, label_selector=selector).items,
        what="claims gone",
    )


def test_deletion_completes_when_the_controller_was_down_and_starts_later(
    vms: VolumeManagers, controller: KvcController
) -> None:
    vms.create("orphan", [nfs_volume("a")])
    vms.wait_state("orphan", "Running")
    uid = vms.get("orphan")["metadata"]["uid"]
    controller.kill()
    vms.delete("orphan")
    time.sleep(2)
    assert vms.exists("orphan")  # the finalizer holds it until KVC has cleaned up
    assert vms.volumes_of(uid)
    controller.start()
    wait_for(lambda: not vms.exists("orphan"), what="VolumeManager gone after controller restart")
    wait_for(lambda: not vms.volumes_of(uid), what="PV gone")


def test_controller_killed_mid_reconcile_converges_without_duplicates_or_orphans(
    vms: VolumeManagers, controller: KvcController
) -> None:
    count = 8
    for i in range(count):
        vms.create(f"burst-{i}", [nfs_volume("a"), nfs_volume("b")])
    time.sleep(0.7)  # the controller is part-way through the burst
    controller.kill()
    controller.start()
    uids = set()
    for i in range(count):
        vm = vms.wait_state(f"burst-{i}", "Running", timeout=90)
        uids.add(vm["metadata"]["uid"])
        claims = _live(vms.claims(f"burst-{i}"))
        assert sorted(c.metadata.labels[names.LABEL_VOLUME_ID] for c in claims) == ["a", "b"]
        assert len(vms.volumes_of(vm["metadata"]["uid"])) == 2
    # Nothing made for these VolumeManagers exists outside them.
    all_claims = vms.core.list_namespaced_persistent_volume_claim(
        vms.namespace, label_selector=f"{names.LABEL_MANAGED_BY}=kvc"
    ).items
    assert len(all_claims) == 2 * count
    assert {c.metadata.labels[names.LABEL_VOLUMEMANAGER_UID] for c in all_claims} == uids


def test_time_from_create_to_running_for_nfs(vms: VolumeManagers) -> None:
    """20 sequential NFS VolumeManagers; prints the median (see the closing note)."""
    durations = []
    for i in range(20):
        started = time.monotonic()
        vms.create(f"timed-{i}", [nfs_volume("a")])
        vms.wait_state(f"timed-{i}", "Running", timeout=30)
        durations.append(time.monotonic() - started)
    median = statistics.median(durations)
    print(f"\nNFS VolumeManager create -> Running over 20 runs: median {median:.2f}s, max {max(durations):.2f}s")
    assert median < 10
