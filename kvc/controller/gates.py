"""Releasing pods the webhook gated while their data was being provisioned.

Once every volume a gated pod asks for is usable, the pod gets the data's node affinity
(appended to its required terms, which a gated pod may still narrow) and loses KVC's
scheduling gate; other gates are left alone.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import jsonpatch
import kopf
from kubernetes.client.rest import ApiException

from kvc.api import names
from webhook import grammar
from webhook.mutation import MutationError, add_node_affinity, data_expressions
from webhook.resolve import CatalogEntry, catalog_entries, resolve

logger = logging.getLogger(__name__)


def released(pod: Mapping[str, Any], entries: Iterable[CatalogEntry]) -> dict[str, Any] | None:
    """The pod ready to schedule, or None while some of its data is not usable yet (pure)."""
    metadata = pod.get("metadata") or {}
    try:
        request = grammar.parse(metadata.get("annotations") or {})
        volumes = resolve(request, str(metadata.get("namespace")), entries) if request else []
    except (grammar.GrammarError, MutationError):
        return None  # e.g. the VolumeManager is gone: the pod stays gated, visibly Pending
    if not all(volume.ready for volume in volumes):
        return None
    ungated = copy.deepcopy(dict(pod))
    spec = ungated.setdefault("spec", {})
    add_node_affinity(spec, data_expressions(volumes))
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
        target = released(current, entries)
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
