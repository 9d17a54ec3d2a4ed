"""NFS: a PersistentVolume for the export and a claim bound to it, in the VolumeManager's namespace."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from kvc.api import names
from kvc.api.models import AccessMode, VolumeConfig, VolumePhase, VolumeStatus
from kvc.sources import _claims
from kvc.sources.base import Source, SourceContext, VolumeManagerRef, required_options

# NFS volumes need a size on the PV and the claim; NFS itself does not enforce it.
DEFAULT_CAPACITY = "1Gi"


def source_hash(config: VolumeConfig) -> str:
    """Changes whenever the data or how it is mounted changes: a new PV/PVC pair is needed."""
    return names.short_hash(
        config.options.get("server", "").strip(),
        config.options.get("path", "").strip(),
        config.options.get("mountOptions", "").strip(),
        config.access_mode,
        config.capacity or DEFAULT_CAPACITY,
    )


def object_names(owner: VolumeManagerRef, config: VolumeConfig) -> tuple[str, str]:
    """(PersistentVolume name, claim name). PVs are cluster-wide, so theirs includes the namespace."""
    digest = source_hash(config)
    volume = names.bounded_name("kvc", owner.namespace, owner.name, config.id, digest, max_length=253)
    claim = names.bounded_name(owner.name, config.id, digest)
    return volume, claim


def _labels(owner: VolumeManagerRef, config: VolumeConfig) -> dict[str, str]:
    return {**config.labels, **owner.labels(config.id), names.LABEL_SOURCE_HASH: source_hash(config)}


def build_persistent_volume(owner: VolumeManagerRef, config: VolumeConfig, claim_uid: str = "") -> dict[str, Any]:
    """The PV of an NFS volume, pre-bound to its claim (to that very claim, given its uid)."""
    volume_name, claim_name = object_names(owner, config)
    claim_ref = {"namespace": owner.namespace, "name": claim_name}
    if claim_uid:
        claim_ref["uid"] = claim_uid
    spec: dict[str, Any] = {
        "capacity": {"storage": config.capacity or DEFAULT_CAPACITY},
        "accessModes": [config.access_mode],
        # The export holds the users' data: deleting the PV must never touch it.
        "persistentVolumeReclaimPolicy": "Retain",
        "storageClassName": names.NFS_STORAGE_CLASS,
        # Pre-bound to our claim so no other claim can take it.
        "claimRef": claim_ref,
        "nfs": {
            "server": config.options["server"].strip(),
            "path": config.options["path"].strip(),
            "readOnly": config.access_mode == AccessMode.READ_ONLY_MANY,
        },
    }
    mount_options = [o.strip() for o in config.options.get("mountOptions", "").split(",") if o.strip()]
    if mount_options:
        spec["mountOptions"] = mount_options
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        # Cluster-scoped: a namespaced owner reference is invalid here, so the controller's
        # finalizer removes it (found by its labels).
        "metadata": {"name": volume_name, "labels": _labels(owner, config)},
        "spec": spec,
    }


def build_claim(owner: VolumeManagerRef, config: VolumeConfig) -> dict[str, Any]:
    volume_name, claim_name = object_names(owner, config)
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": claim_name,
            "namespace": owner.namespace,
            "labels": _labels(owner, config),
            "ownerReferences": [owner.owner_reference()],
        },
        "spec": {
            "accessModes": [config.access_mode],
            "storageClassName": names.NFS_STORAGE_CLASS,
            "volumeName": volume_name,
            "resources": {"requests": {"storage": config.capacity or DEFAULT_CAPACITY}},
        },
    }


def volume_created(now: dt.datetime | None = None) -> dict[str, Any]:
    """The patch that marks a claim's PV as made (and has kube-controller-manager bind them now)."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"metadata": {"annotations": {names.ANNOTATION_VOLUME_CREATED: stamp}}}


def claim_status(config: VolumeConfig, owner: VolumeManagerRef, claim_phase: str | None) -> VolumeStatus:
    """The volume's status given its claim's phase (None: the claim does not exist)."""
    volume_name, claim_name = object_names(owner, config)
    common: dict[str, Any] = {
        "id": config.id,
        "sourceType": config.source_type,
        "claimName": claim_name,
        "persistentVolumeName": volume_name,
        "volumeSource": {
            "persistentVolumeClaim": {
                "claimName": claim_name,
                "readOnly": config.access_mode == AccessMode.READ_ONLY_MANY,
            }
        },
    }
    server, path = config.options["server"].strip(), config.options["path"].strip()
    if claim_phase == "Bound":
        return VolumeStatus(phase=VolumePhase.READY, message=f"claim {claim_name} bound to {server}:{path}", **common)
    if claim_phase == "Lost":
        return VolumeStatus(
            phase=VolumePhase.FAILED,
            message=f"claim {claim_name} lost its PersistentVolume {volume_name}; delete the claim to recreate both",
            **common,
        )
    waiting = f"is {claim_phase}" if claim_phase else "is being created"
    return VolumeStatus(
        phase=VolumePhase.PROVISIONING,
        message=f"waiting for claim {claim_name} to bind to PersistentVolume {volume_name}: the claim {waiting}",
        **common,
    )


class NFSSource(Source):
    source_type = "NFS"
    known_options = ("server", "path", "mountOptions")
    access_modes = frozenset({AccessMode.READ_WRITE_MANY.value, AccessMode.READ_ONLY_MANY.value})

    def validate_options(self, config: VolumeConfig) -> list[str]:
        problems = required_options(
            config,
            {
                "server": "the NFS server's host name or IP address",
                "path": "the exported directory, e.g. /exports/data",
            },
        )
        path = config.options.get("path", "").strip()
        if path and not path.startswith("/"):
            problems.append(f"options.path must be an absolute export path such as /exports/data, not {path!r}")
        server = config.options.get("server", "").strip()
        if server and any(c.isspace() or c in "/:" for c in server) and not server.startswith("["):
            problems.append(f"options.server must be a host name or IP address without scheme or path, not {server!r}")
        return problems

    def provision(self, ctx: SourceContext, config: VolumeConfig) -> VolumeStatus:
        owner = ctx.owner
        volume_name, claim_name = object_names(owner, config)
        # Once both exist the informers say so, and the claim's phase: no API call.
        known = _claims.known_claim(owner, claim_name)
        if known is None:
            claim = build_claim(owner, config)
            created = _claims.create_or_get(
                lambda: ctx.core.create_namespaced_persistent_volume_claim(owner.namespace, claim),
                lambda: ctx.core.read_namespaced_persistent_volume_claim(claim_name, owner.namespace),
            )
            known = _claims.made_claim(ctx, created)
        if _claims.volume_bound_elsewhere(volume_name, known):
            # Its claim was deleted and has just been made again; a Retain PV stays Released for
            # the claim it had, so it is made again too (the export is not touched).
            _claims.delete_volume(ctx, volume_name, f"its claim {claim_name} was deleted and made again")
        elif not _claims.known_volume(volume_name):
            # Made after its claim, bound to the claim's uid: kube-controller-manager then has
            # nothing to write to the PV but its phase. Made first and bound by name only, a
            # thousand of them cost it 1,760 more writes (760 of them conflicts, retried at
            # its rate limit) and took half as long again to bind.
            volume = build_persistent_volume(owner, config, claim_uid=known.uid)
            _claims.create_or_get(
                lambda: ctx.core.create_persistent_volume(volume),
                lambda: ctx.core.read_persistent_volume(volume_name),
            )
            _claims.made_volume(volume_name)
            if known.phase != "Bound":
                # A claim is bound when kube-controller-manager looks at it with its volume
                # there; it looked when the claim was made, before the volume. An update makes
                # it look again now rather than at its next resync (15 s by default).
                ctx.core.patch_namespaced_persistent_volume_claim(claim_name, owner.namespace, volume_created())
        return claim_status(config, owner, known.phase)

    def cleanup(
        self, ctx: SourceContext, current: Mapping[str, VolumeConfig | None], deleting: bool = False
    ) -> list[str]:
        # The current volumes' PVs stay, even while their new claims are not in the informer yet.
        keep = [
            object_names(ctx.owner, config)[0]
            for config in current.values()
            if config is not None and config.source_type == self.source_type
        ]
        return _claims.remove_stale_claims(
            ctx, self.source_type, current, source_hash, force=deleting, keep_volumes=keep
        )
