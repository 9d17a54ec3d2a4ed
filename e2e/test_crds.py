"""The VolumeManager and VolumeNode CRDs as the real API server serves them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from e2e.cluster import ControlPlane

GROUP, VERSION = "kvc.kubeflow.org", "v1"


def vmgr(volume_configs: Any, name: str = "datasets") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VolumeManager",
        "metadata": {"name": name},
        "spec": {"volumeConfigs": volume_configs},
    }


def nfs(**overrides: Any) -> dict[str, Any]:
    config = {
        "id": "shared",
        "sourceType": "NFS",
        "accessMode": "ReadWriteMany",
        "capacity": "5Gi",
        "options": {"server": "nfs.example.com", "path": "/exports/data"},
    }
    config.update(overrides)
    return config


INVALID: list[tuple[str, Any, str]] = [
    ("no volumes", [], "spec.volumeConfigs: Invalid value: 0: spec.volumeConfigs in body should have at least 1 items"),
    (
        "volumeConfigs not a list",
        {"id": "x"},
        'spec.volumeConfigs: Invalid value: "object": spec.volumeConfigs in body must be of type array',
    ),
    ("missing id", [{"sourceType": "NFS"}], "spec.volumeConfigs[0].id: Required value"),
    ("missing sourceType", [{"id": "a"}], "spec.volumeConfigs[0].sourceType: Required value"),
    (
        "id with capitals",
        [nfs(id="Cifar")],
        'spec.volumeConfigs[0].id: Invalid value: "Cifar": id must be a DNS label',
    ),
    (
        "id with underscore",
        [nfs(id="cifar_100")],
        'spec.volumeConfigs[0].id: Invalid value: "cifar_100": id must be a DNS label',
    ),
    ("id too long", [nfs(id="a" * 64)], "spec.volumeConfigs[0].id: Too long: may not be more than 63 bytes"),
    ("id ending in dash", [nfs(id="cifar-")], "id must be a DNS label"),
    ("duplicate id", [nfs(), nfs()], 'spec.volumeConfigs[1]: Duplicate value: {"id":"shared"}'),
    (
        "replicas zero",
        [nfs(replicas=0)],
        "spec.volumeConfigs[0].replicas: Invalid value: 0: spec.volumeConfigs[0].replicas in body should be greater than or equal to 1",
    ),
    (
        "replicas negative",
        [nfs(replicas=-2)],
        "spec.volumeConfigs[0].replicas in body should be greater than or equal to 1",
    ),
    (
        "replicas a string",
        [nfs(replicas="two")],
        'spec.volumeConfigs[0].replicas: Invalid value: "string": spec.volumeConfigs[0].replicas in body must be of type integer',
    ),
    (
        "unknown accessMode",
        [nfs(accessMode="ReadWriteSometimes")],
        'spec.volumeConfigs[0].accessMode: Unsupported value: "ReadWriteSometimes"',
    ),
    (
        "sourceType with spaces",
        [nfs(sourceType="my nfs")],
        'spec.volumeConfigs[0].sourceType: Invalid value: "my nfs": sourceType must be a word',
    ),
    (
        "capacity not a quantity",
        [nfs(capacity="5 gigs")],
        'spec.volumeConfigs[0].capacity: Invalid value: "5 gigs": capacity must be a positive quantity',
    ),
    ("capacity zero", [nfs(capacity="0")], "capacity must be a positive quantity"),
    (
        "option not a string",
        [nfs(options={"server": "nfs", "port": 2049})],
        'spec.volumeConfigs[0].options.port: Invalid value: "integer": spec.volumeConfigs[0].options.port in body must be of type string',
    ),
    (
        "bad label key",
        [nfs(labels={"bad key!": "x"})],
        "spec.volumeConfigs[0].labels: Invalid value: label keys must be valid Kubernetes label keys",
    ),
    (
        "bad label value",
        [nfs(labels={"team": "-vision"})],
        "spec.volumeConfigs[0].labels: Invalid value: label values must be at most 63 characters",
    ),
    (
        "affinity operator",
        [
            nfs(
                nodeAffinity={
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Near"}]}]
                    }
                }
            )
        ],
        'spec.volumeConfigs[0].nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator: Unsupported value: "Near"',
    ),
    (
        "affinity without terms",
        [nfs(nodeAffinity={"requiredDuringSchedulingIgnoredDuringExecution": {}})],
        "spec.volumeConfigs[0].nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms: Required value",
    ),
    (
        "toleration effect",
        [nfs(tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoRun"}])],
        'spec.volumeConfigs[0].tolerations[0].effect: Unsupported value: "NoRun"',
    ),
    (
        "too many volumes",
        [nfs(id=f"v{i}") for i in range(65)],
        "spec.volumeConfigs: Too many: 65: must have at most 64 items",
    ),
]


@pytest.mark.usefixtures("kvc_crds")
@pytest.mark.parametrize(
    ("volume_configs", "message"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID]
)
def test_invalid_volumemanager_is_rejected_with_a_message_naming_the_field(
    api: Any, namespace: str, volume_configs: Any, message: str
) -> None:
    with pytest.raises(ApiException) as excinfo:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, "volumemanagers", vmgr(volume_configs)
        )
    assert excinfo.value.status == 422
    assert message in json.loads(excinfo.value.body)["message"]


@pytest.mark.usefixtures("kvc_crds")
def test_valid_volumemanager_gets_defaults_and_prints_columns(
    control_plane: ControlPlane, api: Any, namespace: str
) -> None:
    created = client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "volumemanagers",
        vmgr([{"id": "cifar100", "sourceType": "S3", "options": {"sourceURL": "s3://b/k"}}, nfs()]),
    )
    first = created["spec"]["volumeConfigs"][0]
    assert first["replicas"] == 1
    assert first["accessMode"] == "ReadWriteOnce"
    table = control_plane.kubectl("get", "vmgr", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert table[0].split() == ["NAME", "STATE", "READY", "AGE", "MESSAGE"]
    assert table[1].startswith("datasets")
    narrow = control_plane.kubectl("get", "kvc", "-n", namespace).stdout.splitlines()
    assert narrow[0].split() == ["NAME", "STATE", "READY", "AGE"]


@pytest.mark.usefixtures("kvc_crds")
def test_kubectl_explain_shows_field_descriptions(control_plane: ControlPlane) -> None:
    explained = control_plane.kubectl("explain", "volumemanager.spec.volumeConfigs").stdout
    assert "One entry per volume" in explained
    for field in (
        "id",
        "sourceType",
        "replicas",
        "accessMode",
        "capacity",
        "labels",
        "nodeAffinity",
        "tolerations",
        "options",
    ):
        assert f"  {field}\t" in explained or f"  {field} " in explained, field
    options = control_plane.kubectl("explain", "volumemanager.spec.volumeConfigs.options").stdout
    assert "awsCredentialsSecretName" in options


@pytest.mark.usefixtures("kvc_crds")
def test_volumenode_is_cluster_scoped_with_a_status_subresource(api: Any) -> None:
    custom = client.CustomObjectsApi(api)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VolumeNode",
        "metadata": {"name": "crd-test-node"},
        "spec": {
            "replicas": [
                {
                    "name": "ns.vm.data-abc",
                    "volumeManager": {"namespace": "ns", "name": "vm"},
                    "volumeId": "data",
                    "sourceType": "S3",
                    "path": "/var/lib/kvc/ns/vm/data-abc",
                }
            ]
        },
        "status": {"heartbeatTime": "2026-01-01T00:00:00Z"},
    }
    created = custom.create_cluster_custom_object(GROUP, VERSION, "volumenodes", body)
    try:
        assert "status" not in created  # status is written through its subresource only
        created["status"] = {"replicas": [{"name": "ns.vm.data-abc", "phase": "Ready", "bytes": 10}]}
        updated = custom.replace_cluster_custom_object_status(GROUP, VERSION, "volumenodes", "crd-test-node", created)
        assert updated["status"]["replicas"][0]["phase"] == "Ready"
        updated["status"]["replicas"][0]["phase"] = "Done"
        with pytest.raises(ApiException) as excinfo:
            custom.replace_cluster_custom_object_status(GROUP, VERSION, "volumenodes", "crd-test-node", updated)
        assert 'status.replicas[0].phase: Unsupported value: "Done"' in json.loads(excinfo.value.body)["message"]
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, "volumenodes", "crd-test-node")


@pytest.mark.usefixtures("kvc_crds")
def test_samples_are_accepted_by_the_api_server(control_plane: ControlPlane, namespace: str) -> None:
    samples = Path(__file__).resolve().parent.parent / "deploy" / "samples"
    result = control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-k", str(samples))
    applied = sorted(line.split()[0] for line in result.stdout.splitlines())
    assert applied == [
        "volumemanager.kvc.kubeflow.org/datasets",
        "volumemanager.kvc.kubeflow.org/models",
        "volumemanager.kvc.kubeflow.org/scratch",
        "volumemanager.kvc.kubeflow.org/shared-datasets",
    ]
