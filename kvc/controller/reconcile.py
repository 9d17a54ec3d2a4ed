"""One reconcile pass over a VolumeManager: validate, provision, clean up, report.

Level-based and idempotent: every pass looks at what exists and converges it to the
spec, so a pass interrupted by a crash is simply completed by the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.rest import ApiException

from kvc.api.models import VolumeConfig, VolumePhase, VolumeStatus
from kvc.sources.base import SourceContext, VolumeManagerRef
from kvc.sources.registry import SourceRegistry

logger = logging.getLogger(__name__)


@dataclass
class ReconcileResult:
    volumes: list[VolumeStatus]
    # Facts for the status message, e.g. old data kept while pods still use it.
    notes: list[str] = field(default_factory=list)


def owner_of(body: Mapping[str, Any]) -> VolumeManagerRef:
    metadata = body["metadata"]
    return VolumeManagerRef(namespace=metadata["namespace"], name=metadata["name"], uid=metadata["uid"])


def api_error(exc: ApiException) -> str:
    """A short, credential-free description of an API error."""
    reason = exc.reason or "error"
    return f"the Kubernetes API answered {exc.status} {reason}"


def _failed(raw: Mapping[str, Any], message: str) -> VolumeStatus:
    return VolumeStatus(
        id=str(raw.get("id", "?")), sourceType=raw.get("sourceType"), phase=VolumePhase.FAILED, message=message
    )


def reconcile(body: Mapping[str, Any], ctx: SourceContext, registry: SourceRegistry) -> ReconcileResult:
    owner = ctx.owner
    result = ReconcileResult(volumes=[])
    current: dict[str, VolumeConfig | None] = {}
    for raw in (body.get("spec") or {}).get("volumeConfigs") or []:
        checked = registry.check(raw)
        if isinstance(checked, str):
            result.volumes.append(_failed(raw, checked))
            current[str(raw.get("id", ""))] = None  # keep what exists until it is fixed
            continue
        config, source = checked
        current[config.id] = config
        try:
            result.volumes.append(source.provision(ctx, config))
        except ApiException as exc:
            logger.warning("provisioning %s/%s volume %s: %s", owner.namespace, owner.name, config.id, exc.reason)
            result.volumes.append(
                VolumeStatus(
                    id=config.id,
                    sourceType=config.source_type,
                    phase=VolumePhase.PENDING,
                    message=f"provisioning failed, retrying: {api_error(exc)}",
                )
            )
    for source in registry.sources.values():
        try:
            result.notes += source.cleanup(ctx, current)
        except ApiException as exc:
            logger.warning("cleanup of %s volumes for %s/%s: %s", source.source_type, owner.namespace, owner.name, exc)
            result.notes.append(f"cleanup of old {source.source_type} resources failed, retrying: {api_error(exc)}")
    return result


def delete(ctx: SourceContext, registry: SourceRegistry) -> list[str]:
    """Remove everything KVC made for a VolumeManager that is being deleted; returns what remains."""
    remaining = []
    for source in registry.sources.values():
        remaining += source.cleanup(ctx, {}, deleting=True)
    return remaining
