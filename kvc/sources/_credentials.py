"""Copies of the Secrets that replicas need, in a namespace of KVC's own.

A node-local volume names a Secret of its own namespace (S3 keys, HTTP headers). The
agents, one identity for every node, must never be able to read tenants' Secrets: what
one node's agent can read, a compromised node can read. So the controller copies each
Secret a replica needs into the credentials namespace (``--credentials-namespace``,
never ``kvc-system``, which holds the webhook's CA), the agents' RBAC is ``get`` on
Secrets there and nowhere else, and the replica's assignment names the copy. A copy is
refreshed while its volume is still being fetched (the user may fix a wrong Secret then)
and removed with its volume. The controller reads only the Secret a VolumeManager names,
in that VolumeManager's namespace: a tenant cannot have another namespace's copied.
"""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.rest import ApiException

from kvc import kube, logs
from kvc.api import names
from kvc.api.models import VolumeConfig
from kvc.sources.base import SourceContext, VolumeManagerRef

logger = logging.getLogger(__name__)

# On a copy: the Secret it copies, and that Secret's resourceVersion when it was copied.
ANNOTATION_SOURCE = f"{names.GROUP}/source-secret"
ANNOTATION_SOURCE_VERSION = f"{names.GROUP}/source-resource-version"
LABEL_SOURCE_TYPE = f"{names.GROUP}/source-type"
# Only copies are kept by the controller's informer of the credentials namespace.
SELECTOR = f"{names.LABEL_MANAGED_BY}={names.MANAGED_BY}"


@dataclass(frozen=True, slots=True)
class CopyRecord:
    """What the controller reads of a copy: never its data."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    source: str = ""
    source_version: str = ""

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> CopyRecord:
        metadata = raw.get("metadata") or {}
        annotations = metadata.get("annotations") or {}
        return cls(
            name=str(metadata.get("name")),
            labels=dict(metadata.get("labels") or {}),
            source=str(annotations.get(ANNOTATION_SOURCE) or ""),
            source_version=str(annotations.get(ANNOTATION_SOURCE_VERSION) or ""),
        )


def owner_uid(record: CopyRecord) -> list[str]:
    """Index of copies by the VolumeManager they were made for."""
    uid = record.labels.get(names.LABEL_VOLUMEMANAGER_UID)
    return [uid] if uid else []


def copy_name(owner: VolumeManagerRef, volume_id: str) -> str:
    """One copy per volume; valid and distinct for any namespace, name and id (the uid's hash
    tells apart a VolumeManager deleted and made again, and joins that would look alike)."""
    readable = names.bounded_name(owner.namespace, owner.name, volume_id, max_length=52)
    return f"{readable}-{names.short_hash(owner.namespace, owner.name, owner.uid, volume_id)}"


def reference(ctx: SourceContext, volume_id: str, secret: str) -> dict[str, Any]:
    """What an assignment says of its credentials: the copy to read, and the user's Secret
    it copies (named in the agent's messages, as the user knows it)."""
    return {
        "namespace": ctx.credentials_namespace,
        "name": copy_name(ctx.owner, volume_id),
        "source": {"namespace": ctx.owner.namespace, "name": secret},
    }


def build_copy(
    owner: VolumeManagerRef, config: VolumeConfig, namespace: str, source: Mapping[str, Any]
) -> dict[str, Any]:
    """The copy of ``source`` (the user's Secret, as the API's JSON) for this volume (pure)."""
    metadata = source.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": copy_name(owner, config.id),
            "namespace": namespace,
            "labels": {**owner.labels(config.id), LABEL_SOURCE_TYPE: config.source_type},
            "annotations": {
                ANNOTATION_SOURCE: f"{metadata.get('namespace')}/{metadata.get('name')}",
                ANNOTATION_SOURCE_VERSION: str(metadata.get("resourceVersion") or ""),
            },
        },
        "data": dict(source.get("data") or {}),
    }


def _known(ctx: SourceContext, name: str) -> CopyRecord | None:
    informer = kube.informer(kube.CREDENTIALS)
    found = informer.get(f"{ctx.credentials_namespace}/{name}") if informer is not None else None
    if isinstance(found, CopyRecord):
        return found
    try:
        raw = ctx.core.read_namespaced_secret(name, ctx.credentials_namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
        return None
    return CopyRecord.from_raw(_serialized(ctx, raw))


def _serialized(ctx: SourceContext, obj: Any) -> dict[str, Any]:
    raw: dict[str, Any] = ctx.core.api_client.sanitize_for_serialization(obj)
    return raw


def refresh(ctx: SourceContext, config: VolumeConfig, secret: str) -> None:
    """Copy the volume's Secret into the credentials namespace, unless the copy is current.

    One read of the user's Secret; a write only when it changed since it was copied. A
    missing Secret leaves no copy: the agents then report it missing, by its own name.
    """
    owner = ctx.owner
    try:
        source = _serialized(ctx, ctx.core.read_namespaced_secret(secret, owner.namespace))
    except ApiException as exc:
        if exc.status != 404:
            raise
        return
    for value in (source.get("data") or {}).values():
        logs.register_secret(value)  # as stored (base64); its decoded form below
        with contextlib.suppress(ValueError):
            logs.register_secret(base64.b64decode(value))
    copy = build_copy(owner, config, ctx.credentials_namespace, source)
    name = copy["metadata"]["name"]
    known = _known(ctx, name)
    wanted = copy["metadata"]["annotations"]
    if known is None:
        try:
            ctx.core.create_namespaced_secret(ctx.credentials_namespace, copy)
            logger.info("copied Secret %s/%s for volume %s", owner.namespace, secret, config.id)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
    elif (known.source, known.source_version) == (wanted[ANNOTATION_SOURCE], wanted[ANNOTATION_SOURCE_VERSION]):
        return
    ctx.core.replace_namespaced_secret(name, ctx.credentials_namespace, copy)
    logger.info("refreshed the copy of Secret %s/%s for volume %s", owner.namespace, secret, config.id)


def _copies(ctx: SourceContext, cached: bool) -> list[CopyRecord]:
    informer = kube.informer(kube.CREDENTIALS) if cached else None
    if informer is not None:
        return list(informer.by("owner", ctx.owner.uid))
    listed = ctx.core.list_namespaced_secret(ctx.credentials_namespace, label_selector=ctx.owner.selector())
    return [CopyRecord.from_raw(_serialized(ctx, s)) for s in listed.items]


def stale(
    copies: list[CopyRecord],
    source_type: str,
    current: Mapping[str, VolumeConfig | None],
    wanted: Mapping[str, str],
) -> list[CopyRecord]:
    """The copies of ``source_type`` that no current volume needs (pure): its id is gone, it is
    now of another type, or it names no Secret any more (``wanted``: id -> Secret name; a
    volume that names another Secret keeps its copy, which ``refresh`` replaces). Those of
    invalid configs are kept until they are fixed."""
    found = []
    for copy in copies:
        if copy.labels.get(LABEL_SOURCE_TYPE) != source_type:
            continue
        volume_id = copy.labels.get(names.LABEL_VOLUME_ID, "")
        if volume_id in current and current[volume_id] is None:
            continue
        config = current.get(volume_id)
        if config is None or config.source_type != source_type or not wanted.get(volume_id):
            found.append(copy)
    return found


def remove_stale(
    ctx: SourceContext,
    source_type: str,
    current: Mapping[str, VolumeConfig | None],
    wanted: Mapping[str, str],
    *,
    force: bool = False,
) -> None:
    """Delete this VolumeManager's copies that no current volume of ``source_type`` needs;
    all of them when it is being deleted (``force``, which reads the API, not the informer)."""
    copies = _copies(ctx, cached=not force)
    if force:
        doomed = [copy for copy in copies if copy.labels.get(LABEL_SOURCE_TYPE) == source_type]
    else:
        doomed = stale(copies, source_type, current, wanted)
    for copy in doomed:
        logger.info("deleting credentials copy %s/%s", ctx.credentials_namespace, copy.name)
        try:
            ctx.core.delete_namespaced_secret(copy.name, ctx.credentials_namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
