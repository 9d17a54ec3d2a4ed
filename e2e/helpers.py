"""Helpers shared by the e2e tests: waiting, and VolumeManagers in a test namespace."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from kvc.agent.files import MANIFEST
from kvc.api import names

GROUP, VERSION, PLURAL = names.GROUP, names.VERSION, names.VOLUMEMANAGER_PLURAL

# What Pod Security `restricted`, which the e2e namespaces enforce, asks of a pod and of each
# of its containers (a non-root user, the runtime's seccomp profile, no privilege escalation,
# no capabilities).
RESTRICTED_POD_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER_SECURITY: dict[str, Any] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def restricted_container(name: str = "main", **fields: Any) -> dict[str, Any]:
    """A container that Pod Security `restricted` admits."""
    return {
        "name": name,
        "image": "busybox:1.36",
        "command": ["sleep", "3600"],
        "securityContext": RESTRICTED_CONTAINER_SECURITY,
        **fields,
    }


def restricted_pod(name: str, annotations: Mapping[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    """A Pod that Pod Security `restricted` admits: one ``restricted_container()`` unless ``spec`` says otherwise."""
    metadata: dict[str, Any] = {"name": name}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {
        "metadata": metadata,
        "spec": {"securityContext": RESTRICTED_POD_SECURITY, "containers": [restricted_container()], **spec},
    }


def tree(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every data file under a replica directory."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def wait_for(check: Callable[[], Any], timeout: float = 60, what: str = "condition", interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


class VolumeManagers:
    """Create, read and wait on VolumeManagers in one namespace."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.namespace = namespace

    def create(self, name: str, volumes: list[dict[str, Any]]) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "VolumeManager",
            "metadata": {"name": name},
            "spec": {"volumeConfigs": volumes},
        }
        result: dict[str, Any] = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, body
        )
        return result

    def get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        return result

    def set_volumes(self, name: str, volumes: list[dict[str, Any]]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": {"volumeConfigs": volumes}}
        )

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def exists(self, name: str) -> bool:
        try:
            self.get(name)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def wait_state(self, name: str, state: str, timeout: float = 60) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            vm = self.get(name)
            status = vm.get("status") or {}
            current = status.get("observedGeneration") == vm["metadata"]["generation"]
            return vm if current and status.get("state") == state else None

        result: dict[str, Any] = wait_for(reached, timeout, f"{self.namespace}/{name} to be {state}")
        return result

    def volume(self, name: str, volume_id: str) -> dict[str, Any]:
        """The volume's status entry; {} until the controller has reported it."""
        for volume in self.get(name).get("status", {}).get("volumes", []):
            if volume["id"] == volume_id:
                return dict(volume)
        return {}  # not reported yet

    def claims(self, name: str) -> list[Any]:
        uid = self.get(name)["metadata"]["uid"]
        selector = f"{names.LABEL_VOLUMEMANAGER_UID}={uid}"
        return list(self.core.list_namespaced_persistent_volume_claim(self.namespace, label_selector=selector).items)

    def volumes_of(self, uid: str) -> list[Any]:
        selector = f"{names.LABEL_VOLUMEMANAGER_UID}={uid}"
        return list(self.core.list_persistent_volume(label_selector=selector).items)

    def events(self, name: str) -> list[Any]:
        return list(
            self.core.list_namespaced_event(
                self.namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=VolumeManager"
            ).items
        )


def operator_pods(stored: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The pods a training operator would create from the stored job's templates."""
    field = "tfReplicaSpecs" if stored["kind"] == "TFJob" else "pytorchReplicaSpecs"
    pods = []
    for role, replica in stored["spec"][field].items():
        for i in range(replica.get("replicas", 1)):
            template = replica["template"]
            pods.append(
                {
                    "metadata": {
                        **template.get("metadata", {}),
                        "name": f"{stored['metadata']['name']}-{role.lower()}-{i}",
                    },
                    "spec": template["spec"],
                }
            )
    return pods


TRAINING_CRDS = Path(__file__).parent / "manifests" / "kubeflow-training-crds.yaml"


def apply_training_crds(plane: Any) -> None:
    """Kubeflow's TFJob and PyTorchJob CRDs (pinned in e2e/manifests), applied and Established."""
    plane.kubectl("apply", "--server-side", "-f", str(TRAINING_CRDS))
    plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/tfjobs.kubeflow.org",
        "crd/pytorchjobs.kubeflow.org",
    )


def job(
    kind: str,
    name: str,
    replicas: dict[str, int],
    annotations: dict[str, str],
    template_annotations: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    field = {"TFJob": "tfReplicaSpecs", "PyTorchJob": "pytorchReplicaSpecs"}[kind]
    main = restricted_container("tensorflow" if kind == "TFJob" else "pytorch")
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": kind,
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            field: {
                role: {
                    "replicas": count,
                    "restartPolicy": "OnFailure",
                    "template": {
                        "metadata": {
                            "annotations": (template_annotations or {}).get(role, {}),
                            "labels": {"training.kubeflow.org/replica-type": role.lower()},
                        },
                        "spec": {"securityContext": RESTRICTED_POD_SECURITY, "containers": [main]},
                    },
                }
                for role, count in replicas.items()
            }
        },
    }
