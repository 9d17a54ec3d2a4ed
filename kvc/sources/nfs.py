"""NFS: a PersistentVolume for the export and a claim bound to it, in the VolumeManager's namespace."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvc.api import names
from kvc.api.models import AccessMode, VolumeConfig, VolumePhase, VolumeStatus
from kvc.policy import nfs_path_problem
from kvc.sources import _claims
from kvc.sources.base import Source, SourceContext, VolumeManagerRef, required_options

DEFAULT_CAPACITY = _claims.DEFAULT_CAPACITY


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
    """(PersistentVolume name, claim name)."""
    return _claims.object_names(owner, config.id, source_hash(config))


def build_persistent_volume(owner: VolumeManagerRef, config: VolumeConfig, claim_uid: str = "") -> dict[str, Any]:
    """The PV of an NFS volume, pre-bound to its claim (to that very claim, given its uid)."""
    spec: dict[str, Any] = {
        "nfs": {
            "server": config.options["server"].strip(),
            "path": config.options["path"].strip(),
            "readOnly": config.access_mode == AccessMode.READ_ONLY_MANY,
        }
    }
    mount_options = [o.strip() for o in config.options.get("mountOptions", "").split(",") if o.strip()]
    if mount_options:
        spec["mountOptions"] = mount_options
    return _claims.build_persistent_volume(
        owner,
        config,
        source_hash(config),
        storage_class=names.NFS_STORAGE_CLASS,
        capacity=config.capacity or DEFAULT_CAPACITY,
        source=spec,
        claim_uid=claim_uid,
    )


def build_claim(owner: VolumeManagerRef, config: VolumeConfig) -> dict[str, Any]:
    return _claims.build_claim(
        owner, config, source_hash(config), names.NFS_STORAGE_CLASS, config.capacity or DEFAULT_CAPACITY
    )


volume_created = _claims.volume_created


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
        elif path and (problem := nfs_path_problem(path)):
            problems.append(problem)
        server = config.options.get("server", "").strip()
        if server and any(c.isspace() or c in "/:" for c in server) and not server.startswith("["):
            problems.append(f"options.server must be a host name or IP address without scheme or path, not {server!r}")
        return problems

    def claim_name(self, owner: VolumeManagerRef, config: VolumeConfig) -> str | None:
        return object_names(owner, config)[1]

    def provision(self, ctx: SourceContext, config: VolumeConfig) -> VolumeStatus:
        server, path = config.options["server"].strip(), config.options["path"].strip()
        problem = ctx.policy.nfs_problem(server, path)
        if problem:
            # Before any PV exists: the kubelet would mount it with the node's identity.
            return VolumeStatus(id=config.id, sourceType=config.source_type, phase=VolumePhase.FAILED, message=problem)
        volume_name, _ = object_names(ctx.owner, config)
        known = _claims.ensure_pair(
            ctx,
            volume_name,
            build_claim(ctx.owner, config),
            lambda claim_uid: build_persistent_volume(ctx.owner, config, claim_uid=claim_uid),
        )
        return claim_status(config, ctx.owner, known.phase)

    def cleanup(
        self, ctx: SourceContext, current: Mapping[str, VolumeConfig | None], deleting: bool = False
    ) -> list[str]:
        return _claims.remove_stale_claims(ctx, self.source_type, current, source_hash, force=deleting)
