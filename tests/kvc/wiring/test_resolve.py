from __future__ import annotations

from typing import Any

import pytest

from kvc.api.models import VolumeConfig
from kvc.sources import _nodelocal
from kvc.sources.base import VolumeManagerRef
from kvc.sources.nfs import NFSSource
from kvc.sources.registry import load_registry
from kvc.sources.s3 import S3Source
from kvc.wiring import grammar
from kvc.wiring.mutation import GATE, MutationError, wire_pod
from kvc.wiring.resolve import catalog_entries, resolve
from webhook.index import VolumeIndex

SOURCE = {"hostPath": {"path": "/var/lib/kvc/ns/vm/x", "type": "Directory"}}


def vmgr(name: str, *volumes: tuple[str, str], deleting: bool = False) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": "team-a"}
    if deleting:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "metadata": metadata,
        "spec": {"volumeConfigs": [{"id": vid, "sourceType": "S3"} for vid, _ in volumes]},
        "status": {
            "volumes": [
                {"id": vid, "phase": phase, "message": f"{vid} is {phase}", "volumeSource": SOURCE}
                for vid, phase in volumes
            ]
        },
    }


CATALOG = [
    *catalog_entries(vmgr("datasets", ("cifar", "Ready"), ("imagenet", "Provisioning"), ("broken", "Failed"))),
    *catalog_entries(vmgr("models", ("bert", "Degraded"), ("cifar", "Ready"))),
    *catalog_entries(vmgr("old", ("legacy", "Ready"), deleting=True)),
]


def ask(value: str) -> grammar.VolumeRequest:
    parsed = grammar.parse({"kvc/volume": value})
    assert parsed is not None
    return parsed


def test_refs_resolve_in_the_namespace() -> None:
    resolved = resolve(ask("datasets/cifar, bert, imagenet"), "team-a", CATALOG)
    assert [(r.manager, r.volume_id, r.phase, r.ready) for r in resolved] == [
        ("datasets", "cifar", "Ready", True),
        ("models", "bert", "Degraded", True),
        ("datasets", "imagenet", "Provisioning", False),
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nope", "volume nope not found in namespace team-a; volumes there: datasets/broken, datasets/cifar"),
        ("cifar", "volume cifar is in several VolumeManagers of team-a: write datasets/cifar or models/cifar"),
        ("broken", "volume broken is Failed: broken is Failed"),
        ("legacy", "belongs to VolumeManager old, which is being deleted"),
        ("models/imagenet", "volume models/imagenet not found"),
    ],
)
def test_unusable_refs_are_denied_with_what_exists(value: str, message: str) -> None:
    with pytest.raises(MutationError) as excinfo:
        resolve(ask(value), "team-a", CATALOG)
    assert message in str(excinfo.value)


def test_an_empty_namespace_says_so() -> None:
    with pytest.raises(MutationError, match="volumes there: none"):
        resolve(ask("cifar"), "empty", [])


def test_a_volume_the_controller_has_not_reported_is_denied_until_it_has() -> None:
    fresh = catalog_entries({"metadata": {"name": "new"}, "spec": {"volumeConfigs": [{"id": "cifar"}]}})
    assert fresh[0].phase == "Pending"
    with pytest.raises(MutationError, match="has no volume source yet"):
        resolve(ask("cifar"), "team-a", fresh)


def node_local_status(claim: str | None) -> dict[str, Any]:
    volume = vmgr("datasets", ("cifar", "Ready"))
    if claim:
        volume["status"]["volumes"][0]["claimName"] = claim
    return volume


def test_node_local_data_is_wired_through_its_claim_unless_the_admin_opted_into_host_paths() -> None:
    (entry,) = catalog_entries(node_local_status("datasets-cifar-1234"))
    assert entry.volume_source == {"persistentVolumeClaim": {"claimName": "datasets-cifar-1234"}}
    (opted_in,) = catalog_entries(node_local_status("datasets-cifar-1234"), host_path=True)
    assert opted_in.volume_source == SOURCE


def test_a_status_written_before_claims_existed_is_wired_as_it_says() -> None:
    # VolumeManagers of an earlier version until the controller's next pass reports the claim.
    (entry,) = catalog_entries(node_local_status(None))
    assert entry.volume_source == SOURCE


def test_the_index_wires_claims_by_default_and_host_paths_only_when_told() -> None:
    for host_path, expected in [(False, "persistentVolumeClaim"), (True, "hostPath")]:
        index = VolumeIndex(host_path=host_path)
        index.replace_all([node_local_status("datasets-cifar-1234")])
        (entry,) = index.entries("team-a")
        assert entry.volume_source is not None
        assert list(entry.volume_source) == [expected]


REGISTRY = load_registry()


def unreported(*configs: dict[str, Any]) -> dict[str, Any]:
    """A VolumeManager created a moment ago: no status yet."""
    return {
        "metadata": {"name": "fresh", "namespace": "team-a", "uid": "u-1"},
        "spec": {"volumeConfigs": list(configs)},
    }


S3_SPEC: dict[str, Any] = {
    "id": "cifar",
    "sourceType": "S3",
    "options": {"sourceURL": "s3://b/cifar/", "awsCredentialsSecretName": "creds"},
}


def test_a_volume_not_reported_yet_is_wired_to_the_claim_its_spec_names_and_waits() -> None:
    nfs = {"id": "shared", "sourceType": "NFS", "accessMode": "ReadWriteMany", "options": {"server": "n", "path": "/x"}}
    pvc = {"id": "scratch", "sourceType": "PVC", "options": {"claimName": "mine"}}
    entries = catalog_entries(unreported(S3_SPEC, nfs, pvc), registry=REGISTRY)
    owner = VolumeManagerRef("team-a", "fresh", "u-1")
    expected = [
        _nodelocal.claim_name(owner, "cifar", S3Source().digest(VolumeConfig.model_validate(S3_SPEC))),
        NFSSource().claim_name(owner, VolumeConfig.model_validate(nfs)),
        "mine",
    ]
    assert [e.volume_source for e in entries] == [{"persistentVolumeClaim": {"claimName": c}} for c in expected]
    resolved = resolve(ask("cifar, shared, scratch"), "team-a", entries)
    assert [r.ready for r in resolved] == [False, False, False]  # gated until the controller says Ready
    # The very names the controller gives the claims.
    assert expected[0] == S3Source().claim_name(owner, VolumeConfig.model_validate(S3_SPEC))


def test_a_volume_whose_settings_are_wrong_is_refused_at_once_with_the_controllers_words() -> None:
    wrong = {"id": "cifar", "sourceType": "S3", "options": {**S3_SPEC["options"], "endpointUrl": "https://x"}}
    (entry,) = catalog_entries(unreported(wrong), registry=REGISTRY)
    with pytest.raises(MutationError, match=r"volume cifar is Failed: unknown option options.endpointUrl"):
        resolve(ask("cifar"), "team-a", [entry])
    (unknown,) = catalog_entries(unreported({"id": "x", "sourceType": "FTP"}), registry=REGISTRY)
    with pytest.raises(MutationError, match="unknown sourceType 'FTP'"):
        resolve(ask("x"), "team-a", [unknown])
    (invalid,) = catalog_entries(unreported({**S3_SPEC, "replicas": "two"}), registry=REGISTRY)
    with pytest.raises(MutationError, match="volume cifar is Failed: invalid volumeConfig: replicas: "):
        resolve(ask("cifar"), "team-a", [invalid])


def test_with_the_host_path_opt_in_an_unreported_volume_still_waits_for_the_controller() -> None:
    # The node path depends on the controller's data root: only the status can say it.
    (entry,) = catalog_entries(unreported(S3_SPEC), host_path=True, registry=REGISTRY)
    with pytest.raises(MutationError, match="has no volume source yet"):
        resolve(ask("cifar"), "team-a", [entry])


def placed(name: str, **nodes: list[tuple[str, str]]) -> dict[str, Any]:
    """A VolumeManager of node-local volumes, Ready; ``nodes``: volume id -> [(node, phase)]."""
    return {
        "metadata": {"name": name, "namespace": "team-a"},
        "spec": {"volumeConfigs": [{"id": vid, "sourceType": "S3"} for vid in nodes]},
        "status": {
            "volumes": [
                {
                    "id": vid,
                    "phase": "Ready",
                    "volumeSource": SOURCE,
                    "claimName": f"claim-{vid}",
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [{"matchExpressions": [{"key": f"data/{vid}", "operator": "Exists"}]}]
                        }
                    },
                    "nodes": [{"name": node, "phase": phase} for node, phase in held],
                }
                for vid, held in nodes.items()
            ]
        },
    }


def test_the_nodes_holding_a_ready_replica_are_known_and_shared_storage_has_none() -> None:
    (images,) = catalog_entries(placed("datasets", images=[("n1", "Ready"), ("n2", "Provisioning")]))
    assert images.ready_nodes == frozenset({"n1"})
    (cifar, *_rest) = CATALOG
    assert cifar.ready_nodes is None


def test_a_pod_needing_volumes_ready_apart_is_gated_instead_of_pinned_to_no_node() -> None:
    entries = catalog_entries(placed("datasets", images=[("n1", "Ready")], model=[("n2", "Ready")]))
    request = grammar.parse({"kvc/volume": "images,model"})
    assert request is not None
    pod: dict[str, Any] = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}
    wired = wire_pod(pod, request, resolve(request, "team-a", entries))
    assert wired["spec"]["schedulingGates"] == [{"name": GATE}]
    assert "affinity" not in wired["spec"]
    pinned = {**pod, "spec": {**pod["spec"], "nodeName": "n1"}}
    with pytest.raises(MutationError, match=r"no node holds all of images, model yet, and the pod sets spec\.nodeName"):
        wire_pod(pinned, request, resolve(request, "team-a", entries))
    together = catalog_entries(placed("datasets", images=[("n1", "Ready")], model=[("n1", "Ready"), ("n2", "Ready")]))
    placed_pod = wire_pod(pod, request, resolve(request, "team-a", together))
    assert "schedulingGates" not in placed_pod["spec"]
    assert placed_pod["spec"]["affinity"]["nodeAffinity"]
