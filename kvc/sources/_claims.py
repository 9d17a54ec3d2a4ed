"""PersistentVolumeClaims and PersistentVolumes KVC made: who uses them, removing stale ones.

Shared by the source types that expose data through a PVC they create.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes.client.rest import ApiException

from kvc.api import names
from kvc.api.models import VolumeConfig
from kvc.sources.base import SourceContext

logger = logging.getLogger(__name__)


def pods_using_claims(pods: list[Any]) -> dict[str, list[str]]:
    """Claim name -> names of the pods (not finished) that mount it."""
    users: dict[str, list[str]] = {}
    for pod in pods:
        if (pod.status and pod.status.phase in ("Succeeded", "Failed")) or not pod.spec:
            continue
        for volume in pod.spec.volumes or []:
            claim = volume.persistent_volume_claim
            if claim is not None:
                users.setdefault(claim.claim_name, []).append(pod.metadata.name)
    return users


def remove_stale_claims(
    ctx: SourceContext,
    source_type: str,
    current: Mapping[str, VolumeConfig | None],
    source_hash: Callable[[VolumeConfig], str],
    force: bool = False,
) -> list[str]:
    """Delete this VolumeManager's claims (and their PVs) that no current volume needs.

    A claim is stale when its volume id is gone from the spec or its source changed.
    Stale claims still mounted by a pod are kept (and reported) unless ``force``: the
    VolumeManager is being deleted, and Kubernetes' own pvc-protection then keeps the
    claim until its last pod is gone.
    """
    owner = ctx.owner
    claims = ctx.core.list_namespaced_persistent_volume_claim(owner.namespace, label_selector=owner.selector()).items
    stale = []
    for claim in claims:
        labels = claim.metadata.labels or {}
        if labels.get(names.LABEL_MANAGED_BY) != names.MANAGED_BY or claim.metadata.deletion_timestamp:
            continue
        volume_id = labels.get(names.LABEL_VOLUME_ID, "")
        if volume_id in current:
            config = current[volume_id]
            if config is None or config.source_type != source_type:
                continue  # invalid config: keep what exists until it is fixed
            if labels.get(names.LABEL_SOURCE_HASH) == source_hash(config):
                continue
        stale.append(claim)
    kept = []
    users = pods_using_claims(ctx.core.list_namespaced_pod(owner.namespace).items) if stale and not force else {}
    for claim in stale:
        name = claim.metadata.name
        if users.get(name):
            pods = ", ".join(sorted(users[name])[:5])
            kept.append(f"previous claim {name} is kept until pod(s) {pods} stop using it")
            continue
        logger.info("deleting stale PersistentVolumeClaim %s/%s", owner.namespace, name)
        _delete_ignoring_not_found(ctx.core.delete_namespaced_persistent_volume_claim, name, owner.namespace)
    live_claims = {c.metadata.name for c in claims if c not in stale or users.get(c.metadata.name)}
    for volume in ctx.core.list_persistent_volume(label_selector=owner.selector()).items:
        claim_ref = volume.spec.claim_ref
        if volume.metadata.deletion_timestamp or (claim_ref and claim_ref.name in live_claims):
            continue
        logger.info("deleting PersistentVolume %s (its claim is gone or going)", volume.metadata.name)
        _delete_ignoring_not_found(ctx.core.delete_persistent_volume, volume.metadata.name)
    return kept


def _delete_ignoring_not_found(delete: Callable[..., Any], *args: str) -> None:
    try:
        delete(*args)
    except ApiException as exc:
        if exc.status != 404:
            raise


def create_or_get(create: Callable[[], Any], read: Callable[[], Any]) -> Any:
    """Create an object, or read it when it already exists (idempotent under restarts)."""
    try:
        return create()
    except ApiException as exc:
        if exc.status != 409:
            raise
    return read()
