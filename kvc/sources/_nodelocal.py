"""Controller side of node-local source types (S3, HTTP): replicas on nodes.

For each volume: choose nodes (``kvc.placement``), write the assignments into those
nodes' VolumeNode objects, read the agents' reports back, label a node for the volume
only once its replica is Ready (and unlabel it before its data is deleted), and build
the volume's status: a hostPath, the node affinity that finds the data, progress.
"""

from __future__ import annotations

import abc
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, ClassVar

from kubernetes.client.rest import ApiException

from kvc.agent.unpack import KINDS
from kvc.api import names
from kvc.api.models import AccessMode, VolumeConfig, VolumePhase, VolumeStatus
from kvc.api.units import parse_duration, parse_quantity
from kvc.placement import NodeInfo, VolumeRequest, place
from kvc.sources.base import Source, SourceContext, VolumeManagerRef, object_name_problem

logger = logging.getLogger(__name__)

DATA_LABEL_PREFIX = f"data.{names.GROUP}"


# --------------------------------------------------------------------------- names (pure)


def replica_key(owner: VolumeManagerRef, volume_id: str, digest: str) -> str:
    return f"{owner.namespace}.{owner.name}.{volume_id}-{digest}"


def node_path(root: str, owner: VolumeManagerRef, volume_id: str, digest: str) -> str:
    return f"{root.rstrip('/')}/{owner.namespace}/{owner.name}/{volume_id}-{digest}"


def data_label(owner: VolumeManagerRef, volume_id: str, digest: str) -> str:
    """The node label meaning "this node holds this data", valid for any namespace/name/id."""
    readable = names.bounded_name(owner.namespace, owner.name, volume_id, max_length=52)
    return f"{DATA_LABEL_PREFIX}/{readable}-{names.short_hash(owner.uid, volume_id, digest)}"


def node_affinity(label: str) -> dict[str, Any]:
    return {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": label, "operator": "Exists"}]}]
        }
    }


# --------------------------------------------------------------------------- cluster view


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return None


@dataclass
class ClusterView:
    """Nodes and VolumeNodes as one reconcile pass sees them."""

    nodes: dict[str, Any]  # name -> V1Node
    volumenodes: dict[str, dict[str, Any]]  # name -> VolumeNode object
    agent_grace_seconds: float = 45.0
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    @classmethod
    def load(cls, ctx: SourceContext) -> ClusterView:
        nodes = {n.metadata.name: n for n in ctx.core.list_node().items}
        listed = ctx.custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL)
        volumenodes = {v["metadata"]["name"]: v for v in listed.get("items", [])}
        return cls(nodes, volumenodes, ctx.agent_grace_seconds)

    def node_ready(self, name: str) -> bool:
        node = self.nodes.get(name)
        if node is None or node.spec.unschedulable:
            return False
        return any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))

    def agent_alive(self, name: str) -> bool:
        heartbeat = _parse_time(((self.volumenodes.get(name) or {}).get("status") or {}).get("heartbeatTime"))
        return heartbeat is not None and (self.now - heartbeat).total_seconds() < self.agent_grace_seconds

    def healthy(self, name: str) -> bool:
        return self.node_ready(name) and self.agent_alive(name)

    def assigned(self, key: str) -> list[str]:
        return sorted(
            name
            for name, vnode in self.volumenodes.items()
            if any(r.get("name") == key for r in (vnode.get("spec") or {}).get("replicas") or [])
        )

    def entry(self, node: str, key: str) -> dict[str, Any]:
        for entry in ((self.volumenodes.get(node) or {}).get("spec") or {}).get("replicas") or []:
            if entry.get("name") == key:
                return dict(entry)
        return {}

    def report(self, node: str, key: str) -> dict[str, Any]:
        for entry in ((self.volumenodes.get(node) or {}).get("status") or {}).get("replicas") or []:
            if entry.get("name") == key:
                return dict(entry)
        return {}

    def node_infos(self) -> list[NodeInfo]:
        infos = []
        for name, node in self.nodes.items():
            vnode = self.volumenodes.get(name) or {}
            status = vnode.get("status") or {}
            try:
                free = int(((status.get("disk") or {}).get("free")) or "")
            except ValueError:
                free = None
            infos.append(
                NodeInfo(
                    name=name,
                    labels=node.metadata.labels or {},
                    taints=[{"key": t.key, "value": t.value, "effect": t.effect} for t in node.spec.taints or []],
                    ready=self.node_ready(name),
                    agent_alive=self.agent_alive(name),
                    free_bytes=free,
                    replicas=len((vnode.get("spec") or {}).get("replicas") or []),
                    assigned_bytes=sum(int(r.get("totalBytes") or 0) for r in status.get("replicas") or []),
                )
            )
        return infos

    def entries_of(self, owner: VolumeManagerRef) -> list[tuple[str, dict[str, Any]]]:
        """(node, replica entry) for every replica of this VolumeManager on any node."""
        found = []
        for name, vnode in self.volumenodes.items():
            for entry in (vnode.get("spec") or {}).get("replicas") or []:
                if (entry.get("volumeManager") or {}).get("uid") == owner.uid:
                    found.append((name, entry))
        return found


# --------------------------------------------------------------------------- writes


def _update_replicas(
    ctx: SourceContext, node: str, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
) -> None:
    """Read-modify-write of a VolumeNode's spec.replicas, retried on conflicts.

    Many VolumeManagers share a VolumeNode and are reconciled in parallel: the
    resourceVersion check makes sure no one's assignment is lost.
    """
    for _ in range(10):
        try:
            vnode = ctx.custom.get_cluster_custom_object(names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL, node)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        replicas = list((vnode.get("spec") or {}).get("replicas") or [])
        updated = change(replicas)
        if updated == replicas:
            return
        vnode.setdefault("spec", {})["replicas"] = updated
        try:
            ctx.custom.replace_cluster_custom_object(names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL, node, vnode)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
    raise RuntimeError(f"VolumeNode {node} kept changing; will retry")


def assign(ctx: SourceContext, node: str, entry: dict[str, Any]) -> None:
    def add(replicas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        others = [r for r in replicas if r.get("name") != entry["name"]]
        return [*others, entry]

    _update_replicas(ctx, node, add)


def unassign(ctx: SourceContext, node: str, keys: Iterable[str]) -> None:
    drop = set(keys)
    _update_replicas(ctx, node, lambda replicas: [r for r in replicas if r.get("name") not in drop])


def set_label(ctx: SourceContext, view: ClusterView, node: str, label: str, present: bool) -> None:
    current = view.nodes.get(node)
    if current is None:
        return
    has = label in (current.metadata.labels or {})
    if has == present:
        return
    try:
        ctx.core.patch_node(node, {"metadata": {"labels": {label: "true" if present else None}}})
    except ApiException as exc:
        if exc.status != 404:
            raise


def pods_using_path(ctx: SourceContext, node: str, path: str) -> list[str]:
    """Running pods of the VolumeManager's namespace on ``node`` that mount ``path``."""
    pods = ctx.core.list_namespaced_pod(ctx.owner.namespace, field_selector=f"spec.nodeName={node}").items
    users = []
    for pod in pods:
        if pod.status and pod.status.phase in ("Succeeded", "Failed"):
            continue
        for volume in pod.spec.volumes or []:
            if volume.host_path is not None and volume.host_path.path == path:
                users.append(pod.metadata.name)
    return users


# --------------------------------------------------------------------------- provision


@dataclass(frozen=True)
class Replica:
    """What a node-local type provisions: the assignment the agents receive."""

    digest: str
    options: Mapping[str, str]  # for the agent; never credentials
    credentials_secret: str | None
    # Per-node extra options when nodes hold different parts of the data (one per replica),
    # e.g. {"include": "*.tfrecord-0*"} for a distributionStrategy; empty: all nodes alike.
    slots: tuple[Mapping[str, str], ...] = ()
    # Node path under which this volume's data goes (options.dataPath); default: the data root.
    root: str | None = None


def data_path_problem(data_path: str, allowed: Sequence[str]) -> str | None:
    """Why a user-chosen node path may not hold data, or None when an admin allowed it (pure)."""
    path = PurePosixPath(data_path)
    if not path.is_absolute() or ".." in path.parts or str(path) != data_path.rstrip("/"):
        return f"options.dataPath must be a normalised absolute path, not {data_path!r}"
    for root in allowed:
        if path == PurePosixPath(root) or PurePosixPath(root) in path.parents:
            return None
    roots = ", ".join(allowed) if allowed else "none"
    return f"options.dataPath {data_path} is not under a data root the cluster admin allows ({roots})"


def slots_to_fill(slots: Sequence[Mapping[str, str]], held: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """The slots no kept node holds yet, in order (pure)."""
    remaining = [dict(slot) for slot in slots]
    for options in held:
        for index, slot in enumerate(remaining):
            if all(options.get(k) == v for k, v in slot.items()):
                del remaining[index]
                break
    return remaining


def provision(ctx: SourceContext, config: VolumeConfig, replica: Replica) -> VolumeStatus:
    owner = ctx.owner
    view = ClusterView.load(ctx)
    key = replica_key(owner, config.id, replica.digest)
    path = node_path(replica.root or ctx.node_data_root, owner, config.id, replica.digest)
    label = data_label(owner, config.id, replica.digest)
    assigned = view.assigned(key)
    ready_first = sorted(assigned, key=lambda n: (view.report(n, key).get("phase") != "Ready", n))
    healthy = [n for n in ready_first if view.healthy(n)]
    request = VolumeRequest(
        replicas=config.replicas,
        capacity_bytes=parse_quantity(config.capacity) if config.capacity else 0,
        node_affinity=config.node_affinity,
        tolerations=config.tolerations,
    )
    placement = place(request, view.node_infos(), current=healthy)
    entry: dict[str, Any] = {
        "name": key,
        "volumeManager": {"namespace": owner.namespace, "name": owner.name, "uid": owner.uid},
        "volumeId": config.id,
        "sourceType": config.source_type,
        "sourceHash": replica.digest,
        "path": path,
        "options": dict(replica.options),
    }
    if replica.credentials_secret:
        entry["credentialsSecret"] = {"namespace": owner.namespace, "name": replica.credentials_secret}
    kept = [n for n in placement.nodes if n not in placement.added]
    free_slots = slots_to_fill(replica.slots, [view.entry(n, key).get("options") or {} for n in kept])
    for index, node in enumerate(placement.added):
        logger.info("assigning %s to node %s", key, node)
        extra = free_slots[index] if index < len(free_slots) else {}
        assign(ctx, node, {**entry, "options": {**entry["options"], **extra}})
    for node in assigned:
        if node in placement.nodes:
            continue
        # Lost (node or agent gone) or no longer needed: unlabel first, then release the data.
        set_label(ctx, view, node, label, present=False)
        if view.healthy(node) and pods_using_path(ctx, node, path):
            continue  # an extra replica still in use stays until its pods are gone
        logger.info("releasing %s from node %s", key, node)
        unassign(ctx, node, [key])
    nodes_status = []
    ready = 0
    for node in placement.nodes:
        report = view.report(node, key) if node not in placement.added else {}
        phase = report.get("phase", "Pending")
        is_ready = phase == "Ready"
        ready += is_ready
        set_label(ctx, view, node, label, present=is_ready)
        nodes_status.append(
            {
                "name": node,
                "phase": phase,
                "bytes": int(report.get("bytes") or 0),
                "totalBytes": int(report.get("totalBytes") or 0),
                "message": report.get("message", "assigned; waiting for the node's agent"),
            }
        )
    return _status(
        config,
        shortfall=placement.shortfall_message(config.replicas),
        ready=ready,
        nodes=nodes_status,
        path=path,
        label=label,
        was_usable=ctx.previous_phases.get(config.id) in ("Ready", "Degraded"),
    )


def volume_phase(
    desired: int, ready: int, *, shortfall: str, failed: list[dict[str, Any]], was_usable: bool, progress: str
) -> tuple[VolumePhase, str]:
    """Phase and message of a node-local volume (pure).

    Degraded means usable but short of replicas: some are Ready and more cannot be placed,
    or a volume that was usable lost replicas that are being placed again. A volume with no
    Ready replica is never usable: Failed when its nodes report failure, else Pending or
    Provisioning.
    """
    counts = f"{ready}/{desired} replicas ready"
    if ready >= desired:
        return VolumePhase.READY, counts
    failure = f"; {failed[0]['name']}: {failed[0]['message']}" if failed else ""
    if ready and (shortfall or was_usable):
        return VolumePhase.DEGRADED, f"{counts}; {shortfall}" if shortfall else f"{counts}, {progress}{failure}"
    if shortfall:
        return VolumePhase.PENDING, f"{counts}; {shortfall}{failure}"
    if failed and not ready:
        return VolumePhase.FAILED, f"{failed[0]['name']}: {failed[0]['message']}"
    return VolumePhase.PROVISIONING, f"{counts}, {progress}{failure}"


def _status(
    config: VolumeConfig,
    *,
    shortfall: str,
    ready: int,
    nodes: list[dict[str, Any]],
    path: str,
    label: str,
    was_usable: bool,
) -> VolumeStatus:
    desired = config.replicas
    done = sum(n["bytes"] for n in nodes)
    total = sum(n["totalBytes"] for n in nodes)
    progress = f"{done}/{total} bytes" if total else "waiting for the nodes' agents"
    phase, message = volume_phase(
        desired,
        ready,
        shortfall=shortfall,
        failed=[n for n in nodes if n["phase"] == "Failed"],
        was_usable=was_usable,
        progress=progress,
    )
    return VolumeStatus(
        id=config.id,
        sourceType=config.source_type,
        phase=phase,
        message=message,
        volumeSource={"hostPath": {"path": path, "type": "Directory"}},
        nodeAffinity=node_affinity(label),
        replicas={"desired": desired, "ready": ready},
        nodes=nodes,
    )


# --------------------------------------------------------------------------- cleanup


def cleanup(
    ctx: SourceContext,
    source_type: str,
    current: Mapping[str, str | None],
    deleting: bool,
) -> list[str]:
    """Release replicas of this VolumeManager that no current volume needs.

    ``current`` maps this type's volume ids to their current source digest (None: the
    config is invalid, keep what exists). Labels go first, then the assignment; data still
    mounted by a running pod on a healthy node is kept until the pod is gone.
    """
    view = ClusterView.load(ctx)
    kept = []
    stale: dict[str, list[str]] = {}
    for node, entry in view.entries_of(ctx.owner):
        if entry.get("sourceType") != source_type:
            continue
        volume_id = str(entry.get("volumeId"))
        if not deleting and volume_id in current and current[volume_id] in (None, entry.get("sourceHash")):
            continue
        set_label(ctx, view, node, data_label(ctx.owner, volume_id, str(entry.get("sourceHash"))), present=False)
        users = pods_using_path(ctx, node, str(entry.get("path"))) if view.healthy(node) else []
        if users:
            kept.append(f"old data of {volume_id} on {node} is kept until pod(s) {', '.join(sorted(users)[:5])} stop")
            continue
        stale.setdefault(node, []).append(str(entry["name"]))
    for node, keys in stale.items():
        logger.info("releasing %s from node %s", ", ".join(keys), node)
        unassign(ctx, node, keys)
    return kept


# --------------------------------------------------------------------------- the shared plugin base


class NodeLocalSource(Source):
    """A source type whose data is copied onto nodes and mounted as a hostPath."""

    node_local = True
    access_modes = frozenset(
        {AccessMode.READ_WRITE_ONCE.value, AccessMode.READ_ONLY_MANY.value, AccessMode.READ_WRITE_MANY.value}
    )
    # Options handed to the agents (never credentials) and the option naming the Secret.
    agent_options: ClassVar[tuple[str, ...]]
    credentials_option: ClassVar[str]

    @abc.abstractmethod
    def digest(self, config: VolumeConfig) -> str:
        """Changes whenever the data changes: new data lives at a new path."""

    def replica(self, config: VolumeConfig) -> Replica:
        return Replica(
            digest=self.digest(config),
            options={k: v for k, v in config.options.items() if k in self.agent_options},
            credentials_secret=config.options.get(self.credentials_option, "").strip() or None,
        )

    def validate_options(self, config: VolumeConfig) -> list[str]:
        """Options every node-local type shares: unpack, timeoutForDataDownload, the credentials Secret."""
        problems = []
        secret = config.options.get(self.credentials_option, "").strip()
        if secret and (problem := object_name_problem(self.credentials_option, secret, "Secret")):
            problems.append(problem)
        kind = config.options.get("unpack", "").strip()
        if kind and kind not in KINDS:
            problems.append(f"options.unpack must be one of {', '.join(KINDS)}, not {kind!r}")
        timeout = config.options.get("timeoutForDataDownload", "").strip()
        if timeout:
            try:
                parse_duration(timeout)
            except ValueError as exc:
                problems.append(f"options.timeoutForDataDownload: {exc}")
        return problems

    def provision(self, ctx: SourceContext, config: VolumeConfig) -> VolumeStatus:
        return provision(ctx, config, self.replica(config))

    def cleanup(
        self, ctx: SourceContext, current: Mapping[str, VolumeConfig | None], deleting: bool = False
    ) -> list[str]:
        digests = {
            volume_id: (self.digest(config) if config is not None else None)
            for volume_id, config in current.items()
            if config is None or config.source_type == self.source_type
        }
        return cleanup(ctx, self.source_type, digests, deleting)
