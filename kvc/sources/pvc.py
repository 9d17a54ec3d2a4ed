"""PVC: exposes a claim that already exists in the VolumeManager's namespace (never modified or deleted)."""

from __future__ import annotations

from typing import Any

from kubernetes.client.rest import ApiException

from kvc.api.models import AccessMode, VolumeConfig, VolumePhase, VolumeStatus
from kvc.sources.base import Source, SourceContext, VolumeManagerRef, object_name_problem, required_options


def claim_status(config: VolumeConfig, namespace: str, claim: Any | None) -> VolumeStatus:
    """The volume's status given the user's claim (None: it does not exist)."""
    name = config.options["claimName"].strip()
    common: dict[str, Any] = {
        "id": config.id,
        "sourceType": config.source_type,
        "claimName": name,
        "volumeSource": {
            "persistentVolumeClaim": {"claimName": name, "readOnly": config.access_mode == AccessMode.READ_ONLY_MANY}
        },
    }
    if claim is None:
        return VolumeStatus(
            phase=VolumePhase.PENDING,
            message=(
                f"PersistentVolumeClaim {name} not found in namespace {namespace}: create it, "
                "or set options.claimName to an existing claim"
            ),
            **common,
        )
    if claim.metadata.deletion_timestamp:
        return VolumeStatus(phase=VolumePhase.PENDING, message=f"claim {name} is being deleted", **common)
    phase = claim.status.phase if claim.status else None
    if phase == "Bound":
        return VolumeStatus(phase=VolumePhase.READY, message=f"claim {name} is bound", **common)
    if phase == "Lost":
        return VolumeStatus(
            phase=VolumePhase.FAILED,
            message=f"claim {name} lost its PersistentVolume: restore or recreate it",
            **common,
        )
    return VolumeStatus(
        phase=VolumePhase.PENDING, message=f"waiting for claim {name} to bind (it is {phase or 'new'})", **common
    )


class PVCSource(Source):
    source_type = "PVC"
    known_options = ("claimName",)
    access_modes = frozenset(mode.value for mode in AccessMode)

    def validate_options(self, config: VolumeConfig) -> list[str]:
        problems = required_options(config, {"claimName": "the name of a PersistentVolumeClaim in this namespace"})
        name = config.options.get("claimName", "").strip()
        problem = object_name_problem("claimName", name, "PersistentVolumeClaim") if name else None
        return [*problems, problem] if problem else problems

    def claim_name(self, owner: VolumeManagerRef, config: VolumeConfig) -> str | None:
        return config.options["claimName"].strip()

    def provision(self, ctx: SourceContext, config: VolumeConfig) -> VolumeStatus:
        name = config.options["claimName"].strip()
        try:
            claim = ctx.core.read_namespaced_persistent_volume_claim(name, ctx.owner.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            claim = None
        return claim_status(config, ctx.owner.namespace, claim)
