from __future__ import annotations

import datetime as dt

import pytest
from kubernetes import client

from kvc.api import names
from kvc.api.models import VolumeConfig, VolumePhase
from kvc.sources._claims import ClaimRecord, VolumeRecord, orphaned_volumes, owner_uid, stale_claims
from kvc.sources.base import VolumeManagerRef
from kvc.sources.nfs import (
    NFSSource,
    build_claim,
    build_persistent_volume,
    claim_status,
    object_names,
    source_hash,
    volume_created,
)

OWNER = VolumeManagerRef(namespace="team-a", name="datasets", uid="1234-uid")


def config(**fields: object) -> VolumeConfig:
    base: dict[str, object] = {
        "id": "shared",
        "sourceType": "NFS",
        "accessMode": "ReadWriteMany",
        "capacity": "5Gi",
        "labels": {"team": "vision"},
        "options": {"server": "10.0.0.5", "path": "/exports/data"},
    }
    base.update(fields)
    return VolumeConfig.model_validate(base)


def test_pv_is_pre_bound_retained_labelled_and_has_no_owner_reference() -> None:
    pv = build_persistent_volume(
        OWNER, config(options={"server": "10.0.0.5", "path": "/x", "mountOptions": "hard, nfsvers=4.1"})
    )
    volume_name, claim_name = object_names(
        OWNER, config(options={"server": "10.0.0.5", "path": "/x", "mountOptions": "hard, nfsvers=4.1"})
    )
    assert pv["metadata"]["name"] == volume_name
    assert "ownerReferences" not in pv["metadata"]
    spec = pv["spec"]
    assert spec["claimRef"] == {"namespace": "team-a", "name": claim_name}
    assert spec["persistentVolumeReclaimPolicy"] == "Retain"
    assert spec["storageClassName"] == names.NFS_STORAGE_CLASS
    assert spec["nfs"] == {"server": "10.0.0.5", "path": "/x", "readOnly": False}
    assert spec["mountOptions"] == ["hard", "nfsvers=4.1"]
    labels = pv["metadata"]["labels"]
    assert labels["team"] == "vision"
    assert labels[names.LABEL_VOLUMEMANAGER_UID] == "1234-uid"
    assert labels[names.LABEL_VOLUME_ID] == "shared"


def test_given_its_claims_uid_the_pv_is_bound_to_that_very_claim() -> None:
    _, claim_name = object_names(OWNER, config())
    pv = build_persistent_volume(OWNER, config(), claim_uid="claim-uid-1")
    assert pv["spec"]["claimRef"] == {"namespace": "team-a", "name": claim_name, "uid": "claim-uid-1"}


def test_the_volume_created_patch_only_annotates_the_claim() -> None:
    when = dt.datetime(2026, 11, 29, 7, 45, 0, tzinfo=dt.UTC)
    assert volume_created(when) == {
        "metadata": {"annotations": {names.ANNOTATION_VOLUME_CREATED: "2026-11-29T07:45:00Z"}}
    }


def test_claim_is_owned_by_the_volumemanager_and_names_its_pv() -> None:
    claim = build_claim(OWNER, config())
    volume_name, claim_name = object_names(OWNER, config())
    assert claim["metadata"]["name"] == claim_name
    assert claim["metadata"]["namespace"] == "team-a"
    (owner,) = claim["metadata"]["ownerReferences"]
    assert owner["kind"] == "VolumeManager"
    assert owner["uid"] == "1234-uid"
    assert owner["controller"] is True
    assert claim["spec"]["volumeName"] == volume_name
    assert claim["spec"]["resources"] == {"requests": {"storage": "5Gi"}}


def test_capacity_defaults_for_pv_and_claim() -> None:
    cfg = config(capacity=None)
    assert build_persistent_volume(OWNER, cfg)["spec"]["capacity"] == {"storage": "1Gi"}
    assert build_claim(OWNER, cfg)["spec"]["resources"]["requests"]["storage"] == "1Gi"


def test_read_only_many_mounts_read_only() -> None:
    cfg = config(accessMode="ReadOnlyMany")
    assert build_persistent_volume(OWNER, cfg)["spec"]["nfs"]["readOnly"] is True
    assert claim_status(cfg, OWNER, "Bound").volume_source == {
        "persistentVolumeClaim": {"claimName": object_names(OWNER, cfg)[1], "readOnly": True}
    }


def test_a_new_source_means_new_names_and_the_same_source_the_same_names() -> None:
    assert object_names(OWNER, config()) == object_names(OWNER, config())
    moved = config(options={"server": "10.0.0.5", "path": "/exports/v2"})
    assert source_hash(moved) != source_hash(config())
    assert set(object_names(OWNER, moved)).isdisjoint(object_names(OWNER, config()))


def test_names_fit_kubernetes_limits_for_long_namespaces_and_names() -> None:
    owner = VolumeManagerRef(namespace="n" * 63, name="v" * 253, uid="u")
    volume_name, claim_name = object_names(owner, config(id="i" * 63))
    assert len(volume_name) <= 253
    assert len(claim_name) <= 63


@pytest.mark.parametrize(
    ("phase", "expected", "fragment"),
    [
        ("Bound", VolumePhase.READY, "bound to 10.0.0.5:/exports/data"),
        ("Pending", VolumePhase.PROVISIONING, "the claim is Pending"),
        (None, VolumePhase.PROVISIONING, "the claim is being created"),
        ("Lost", VolumePhase.FAILED, "lost its PersistentVolume"),
    ],
)
def test_claim_phase_maps_to_volume_phase(phase: str | None, expected: VolumePhase, fragment: str) -> None:
    status = claim_status(config(), OWNER, phase)
    assert status.phase == expected
    assert fragment in status.message


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"options": {"path": "/x"}}, "options.server is required for NFS volumes"),
        ({"options": {"server": "nfs"}}, "options.path is required for NFS volumes"),
        ({"options": {"server": "  ", "path": "/x"}}, "options.server is required"),
        ({"options": {"server": "nfs", "path": "x"}}, "options.path must be an absolute export path"),
        ({"options": {"server": "nfs://host", "path": "/x"}}, "options.server must be a host name or IP address"),
        ({"accessMode": "ReadWriteOnce"}, "accessMode ReadWriteOnce is not supported by NFS volumes"),
    ],
)
def test_validation_names_the_field_and_the_fix(fields: dict[str, object], problem: str) -> None:
    problems = NFSSource().validate(config(**fields))
    assert any(problem in p for p in problems), problems


def test_a_valid_config_has_no_problems() -> None:
    assert NFSSource().validate(config()) == []


# --------------------------------------------------------------------------- stale claims and PVs


def claim_record(volume_id: str, config_for: VolumeConfig | None = None, **fields: object) -> ClaimRecord:
    labels = {names.LABEL_MANAGED_BY: names.MANAGED_BY, names.LABEL_VOLUME_ID: volume_id}
    if config_for is not None:
        labels[names.LABEL_SOURCE_HASH] = source_hash(config_for)
    return ClaimRecord(namespace="team-a", name=f"claim-{volume_id}", labels=labels, **fields)  # type: ignore[arg-type]


def test_a_claim_is_stale_when_its_volume_is_gone_or_its_source_changed() -> None:
    current = config()
    moved = config(options={"server": "10.0.0.6", "path": "/exports/data"})
    claims = [
        claim_record("shared", current),  # current: kept
        claim_record("removed", current),  # id gone from the spec
        claim_record("shared", moved),  # an older source of the same id
        claim_record("removed", current, deleting=True),  # already going
    ]
    stale = stale_claims(claims, "NFS", {"shared": current}, source_hash)
    assert stale == [claims[1], claims[2]]


def test_an_invalid_or_retyped_volume_keeps_its_claims_until_fixed() -> None:
    claims = [claim_record("shared", config())]
    assert stale_claims(claims, "NFS", {"shared": None}, source_hash) == []
    s3 = VolumeConfig.model_validate({"id": "shared", "sourceType": "S3", "options": {"bucket": "b"}})
    assert stale_claims(claims, "NFS", {"shared": s3}, source_hash) == []


def test_claims_not_made_by_kvc_are_never_stale() -> None:
    foreign = ClaimRecord(namespace="team-a", name="theirs", labels={names.LABEL_VOLUME_ID: "gone"})
    assert stale_claims([foreign], "NFS", {}, source_hash) == []


def test_a_pv_is_orphaned_when_its_claim_is_gone_unless_kept() -> None:
    volumes = [
        VolumeRecord(name="pv-live", claim_name="claim-a"),
        VolumeRecord(name="pv-orphan", claim_name="claim-gone"),
        VolumeRecord(name="pv-unbound"),
        VolumeRecord(name="pv-new", claim_name="claim-not-seen-yet"),
        VolumeRecord(name="pv-going", claim_name="claim-gone", deleting=True),
    ]
    orphans = orphaned_volumes(volumes, live_claims={"claim-a"}, keep={"pv-new"})
    assert [v.name for v in orphans] == ["pv-orphan", "pv-unbound"]


def test_claim_and_volume_records_read_typed_objects_once_serialized() -> None:
    serialize = client.ApiClient().sanitize_for_serialization
    raw_claim = {
        "metadata": {
            "name": "c",
            "namespace": "team-a",
            "labels": {"a": "b"},
            "deletionTimestamp": "2026-01-01T00:00:00Z",
            "uid": "claim-uid",
        },
        "status": {"phase": "Bound"},
    }
    typed_claim = client.V1PersistentVolumeClaim(
        metadata=client.V1ObjectMeta(
            name="c", namespace="team-a", labels={"a": "b"}, deletion_timestamp="x", uid="claim-uid"
        ),
        status=client.V1PersistentVolumeClaimStatus(phase="Bound"),
    )
    assert ClaimRecord.from_raw(raw_claim) == ClaimRecord.from_raw(serialize(typed_claim))
    raw_volume = {
        "metadata": {"name": "pv", "labels": {names.LABEL_VOLUMEMANAGER_UID: "u"}},
        "spec": {"claimRef": {"name": "c", "uid": "claim-uid"}},
    }
    typed_volume = client.V1PersistentVolume(
        metadata=client.V1ObjectMeta(name="pv", labels={names.LABEL_VOLUMEMANAGER_UID: "u"}),
        spec=client.V1PersistentVolumeSpec(claim_ref=client.V1ObjectReference(name="c", uid="claim-uid")),
    )
    assert VolumeRecord.from_raw(raw_volume) == VolumeRecord.from_raw(serialize(typed_volume))
    assert ClaimRecord.from_raw(raw_claim).uid == VolumeRecord.from_raw(raw_volume).claim_uid == "claim-uid"
    assert owner_uid(VolumeRecord.from_raw(raw_volume)) == ["u"]
    assert owner_uid(ClaimRecord.from_raw(raw_claim)) == []
