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


Expressions = list[dict[str, Any]]


def _no_earlier_data(pod_volume: Mapping[str, Any]) -> Expressions | None:
    return None


def released(
    pod: Mapping[str, Any],
    entries: Iterable[CatalogEntry],
    earlier_ready: Callable[[Mapping[str, Any]], Expressions | None] = _no_earlier_data,
) -> dict[str, Any] | None:
    """The pod ready to schedule, or None while some of its data is not usable yet (pure).

    A pod gated while a volume had an earlier source still mounts that source's claim or node
    path (its volumes cannot change): it waits for that data. ``earlier_ready`` gives, for such a
    pod volume, the node-selector expressions under which the earlier data can be used ([] for
    shared storage), or None while it is Ready nowhere.
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
    earlier_names = {v.volume_name for v in earlier}
    for pod_volume in (pod.get("spec") or {}).get("volumes") or []:
        if pod_volume.get("name") not in earlier_names:
            continue
        usable_where = earlier_ready(pod_volume)
        if usable_where is None:
            return None
        expressions += usable_where
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
        target = released(current, entries, lambda volume: _where_usable(core, namespace, volume))
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


def _where_usable(core: Any, namespace: str, pod_volume: Mapping[str, Any]) -> Expressions | None:
    """Where the earlier data a pod volume mounts (a claim, or with the hostPath opt-in a node
    path) can be used: the expressions its PV's node affinity requires, once some node carries
    each of them (the data is Ready there); [] for shared storage (an NFS export); None while the
    data is Ready nowhere, or when its PV is gone."""
    volume = _persistent_volume_of(core, namespace, pod_volume)
    if volume is None:
        return None
    required = volume.spec.node_affinity.required if volume.spec.node_affinity else None
    terms = required.node_selector_terms if required else []
    keys = [e.key for term in terms for e in term.match_expressions or []]
    if not all(core.list_node(label_selector=key, limit=1).items for key in keys):
        return None
    return [{"key": key, "operator": "Exists"} for key in keys]


def _persistent_volume_of(core: Any, namespace: str, pod_volume: Mapping[str, Any]) -> Any:
    claim = (pod_volume.get("persistentVolumeClaim") or {}).get("claimName")
    path = (pod_volume.get("hostPath") or {}).get("path")
    try:
        if claim:
            bound = core.read_namespaced_persistent_volume_claim(claim, namespace).spec.volume_name
            return core.read_persistent_volume(bound) if bound else None
    except ApiException as exc:
        if exc.status != 404:
            raise
        return None
    if path:
        # The node path of earlier node-local data: the `local` PV KVC made for it.
        selector = f"{names.LABEL_MANAGED_BY}={names.MANAGED_BY},{names.LABEL_VOLUMEMANAGER_NAMESPACE}={namespace}"
        for volume in core.list_persistent_volume(label_selector=selector).items:
            if volume.spec.local is not None and volume.spec.local.path == path:
                return volume
    return None
