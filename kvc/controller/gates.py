"""Releasing pods the webhook gated while their data was being provisioned.

Once every volume a gated pod asks for is usable, the pod gets the data's node affinity
(appended to its required terms, which a gated pod may still narrow) and loses KVC's
scheduling gate; other gates are left alone.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jsonpatch
import kopf
from kubernetes.client.rest import ApiException

from kvc.api import names
from webhook import grammar
from webhook.mutation import MutationError, add_node_affinity, data_expressions, injected_volumes, wired_earlier
from webhook.resolve import CatalogEntry, catalog_entries, resolve

logger = logging.getLogger(__name__)


def _no_earlier_data(claim: str) -> str | None:
    return None


def _claims_of(spec: Mapping[str, Any], volume_names: set[str]) -> list[str]:
    return [
        str(v["persistentVolumeClaim"].get("claimName"))
        for v in spec.get("volumes") or []
        if v.get("name") in volume_names and isinstance(v.get("persistentVolumeClaim"), dict)
    ]


def released(
    pod: Mapping[str, Any],
    entries: Iterable[CatalogEntry],
    earlier_ready: Callable[[str], str | None] = _no_earlier_data,
) -> dict[str, Any] | None:
    """The pod ready to schedule, or None while some of its data is not usable yet (pure).

    A pod gated while a volume had an earlier source still mounts that source's claim (its
    volumes cannot change): it waits for that data, whose node label ``earlier_ready`` gives
    for the claim once the data is Ready somewhere (None until then).
    """
    metadata = pod.get("metadata") or {}
    try:
        request = grammar.parse(metadata.get("annotations") or {})
        volumes = resolve(request, str(metadata.get("namespace")), entries) if request else []
    except (grammar.GrammarError, MutationError):
        return None  # e.g. the VolumeManager is gone: the pod stays gated, visibly Pending
    earlier = wired_earlier(pod.get("spec") or {}, volumes, injected_volumes(pod))
    current = [v for v in volumes if v not in earlier]
    if not all(volume.ready for volume in current):
        return None
    expressions = data_expressions(current)
    for claim in _claims_of(pod.get("spec") or {}, {v.volume_name for v in earlier}):
        label = earlier_ready(claim)
        if label is None:
            return None
        expressions.append({"key": label, "operator": "Exists"})
    ungated = copy.deepcopy(dict(pod))
    spec = ungated.setdefault("spec", {})
    add_node_affinity(spec, expressions)
    spec["schedulingGates"] = [g for g in spec.get("schedulingGates") or [] if g.get("name") != names.SCHEDULING_GATE]
    if not spec["schedulingGates"]:
        del spec["schedulingGates"]
    ungated.setdefault("metadata", {}).setdefault("labels", {}).pop(names.LABEL_GATED, None)
    return ungated


def release_gated_pods(core: Any, custom: Any, namespace: str) -> int:
    """Release the namespace's gated pods whose data is usable; returns how many."""
    pods = core.list_namespaced_pod(namespace, label_selector=f"{names.LABEL_GATED}=true").items
    if not pods:
        return 0
    listed = custom.list_namespaced_custom_object(names.GROUP, names.VERSION, namespace, names.VOLUMEMANAGER_PLURAL)
    entries = [entry for vm in listed.get("items", []) for entry in catalog_entries(vm)]
    count = 0
    for pod in pods:
        current = core.api_client.sanitize_for_serialization(pod)
        target = released(current, entries, lambda claim: _data_label_if_ready(core, namespace, claim))
        if target is None:
            continue
        patch = jsonpatch.make_patch(current, target).patch
        try:
            core.patch_namespaced_pod(pod.metadata.name, namespace, patch)
        except ApiException as exc:
            logger.warning("releasing pod %s/%s failed: %s", namespace, pod.metadata.name, exc.reason)
            continue
        logger.info("released pod %s/%s: its data is ready", namespace, pod.metadata.name)
        # Seen in `kubectl describe pod`: why a pod that waited is now scheduled.
        kopf.event(current, type="Normal", reason="DataReady", message="its KVC volumes are ready: scheduling it")
        count += 1
    return count


def _data_label_if_ready(core: Any, namespace: str, claim: str) -> str | None:
    """The node label that the PV of a node-local ``claim`` requires, if some node has it (its
    data is Ready there); None otherwise, or for a claim of another kind."""
    try:
        bound = core.read_namespaced_persistent_volume_claim(claim, namespace).spec.volume_name
        volume = core.read_persistent_volume(bound) if bound else None
    except ApiException as exc:
        if exc.status != 404:
            raise
        return None
    required = volume.spec.node_affinity.required if volume and volume.spec.node_affinity else None
    keys = [e.key for term in (required.node_selector_terms if required else []) for e in term.match_expressions or []]
    if len(keys) != 1:
        return None
    return str(keys[0]) if core.list_node(label_selector=keys[0], limit=1).items else None
