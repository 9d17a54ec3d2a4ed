"""PersistentVolumeClaims and PersistentVolumes KVC made: naming and making them, who uses
them, removing stale ones.

Shared by the source types that expose data through a claim KVC makes: NFS (the export)
and the node-local types (the replicas' node path: workloads mount a claim, never a
hostPath). In the controller the claims and volumes KVC made are read from informers
(``kvc.controller.caches``), so a pass over a VolumeManager whose claims are in place makes
no API call; elsewhere, and when a VolumeManager is deleted, they are listed from the API.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.rest import ApiException

from kvc import kube
from kvc.api import names
from kvc.api.models import VolumeConfig
from kvc.sources import _readers
from kvc.sources.base import SourceContext, VolumeManagerRef

logger = logging.getLogger(__name__)

# Only what KVC made is kept by the informers.
SELECTOR = f"{names.LABEL_MANAGED_BY}={names.MANAGED_BY}"

# A PV and its claim need a size; neither NFS nor a node path enforces it.
DEFAULT_CAPACITY = "1Gi"


def object_names(owner: VolumeManagerRef, volume_id: str, digest: str) -> tuple[str, str]:
    """(PersistentVolume name, claim name) of a volume whose source has ``digest``.

    Deterministic, so anyone who knows the VolumeManager and the volume's source can name the
    claim before it exists; a changed source gets a new pair. PVs are cluster-wide, so theirs
    includes the namespace.
    """
    volume = names.bounded_name("kvc", owner.namespace, owner.name, volume_id, digest, max_length=253)
    claim = names.bounded_name(owner.name, volume_id, digest)
    return volume, claim


def claim_labels(owner: VolumeManagerRef, config: VolumeConfig, digest: str) -> dict[str, str]:
    """Labels of a claim and its PV: the user's, then KVC's (which win), with the source digest."""
    return {**config.labels, **owner.labels(config.id), names.LABEL_SOURCE_HASH: digest}


def build_claim(
    owner: VolumeManagerRef, config: VolumeConfig, digest: str, storage_class: str, capacity: str
) -> dict[str, Any]:
    """A claim pre-bound to its PV by name, owned by the VolumeManager."""
    volume_name, claim_name = object_names(owner, config.id, digest)
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": claim_name,
            "namespace": owner.namespace,
            "labels": claim_labels(owner, config, digest),
            "ownerReferences": [owner.owner_reference()],
        },
        "spec": {
            "accessModes": [config.access_mode],
            "storageClassName": storage_class,
            "volumeName": volume_name,
            "resources": {"requests": {"storage": capacity}},
        },
    }


def build_persistent_volume(
    owner: VolumeManagerRef,
    config: VolumeConfig,
    digest: str,
    *,
    storage_class: str,
    capacity: str,
    source: Mapping[str, Any],
    claim_uid: str = "",
) -> dict[str, Any]:
    """A PV pre-bound to its claim (to that very claim, given its uid); ``source`` holds the
    volume type's fields (``nfs``, or ``local`` with its ``nodeAffinity``)."""
    volume_name, claim_name = object_names(owner, config.id, digest)
    claim_ref = {"namespace": owner.namespace, "name": claim_name}
    if claim_uid:
        claim_ref["uid"] = claim_uid
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        # Cluster-scoped: a namespaced owner reference is invalid here, so the controller's
        # finalizer removes it (found by its labels).
        "metadata": {"name": volume_name, "labels": claim_labels(owner, config, digest)},
        "spec": {
            "capacity": {"storage": capacity},
            "accessModes": [config.access_mode],
            # The PV points at users' data (an export, the replicas): deleting it must never touch them.
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": storage_class,
            # Pre-bound to our claim so no other claim can take it.
            "claimRef": claim_ref,
            **source,
        },
    }


def volume_created(now: dt.datetime | None = None) -> dict[str, Any]:
    """The patch that marks a claim's PV as made (and has kube-controller-manager bind them now)."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"metadata": {"annotations": {names.ANNOTATION_VOLUME_CREATED: stamp}}}


@dataclass(frozen=True, slots=True)
class ClaimRecord:
    """What the controller reads of a PersistentVolumeClaim."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    phase: str | None = None
    deleting: bool = False
    uid: str = ""

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> ClaimRecord:
        metadata = raw.get("metadata") or {}
        return cls(
            namespace=str(metadata.get("namespace")),
            name=str(metadata.get("name")),
            uid=str(metadata.get("uid") or ""),
            labels=dict(metadata.get("labels") or {}),
            phase=(raw.get("status") or {}).get("phase"),
            deleting=bool(metadata.get("deletionTimestamp")),
        )


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    """What the controller reads of a PersistentVolume."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    claim_name: str | None = None
    deleting: bool = False
    claim_uid: str = ""

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> VolumeRecord:
        metadata = raw.get("metadata") or {}
        claim_ref = (raw.get("spec") or {}).get("claimRef") or {}
        return cls(
            name=str(metadata.get("name")),
            labels=dict(metadata.get("labels") or {}),
            claim_name=claim_ref.get("name"),
            deleting=bool(metadata.get("deletionTimestamp")),
            claim_uid=str(claim_ref.get("uid") or ""),
        )


def owner_uid(record: ClaimRecord | VolumeRecord) -> list[str]:
    """Index of claims and volumes by the VolumeManager they were made for."""
    uid = record.labels.get(names.LABEL_VOLUMEMANAGER_UID)
    return [uid] if uid else []


def claims_of(ctx: SourceContext, cached: bool = True) -> list[ClaimRecord]:
    owner = ctx.owner
    informer = kube.informer(kube.CLAIMS) if cached else None
    if informer is not None:
        return [c for c in informer.by("owner", owner.uid) if c.namespace == owner.namespace]
    listed = ctx.core.list_namespaced_persistent_volume_claim(owner.namespace, label_selector=owner.selector())
    return [ClaimRecord.from_raw(_raw(ctx, c)) for c in listed.items]


def volumes_of(ctx: SourceContext, cached: bool = True) -> list[VolumeRecord]:
    informer = kube.informer(kube.VOLUMES) if cached else None
    if informer is not None:
        return list(informer.by("owner", ctx.owner.uid))
    listed = ctx.core.list_persistent_volume(label_selector=ctx.owner.selector())
    return [VolumeRecord.from_raw(_raw(ctx, v)) for v in listed.items]


def _raw(ctx: SourceContext, model: Any) -> dict[str, Any]:
    """A typed client object as the API server's JSON: the records read that form only."""
    raw: dict[str, Any] = ctx.core.api_client.sanitize_for_serialization(model)
    return raw


class MadeLately:
    """Objects this process made (or found existing) that the informers have not shown yet.

    An informer shows a new claim a moment after it is made: seconds, on a busy API server.
    Until then every pass would create it again, be told 409 and read it back: for a
    thousand new volumes, thousands of calls to an API server that is busy already. An
    entry lasts until the informer shows the object, or ``seconds`` at most (then the
    object is created again if it is still not shown: it was deleted before being seen).
    """

    def __init__(self, seconds: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._made: dict[str, tuple[float, Any]] = {}

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._made[key] = (self._clock(), value)

    def get(self, key: str) -> Any | None:
        with self._lock:
            made = self._made.get(key)
            if made is None:
                return None
            if self._clock() - made[0] > self.seconds:
                del self._made[key]
                return None
            return made[1]

    def seen(self, key: str) -> None:
        with self._lock:
            self._made.pop(key, None)


MADE = MadeLately()


def known_claim(owner: VolumeManagerRef, name: str, made: MadeLately = MADE) -> ClaimRecord | None:
    """The claim as the informer last saw it, or as this process made it lately; None when
    unknown, and always without informer (the caller then asks the API)."""
    informer = kube.informer(kube.CLAIMS)
    if informer is None:
        return None
    key = f"claim/{owner.namespace}/{name}"
    found = informer.get(f"{owner.namespace}/{name}")
    if isinstance(found, ClaimRecord):
        made.seen(key)
        return found
    lately = made.get(key)
    return lately if isinstance(lately, ClaimRecord) else None


def known_volume(name: str, made: MadeLately = MADE) -> bool:
    """Whether the PersistentVolume exists as far as the informer or this process' lately made ones say."""
    informer = kube.informer(kube.VOLUMES)
    if informer is None:
        return False
    if informer.get(name) is not None:
        made.seen(f"volume/{name}")
        return True
    return made.get(f"volume/{name}") is not None


def volume_bound_elsewhere(name: str, claim: ClaimRecord) -> bool:
    """Whether the PersistentVolume (as the informer has it) is bound to an earlier claim of
    the claim's name: that one was deleted and this one made in its place."""
    informer = kube.informer(kube.VOLUMES)
    found = informer.get(name) if informer is not None else None
    return (
        isinstance(found, VolumeRecord)
        and not found.deleting
        and bool(found.claim_uid and claim.uid)
        and found.claim_uid != claim.uid
    )


def delete_volume(ctx: SourceContext, name: str, why: str) -> None:
    logger.info("deleting PersistentVolume %s (%s)", name, why)
    _delete_ignoring_not_found(ctx.core.delete_persistent_volume, name)


def made_claim(ctx: SourceContext, claim: Any, made: MadeLately = MADE) -> ClaimRecord:
    """Remember a claim just created or read (typed client model) until the informer shows it."""
    record = ClaimRecord.from_raw(_raw(ctx, claim))
    made.put(f"claim/{record.namespace}/{record.name}", record)
    return record


def made_volume(name: str, made: MadeLately = MADE) -> None:
    made.put(f"volume/{name}", True)


def ensure_pair(
    ctx: SourceContext,
    volume_name: str,
    claim: Mapping[str, Any],
    build_volume: Callable[[str], Mapping[str, Any]],
) -> ClaimRecord:
    """Make a claim and its PV (idempotent); returns the claim as known now.

    Once both exist the informers say so, and the claim's phase: no API call. ``build_volume``
    gets the claim's uid: the PV is made after its claim and bound to that very claim.
    """
    owner = ctx.owner
    claim_name = str(claim["metadata"]["name"])
    known = known_claim(owner, claim_name)
    if known is None:
        created = create_or_get(
            lambda: ctx.core.create_namespaced_persistent_volume_claim(owner.namespace, claim),
            lambda: ctx.core.read_namespaced_persistent_volume_claim(claim_name, owner.namespace),
        )
        known = made_claim(ctx, created)
    if volume_bound_elsewhere(volume_name, known):
        # Its claim was deleted and has just been made again; a Retain PV stays Released for
        # the claim it had, so it is made again too (the data is not touched).
        delete_volume(ctx, volume_name, f"its claim {claim_name} was deleted and made again")
    elif not known_volume(volume_name):
        # Made after its claim, bound to the claim's uid: kube-controller-manager then has
        # nothing to write to the PV but its phase. Made first and bound by name only, a
        # thousand of them cost it 1,760 more writes (760 of them conflicts, retried at
        # its rate limit) and took half as long again to bind.
        volume = build_volume(known.uid)
        create_or_get(
            lambda: ctx.core.create_persistent_volume(volume),
            lambda: ctx.core.read_persistent_volume(volume_name),
        )
        made_volume(volume_name)
        if known.phase != "Bound":
            # A claim is bound when kube-controller-manager looks at it with its volume
            # there; it looked when the claim was made, before the volume. An update makes
            # it look again now rather than at its next resync (15 s by default).
            ctx.core.patch_namespaced_persistent_volume_claim(claim_name, owner.namespace, volume_created())
    return known


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


def outdated(
    labels: Mapping[str, str],
    source_type: str,
    current: Mapping[str, VolumeConfig | None],
    source_hash: Callable[[VolumeConfig], str],
) -> bool:
    """Whether a claim or PV so labelled is for no current volume of ``source_type``: its id is
    gone from the spec, or its source changed (pure). Those of another type's volumes, and of
    invalid configs (kept until fixed), are not this type's to judge."""
    volume_id = labels.get(names.LABEL_VOLUME_ID, "")
    if volume_id not in current:
        return True
    config = current[volume_id]
    if config is None or config.source_type != source_type:
        return False
    return labels.get(names.LABEL_SOURCE_HASH) != source_hash(config)


def stale_claims(
    claims: Iterable[ClaimRecord],
    source_type: str,
    current: Mapping[str, VolumeConfig | None],
    source_hash: Callable[[VolumeConfig], str],
) -> list[ClaimRecord]:
    """The claims no current volume needs: its id is gone from the spec or its source changed (pure)."""
    return [
        claim
        for claim in claims
        if claim.labels.get(names.LABEL_MANAGED_BY) == names.MANAGED_BY
        and not claim.deleting
        and outdated(claim.labels, source_type, current, source_hash)
    ]


def orphaned_volumes(volumes: Iterable[VolumeRecord], live_claims: set[str], keep: set[str]) -> list[VolumeRecord]:
    """The volumes whose claim is gone or going, except those in ``keep`` (pure)."""
    return [
        v
        for v in volumes
        if not v.deleting and v.name not in keep and not (v.claim_name and v.claim_name in live_claims)
    ]


def remove_stale_claims(
    ctx: SourceContext,
    source_type: str,
    current: Mapping[str, VolumeConfig | None],
    source_hash: Callable[[VolumeConfig], str],
    *,
    force: bool = False,
) -> list[str]:
    """Delete this VolumeManager's claims (and their PVs) that no current volume needs.

    A claim is stale when its volume id is gone from the spec or its source changed.
    Stale claims still mounted by a pod are kept (and reported) unless ``force``: the
    VolumeManager is being deleted, and Kubernetes' own pvc-protection then keeps the
    claim until its last pod is gone. The PVs of current volumes (of any type) are never
    deleted, even when their claim, made a moment ago, is not in the informer yet.
    Deleting the VolumeManager (``force``) reads the API, not the informers: what a pass
    made just before must not be missed, or it would outlive its VolumeManager.
    """
    owner = ctx.owner
    claims = claims_of(ctx, cached=not force)
    stale = stale_claims(claims, source_type, current, source_hash)
    kept = []
    users: dict[str, list[str]] = {}
    if stale and not force:
        # Training jobs too: their next pods will mount the claims their templates name.
        users = pods_using_claims(ctx.core.list_namespaced_pod(owner.namespace).items)
        for claim_name, jobs in _readers.job_readers(ctx).claims.items():
            users.setdefault(claim_name, []).extend(jobs)
    for claim in stale:
        if users.get(claim.name):
            pods = ", ".join(sorted(users[claim.name])[:5])
            kept.append(f"previous claim {claim.name} is kept until pod(s) {pods} stop using it")
            continue
        logger.info("deleting stale PersistentVolumeClaim %s/%s", owner.namespace, claim.name)
        _delete_ignoring_not_found(ctx.core.delete_namespaced_persistent_volume_claim, claim.name, owner.namespace)
    live_claims = {c.name for c in claims if c not in stale or users.get(c.name)}
    volumes = volumes_of(ctx, cached=not force)
    keep = {v.name for v in volumes if not outdated(v.labels, source_type, current, source_hash)}
    for volume in orphaned_volumes(volumes, live_claims, keep):
        delete_volume(ctx, volume.name, "its claim is gone or going")
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
