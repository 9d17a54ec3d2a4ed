"""Hypothesis strategies for pods and the KVC volumes they ask for.

Shared by the property tests of the mutation (tests/webhook) and by the e2e test that
has the real API server validate wired pods, so both explore the same space: several
containers and init containers with mounts of their own, existing required and preferred
node affinity, other scheduling gates, spec.nodeName, hostPath and PVC volumes in every
phase, and annotations that choose paths, containers and writability.

Every generated pod is valid for the API server as it is; what the webhook adds must keep
it valid (or be refused with a MutationError).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from kvc.wiring import grammar
from kvc.wiring.mutation import ResolvedVolume

_NAMES = st.sampled_from(["main", "trainer", "sidecar", "eval", "fetch", "warmup", "logger"])
_VOLUME_IDS = st.sampled_from(["cifar", "imagenet", "bert", "scratch", "coco"])
_LABEL_KEYS = st.sampled_from(["zone", "kubernetes.io/arch", "gpu", "team.example.com/pool"])
_LABEL_VALUES = st.sampled_from(["a", "b", "amd64", "a100"])
PHASES = ("Ready", "Ready", "Ready", "Degraded", "Provisioning", "Pending")


def _rarely() -> st.SearchStrategy[bool]:
    """True one time in eight: for the inputs that must be refused, so most cases get wired."""
    return st.integers(0, 7).map(lambda n: n == 0)


@dataclass(frozen=True)
class Case:
    """A pod, the annotations it carries, and the volumes they resolve to."""

    pod: dict[str, Any]
    annotations: Mapping[str, str]
    volumes: Sequence[ResolvedVolume]

    @property
    def request(self) -> grammar.VolumeRequest:
        parsed = grammar.parse(self.annotations)
        assert parsed is not None
        return parsed


@st.composite
def _expression(draw: st.DrawFn) -> dict[str, Any]:
    key = draw(_LABEL_KEYS)
    if draw(st.booleans()):
        return {"key": key, "operator": "Exists"}
    return {"key": key, "operator": draw(st.sampled_from(["In", "NotIn"])), "values": [draw(_LABEL_VALUES)]}


@st.composite
def _affinity(draw: st.DrawFn) -> dict[str, Any]:
    node_affinity: dict[str, Any] = {}
    if draw(st.booleans()):
        terms = draw(st.lists(st.lists(_expression(), min_size=1, max_size=2), min_size=1, max_size=3))
        node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {
            "nodeSelectorTerms": [{"matchExpressions": term} for term in terms]
        }
    if draw(st.booleans()):
        node_affinity["preferredDuringSchedulingIgnoredDuringExecution"] = [
            {"weight": draw(st.integers(1, 100)), "preference": {"matchExpressions": [draw(_expression())]}}
        ]
    return {"nodeAffinity": node_affinity}


def _container(name: str, mounts: Sequence[str]) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": "busybox:1.36"}
    if mounts:
        container["volumeMounts"] = [{"name": "own", "mountPath": path} for path in mounts]
    return container


@st.composite
def _mount_paths(draw: st.DrawFn, volume_ids: Sequence[str]) -> list[str]:
    # Sometimes a path KVC would use by default: the mutation must then refuse, not clash.
    paths = draw(st.lists(st.sampled_from(["/cache", "/tmp/work", "/var/log/app"]), max_size=2, unique=True))
    if draw(_rarely()):
        paths.append(f"{grammar.DEFAULT_MOUNT_ROOT}/{draw(st.sampled_from(volume_ids))}")
    return paths


@st.composite
def _volume(draw: st.DrawFn, volume_id: str) -> ResolvedVolume:
    manager = draw(st.sampled_from(["datasets", "models"]))
    phase = draw(st.sampled_from(PHASES))
    if draw(st.booleans()):
        label = f"data.kvc.kubeflow.org/{manager}-{volume_id}-0123456789"
        return ResolvedVolume(
            ref=grammar.VolumeRef(volume_id),
            manager=manager,
            volume_id=volume_id,
            phase=phase,
            message="",
            volume_source={"hostPath": {"path": f"/var/lib/kvc/ns/{manager}/{volume_id}", "type": "Directory"}},
            node_affinity={
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [{"key": label, "operator": "Exists"}]}]
                }
            },
            access_mode="ReadOnlyMany",
        )
    return ResolvedVolume(
        ref=grammar.VolumeRef(volume_id),
        manager=manager,
        volume_id=volume_id,
        phase=phase,
        message="",
        volume_source={"persistentVolumeClaim": {"claimName": f"{manager}-{volume_id}-abc"}},
        node_affinity=None,
        access_mode=draw(st.sampled_from(["ReadWriteMany", "ReadOnlyMany", "ReadWriteOnce"])),
    )


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A pod with one to three KVC volumes asked for in its annotations."""
    volume_ids = draw(st.lists(_VOLUME_IDS, min_size=1, max_size=3, unique=True))
    names = draw(st.lists(_NAMES, min_size=1, max_size=4, unique=True))
    app_count = draw(st.integers(1, len(names)))
    app = [_container(n, draw(_mount_paths(volume_ids))) for n in names[:app_count]]
    init = [_container(n, draw(_mount_paths(volume_ids))) for n in names[app_count:]]
    spec: dict[str, Any] = {"containers": app, "volumes": [{"name": "own", "emptyDir": {}}]}
    if init:
        spec["initContainers"] = init
    if draw(st.booleans()):
        spec["affinity"] = draw(_affinity())
    if draw(_rarely()):
        spec["nodeName"] = "kvc-node-1"
    elif draw(st.booleans()):
        spec["schedulingGates"] = [{"name": "example.com/quota"}]

    annotations = {grammar.VOLUME: ",".join(volume_ids)}
    if len(volume_ids) == 1 and draw(st.booleans()):
        annotations[grammar.MOUNT_PATH] = "/data"
    for volume_id in volume_ids[1:]:
        if draw(st.booleans()):
            annotations[f"{grammar.MOUNT_PATH_FOR}{volume_id}"] = f"/mnt/{volume_id}"
    if draw(st.booleans()):
        # Mostly names the pod has; sometimes one it lacks.
        chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
        if draw(_rarely()):
            chosen.append("ghost")
        annotations[grammar.CONTAINERS] = ",".join(chosen)
    volumes = [draw(_volume(volume_id)) for volume_id in volume_ids]
    if draw(st.booleans()):
        writable = all(v.access_mode != "ReadOnlyMany" for v in volumes)
        annotations[grammar.READ_ONLY] = "false" if writable or draw(_rarely()) else "true"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "prop", "annotations": {}}, "spec": spec}
    return Case(pod=pod, annotations=annotations, volumes=volumes)


def expected_refusal(case: Case) -> bool:
    """Whether the mutation must refuse ``case`` (an oracle written apart from the code)."""
    request = case.request
    spec = case.pod["spec"]
    pending = [v for v in case.volumes if v.phase not in ("Ready", "Degraded")]
    if pending and spec.get("nodeName"):
        return True
    if not request.read_only and any(v.access_mode == "ReadOnlyMany" for v in case.volumes):
        return True
    everyone = {c["name"]: c for c in [*spec["containers"], *spec.get("initContainers", [])]}
    if request.containers is not None and any(n not in everyone for n in request.containers):
        return True
    targets = spec["containers"] if request.containers is None else [everyone[n] for n in request.containers]
    paths = set(request.mount_paths.values())
    return any(m["mountPath"] in paths for c in targets for m in c.get("volumeMounts", []))
