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
from kvc.wiring.mutation import WORKLOADS

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


def s3_config(s3: Any, bucket: str, replicas: int = 2, volume_id: str = "cifar") -> dict[str, Any]:
    """An S3 volume over ``s3_data``'s objects (prefix cifar/), credentials in Secret aws-creds."""
    return {
        "id": volume_id,
        "sourceType": "S3",
        "replicas": replicas,
        "accessMode": "ReadOnlyMany",
        "options": {
            "sourceURL": f"s3://{bucket}/cifar/",
            "endpointURL": s3.endpoint_url,
            "awsCredentialsSecretName": "aws-creds",
        },
    }


def wait_running(core: Any, namespace: str, name: str, timeout: float = 60) -> Any:
    def running() -> Any:
        pod = core.read_namespaced_pod(name, namespace)
        return pod if pod.status.phase == "Running" else None

    return wait_for(running, timeout=timeout, what=f"pod {name} Running")


def webhook_knows(core: Any, namespace: str, ref: str) -> bool:
    """Whether the webhook finds the volume ``ref`` (a dry-run admission of a pod asking for it)."""
    try:
        core.create_namespaced_pod(namespace, restricted_pod("probe", {"kvc/volume": ref}), dry_run="All")
    except ApiException as exc:
        if "not found in namespace" in str(exc.body):
            return False
        raise
    return True


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


def _made_from(template: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The pod an operator makes from a pod template (its metadata and spec, under its own name)."""
    return {"metadata": {**template.get("metadata", {}), "name": name}, "spec": template["spec"]}


# The list fields of a pod template that a strategic merge patch merges by key (corev1's
# patchMergeKey); every other list is replaced.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "imagePullSecrets": "name",
    "schedulingGates": "name",
    "volumeMounts": "mountPath",
}


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """``patch`` merged into ``base`` as a strategic merge patch of a pod template merges them
    (what Kubeflow Trainer does with a TrainJob's runtimePatches): objects member by member,
    the lists in ``_MERGE_KEYS`` item by item by their key, anything else replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value, key) if key in base else value
        return merged
    key = _MERGE_KEYS.get(field)
    if key and isinstance(base, list) and isinstance(patch, list):
        by_key = {item[key]: item for item in base}
        for item in patch:
            by_key[item[key]] = strategic_merge(by_key[item[key]], item) if item[key] in by_key else item
        return list(by_key.values())
    return patch


def trainjob_runtime_node(container: str = "node") -> dict[str, Any]:
    """The pod template of the ``node`` job of a training runtime like Kubeflow Trainer's
    torch-distributed: one trainer container named ``node``, admitted by Pod Security `restricted`."""
    return {
        "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
        "spec": {"securityContext": RESTRICTED_POD_SECURITY, "containers": [restricted_container(container)]},
    }


def operator_pods(stored: Mapping[str, Any], runtime_node: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The pods a workload's operator would create from the stored object's templates.

    Every replica of a TFJob or PyTorchJob; every pod of every job of a JobSet; the leader and
    the workers of every LeaderWorkerSet group; every training node of a TrainJob, made from
    its runtime's ``node`` pod template (``runtime_node``) with the job's runtimePatches of
    the ``node`` job merged in, in order, as Kubeflow Trainer merges them.
    """
    name, spec = stored["metadata"]["name"], stored["spec"]
    if stored["kind"] == "JobSet":
        return [
            _made_from(job["template"]["spec"]["template"], f"{name}-{job['name']}-{index}-{pod}")
            for job in spec["replicatedJobs"]
            for index in range(job.get("replicas", 1))
            for pod in range(job["template"]["spec"].get("parallelism", 1))
        ]
    if stored["kind"] == "LeaderWorkerSet":
        groups = spec["leaderWorkerTemplate"]
        leader = groups.get("leaderTemplate", groups["workerTemplate"])
        return [
            _made_from(leader if worker == 0 else groups["workerTemplate"], f"{name}-{group}-{worker}")
            for group in range(spec.get("replicas", 1))
            for worker in range(groups.get("size", 1))
        ]
    if stored["kind"] == "TrainJob":
        assert runtime_node is not None, "a TrainJob's pods are made from its runtime's template"
        template: Any = runtime_node
        for patch in spec.get("runtimePatches", []):
            for job in (
                patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", [])
            ):
                if job["name"] == "node":
                    template = strategic_merge(template, job.get("template", {}).get("spec", {}).get("template", {}))
        nodes = spec.get("trainer", {}).get("numNodes", 1)
        return [_made_from(template, f"{name}-node-0-{index}") for index in range(nodes)]
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


MANIFESTS = Path(__file__).parent / "manifests"
# The CRDs of the training workloads KVC wires, as their projects publish them (pinned, with
# where each came from, in e2e/manifests).
WORKLOAD_CRDS = {
    "crd/trainjobs.trainer.kubeflow.org": MANIFESTS / "trainer-v2.3.0-trainjobs.yaml",
    "crd/jobsets.jobset.x-k8s.io": MANIFESTS / "jobset-v0.12.0-jobsets.yaml",
    "crd/leaderworkersets.leaderworkerset.x-k8s.io": MANIFESTS / "lws-v0.9.0-leaderworkersets.yaml",
}


def apply_workload_crds(plane: Any) -> None:
    """The TrainJob, JobSet and LeaderWorkerSet CRDs (pinned in e2e/manifests), applied and Established."""
    for manifest in WORKLOAD_CRDS.values():
        # Server-side: the CRDs are too large for the last-applied annotation of a client-side apply.
        plane.kubectl("apply", "--server-side", "-f", str(manifest))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", *WORKLOAD_CRDS)


def create_workload(custom: Any, namespace: str, body: Mapping[str, Any], **options: Any) -> dict[str, Any]:
    """Create a training workload of any kind KVC wires; returns what the API server answered."""
    workload = WORKLOADS[body["kind"]]
    created: dict[str, Any] = custom.create_namespaced_custom_object(
        workload.group, workload.version, namespace, workload.plural, body, **options
    )
    return created


def read_workload(custom: Any, namespace: str, kind: str, name: str) -> dict[str, Any]:
    """The workload as the API server stored it (pruned to its CRD's schema)."""
    workload = WORKLOADS[kind]
    stored: dict[str, Any] = custom.get_namespaced_custom_object(
        workload.group, workload.version, namespace, workload.plural, name
    )
    return stored


def _pod_template(annotations: Mapping[str, str] | None, container: str, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"annotations": dict(annotations or {})},
        "spec": {"securityContext": RESTRICTED_POD_SECURITY, "containers": [restricted_container(container)], **spec},
    }


def jobset(
    name: str,
    annotations: Mapping[str, str],
    jobs: Mapping[str, int],
    template_annotations: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """A JobSet with a replicated job per ``jobs`` entry (name -> pods per job), each pod one
    restricted container; ``template_annotations``: a replicated job's pod template annotations."""
    return {
        "apiVersion": f"{WORKLOADS['JobSet'].group}/{WORKLOADS['JobSet'].version}",
        "kind": "JobSet",
        "metadata": {"name": name, "annotations": dict(annotations)},
        "spec": {
            "replicatedJobs": [
                {
                    "name": job_name,
                    "replicas": 1,
                    "template": {
                        "spec": {
                            "parallelism": pods,
                            "completions": pods,
                            "template": _pod_template(
                                (template_annotations or {}).get(job_name), "main", restartPolicy="Never"
                            ),
                        }
                    },
                }
                for job_name, pods in jobs.items()
            ]
        },
    }


def leaderworkerset(
    name: str,
    annotations: Mapping[str, str],
    size: int = 2,
    leader_annotations: Mapping[str, str] | None = None,
    worker_annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A LeaderWorkerSet of one group: a leader and ``size - 1`` workers, each one restricted container."""
    return {
        "apiVersion": f"{WORKLOADS['LeaderWorkerSet'].group}/{WORKLOADS['LeaderWorkerSet'].version}",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": name, "annotations": dict(annotations)},
        "spec": {
            "replicas": 1,
            "leaderWorkerTemplate": {
                "size": size,
                "leaderTemplate": _pod_template(leader_annotations, "leader"),
                "workerTemplate": _pod_template(worker_annotations, "worker"),
            },
        },
    }


def trainjob(name: str, annotations: Mapping[str, str], nodes: int = 2) -> dict[str, Any]:
    """A TrainJob of ``nodes`` training nodes on the torch-distributed runtime (whose pod template
    ``trainjob_runtime_node`` stands for: no Trainer controller runs in these tests)."""
    return {
        "apiVersion": f"{WORKLOADS['TrainJob'].group}/{WORKLOADS['TrainJob'].version}",
        "kind": "TrainJob",
        "metadata": {"name": name, "annotations": dict(annotations)},
        "spec": {"runtimeRef": {"name": "torch-distributed"}, "trainer": {"numNodes": nodes}},
    }


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
