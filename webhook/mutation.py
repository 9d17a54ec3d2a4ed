"""Wiring a pod spec to KVC volumes (pure): volumes, mounts, node affinity, scheduling gate.

The caller resolves the requested volumes against the VolumeManager index and passes
them here with the pod; everything here works on plain dicts and returns a new object,
so the admission patch is ``jsonpatch.make_patch(original, mutated)`` and a second pass
over a mutated pod changes nothing.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvc.api import names
from webhook import grammar

GATE = names.SCHEDULING_GATE
INJECTED = f"{names.GROUP}/injected"
READ_ONLY_MODES = frozenset({"ReadOnlyMany"})


class MutationError(ValueError):
    """The pod cannot be wired as asked; the message says what to fix."""


@dataclass(frozen=True)
class ResolvedVolume:
    """A requested volume as the VolumeManager status describes it."""

    ref: grammar.VolumeRef
    manager: str
    volume_id: str
    phase: str
    message: str
    volume_source: Mapping[str, Any]
    node_affinity: Mapping[str, Any] | None
    access_mode: str

    @property
    def ready(self) -> bool:
        return self.phase in ("Ready", "Degraded")

    @property
    def volume_name(self) -> str:
        return names.bounded_name("kvc", self.manager, self.volume_id)


def _required_terms(spec: dict[str, Any]) -> list[dict[str, Any]]:
    affinity = spec.setdefault("affinity", {}).setdefault("nodeAffinity", {})
    required = affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
    terms: list[dict[str, Any]] = required.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({"matchExpressions": []})
    return terms


def add_node_affinity(spec: dict[str, Any], expressions: Sequence[Mapping[str, Any]]) -> None:
    """AND ``expressions`` into the pod's required node affinity: appended to every term.

    Terms are ORed by the scheduler, so adding to each keeps the pod's own choices and
    requires the data on whichever term matches. Preferred terms are left as they are.
    """
    if not expressions:
        return
    for term in _required_terms(spec):
        existing = term.setdefault("matchExpressions", [])
        for expression in expressions:
            if dict(expression) not in existing:
                existing.append(dict(expression))


def data_expressions(volumes: Sequence[ResolvedVolume]) -> list[dict[str, Any]]:
    expressions = []
    for volume in volumes:
        required = (volume.node_affinity or {}).get("requiredDuringSchedulingIgnoredDuringExecution") or {}
        for term in required.get("nodeSelectorTerms") or []:
            expressions += [dict(e) for e in term.get("matchExpressions") or []]
    return expressions


def _pod_volume(volume: ResolvedVolume, read_only: bool) -> dict[str, Any]:
    source = copy.deepcopy(dict(volume.volume_source))
    if "persistentVolumeClaim" in source:
        source["persistentVolumeClaim"]["readOnly"] = read_only
    return {"name": volume.volume_name, **source}


def _targets(spec: dict[str, Any], containers: tuple[str, ...] | None) -> list[dict[str, Any]]:
    app = spec.get("containers") or []
    init = spec.get("initContainers") or []
    if containers is None:
        return list(app)
    by_name = {c.get("name"): c for c in [*app, *init]}
    missing = [name for name in containers if name not in by_name]
    if missing:
        known = ", ".join(sorted(str(n) for n in by_name)) or "none"
        raise MutationError(f"kvc/containers names {', '.join(missing)}, which the pod does not have ({known})")
    return [by_name[name] for name in containers]


def wire_pod_spec(
    spec: Mapping[str, Any], request: grammar.VolumeRequest, volumes: Sequence[ResolvedVolume]
) -> dict[str, Any]:
    """A copy of ``spec`` with the volumes, their mounts, and the data's node affinity (or gate)."""
    wired = copy.deepcopy(dict(spec))
    pending = [v for v in volumes if not v.ready]
    if pending and wired.get("nodeName"):
        raise MutationError(
            f"the pod sets spec.nodeName, so it cannot wait for {', '.join(str(v.ref) for v in pending)} "
            "to be provisioned: remove spec.nodeName or create the pod once the data is Ready"
        )
    pod_volumes = wired.setdefault("volumes", [])
    by_name = {v.get("name"): v for v in pod_volumes}
    for volume in volumes:
        if not request.read_only and volume.access_mode in READ_ONLY_MODES:
            raise MutationError(f'volume {volume.ref} is {volume.access_mode}: kvc/read-only "false" is not allowed')
        wanted = _pod_volume(volume, request.read_only)
        existing = by_name.get(volume.volume_name)
        if existing is None:
            pod_volumes.append(wanted)
            by_name[volume.volume_name] = wanted
        elif existing != wanted:
            raise MutationError(f"the pod already has a volume named {volume.volume_name} with another source")
        path = request.mount_paths[volume.ref]
        for container in _targets(wired, request.containers):
            mounts = container.setdefault("volumeMounts", [])
            current = [m for m in mounts if m.get("mountPath") == path]
            mount = {"name": volume.volume_name, "mountPath": path, "readOnly": request.read_only}
            if not current:
                mounts.append(mount)
            elif current[0].get("name") != volume.volume_name:
                raise MutationError(
                    f"container {container.get('name')} already mounts {current[0].get('name')} at {path}: "
                    f"choose another path with kvc/mount-path.{volume.volume_id}"
                )
    if pending:
        gates = wired.setdefault("schedulingGates", [])
        if {"name": GATE} not in gates:
            gates.append({"name": GATE})
    else:
        add_node_affinity(wired, data_expressions(volumes))
    return wired


def wire_pod(
    pod: Mapping[str, Any], request: grammar.VolumeRequest, volumes: Sequence[ResolvedVolume]
) -> dict[str, Any]:
    """A copy of a Pod (or a pod template) wired to ``volumes``, with a marker of what was added."""
    wired = copy.deepcopy(dict(pod))
    wired["spec"] = wire_pod_spec(pod.get("spec") or {}, request, volumes)
    metadata = wired.setdefault("metadata", {})
    if {"name": GATE} in wired["spec"].get("schedulingGates", []):
        metadata.setdefault("labels", {})[names.LABEL_GATED] = "true"
    annotations = metadata.setdefault("annotations", {})
    annotations[INJECTED] = json.dumps(sorted(v.volume_name for v in volumes))
    return wired


REPLICA_SPECS = {"TFJob": "tfReplicaSpecs", "PyTorchJob": "pytorchReplicaSpecs"}


def wire_job(
    job: Mapping[str, Any], request: grammar.VolumeRequest, volumes: Sequence[ResolvedVolume]
) -> dict[str, Any]:
    """A copy of a TFJob/PyTorchJob with every replica template wired, and the ``kvc/*``
    annotations copied into each template so the pods the operator creates stay wired."""
    wired = copy.deepcopy(dict(job))
    field = REPLICA_SPECS.get(str(job.get("kind")))
    replicas = (wired.get("spec") or {}).get(field or "") if field else None
    if not isinstance(replicas, dict) or not replicas:
        raise MutationError(f"{job.get('kind')} has no spec.{field or 'replica specs'} to wire")
    ours = {
        k: v for k, v in ((job.get("metadata") or {}).get("annotations") or {}).items() if k.startswith(grammar.PREFIX)
    }
    for role, replica in replicas.items():
        template = (replica or {}).get("template")
        if not isinstance(template, dict):
            raise MutationError(f"{job.get('kind')} replica {role} has no pod template")
        template = wire_pod(template, request, volumes)
        template["metadata"].setdefault("annotations", {}).update(ours)
        replica["template"] = template
    return wired
