"""Controller side of node-local source types (S3, HTTP): replicas on nodes.

For each volume: choose nodes (``kvc.placement``), write the assignments into those
nodes' VolumeNode objects, read the agents' reports back, label a node for the volume
only once its replica is Ready (and unlabel it before its data is deleted), make the
claim workloads mount (a ``local`` PV on the node path whose node affinity is the data
label, so pods pass Pod Security ``restricted``), and build the volume's status: the
claim, the node path (hostPath), the node affinity that finds the data, progress.
"""

from __future__ import annotations

import abc
import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, ClassVar

from kubernetes.client.rest import ApiException

from kvc import defaults
from kvc.agent.unpack import KINDS
from kvc.api import names
from kvc.api.models import AccessMode, VolumeConfig, VolumePhase, VolumeStatus
from kvc.api.units import parse_duration, parse_quantity
from kvc.placement import NodeInfo, Placement, VolumeRequest, meet, place
from kvc.policy import NODE_CAP_FLAG, copied_options_problem, stored_bytes
from kvc.sources import _claims, _credentials, _readers
from kvc.sources.base import Source, SourceContext, VolumeManagerRef, object_name_problem
from kvc.throttle import Throttle

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


def claim_name(owner: VolumeManagerRef, volume_id: str, digest: str) -> str:
    """The claim through which workloads mount this data (deterministic: see _claims.object_names)."""
    return _claims.object_names(owner, volume_id, digest)[1]


def build_persistent_volume(
    owner: VolumeManagerRef, config: VolumeConfig, digest: str, *, path: str, label: str, claim_uid: str = ""
) -> dict[str, Any]:
    """The ``local`` PV on the replicas' node path, usable only on nodes labelled for the data.

    Its node affinity is the data label, so the scheduler itself keeps a pod that mounts the
    claim off nodes without a Ready replica, whatever the pod's own affinity says. A
    ReadOnlyMany volume is mounted ``ro`` by the kubelet, whatever a pod asks.
    """
    source: dict[str, Any] = {
        "local": {"path": path},
        "nodeAffinity": {"required": node_affinity(label)["requiredDuringSchedulingIgnoredDuringExecution"]},
    }
    if config.access_mode == AccessMode.READ_ONLY_MANY:
        source["mountOptions"] = ["ro"]
    return _claims.build_persistent_volume(
        owner,
        config,
        digest,
        storage_class=names.NODE_LOCAL_STORAGE_CLASS,
        capacity=config.capacity or _claims.DEFAULT_CAPACITY,
        source=source,
        claim_uid=claim_uid,
    )


def build_claim(owner: VolumeManagerRef, config: VolumeConfig, digest: str) -> dict[str, Any]:
    return _claims.build_claim(
        owner, config, digest, names.NODE_LOCAL_STORAGE_CLASS, config.capacity or _claims.DEFAULT_CAPACITY
    )


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
    """Nodes and VolumeNodes as one reconcile pass sees them.

    In the controller both come from informers (``kvc.controller.caches``): reading them
    costs no API call, and one view serves every pass for a second while nothing changed.
    Without informers (or before their first list) ``load`` lists them from the API.
    """

    nodes: dict[str, Any]  # name -> V1Node, or from an informer kube.NodeRecord (the same attributes)
    volumenodes: dict[str, dict[str, Any]]  # name -> VolumeNode object
    agent_grace_seconds: float = defaults.AGENT_GRACE_SECONDS
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    # Replica key -> nodes assigned it, and VolumeManager uid -> nodes holding its replicas:
    # the informer's indexes; a listed view scans its VolumeNodes instead.
    by_replica: Mapping[str, frozenset[str]] | None = field(default=None, repr=False)
    by_owner: Mapping[str, frozenset[str]] | None = field(default=None, repr=False)
    # Namespace -> nodes holding replicas of its VolumeManagers (the informer's index too).
    by_namespace: Mapping[str, frozenset[str]] | None = field(default=None, repr=False)
    # node_infos(), once computed: a view serves several passes.
    _node_infos: list[NodeInfo] | None = field(default=None, repr=False)
    # Work done once per view, not once per pass: with thousands of nodes and VolumeManagers,
    # looking at every VolumeNode in every pass cost more than everything else together.
    heartbeats_observed: bool = field(default=False, repr=False)
    removed_nodes_checked: bool = field(default=False, repr=False)

    # How long a view built from the informers serves later passes while nothing changed.
    REUSE_SECONDS: ClassVar[float] = 1.0
    # (informer revisions, grace, monotonic time built, view) of the last view built.
    _last: ClassVar[tuple[tuple[int, int, float], float, ClusterView] | None] = None
    # name -> (Node, VolumeNode, NodeInfo, heartbeat): a node's NodeInfo is computed again
    # only when one of its two objects changed (with thousands of nodes, most did not).
    _infos: ClassVar[dict[str, tuple[Any, Any, NodeInfo, dt.datetime | None]]] = {}

    @staticmethod
    def replica_keys(vnode: Mapping[str, Any]) -> list[str]:
        """Index of a VolumeNode by the replicas assigned to it."""
        return [str(r.get("name")) for r in (vnode.get("spec") or {}).get("replicas") or []]

    @staticmethod
    def owner_uids(vnode: Mapping[str, Any]) -> set[str]:
        """Index of a VolumeNode by the VolumeManagers whose replicas it holds."""
        return {str((r.get("volumeManager") or {}).get("uid")) for r in (vnode.get("spec") or {}).get("replicas") or []}

    @staticmethod
    def owner_namespaces(vnode: Mapping[str, Any]) -> set[str]:
        """Index of a VolumeNode by the namespaces whose replicas it holds."""
        replicas = (vnode.get("spec") or {}).get("replicas") or []
        return {str((r.get("volumeManager") or {}).get("namespace")) for r in replicas}

    @staticmethod
    def changed_owners(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> set[str]:
        """The VolumeManagers (uids) whose replicas on a VolumeNode were assigned, released or
        reported differently between two versions of it (None: absent). Heartbeats alone change none."""

        def by_name(vnode: Mapping[str, Any] | None, part: str) -> dict[str, Any]:
            return {str(r.get("name")): r for r in ((vnode or {}).get(part) or {}).get("replicas") or []}

        old_spec, new_spec = by_name(old, "spec"), by_name(new, "spec")
        old_reports, new_reports = by_name(old, "status"), by_name(new, "status")
        owners = {name: str((r.get("volumeManager") or {}).get("uid")) for name, r in {**old_spec, **new_spec}.items()}
        changed = {n for n in old_spec.keys() | new_spec.keys() if old_spec.get(n) != new_spec.get(n)}
        changed |= {n for n in old_reports.keys() | new_reports.keys() if old_reports.get(n) != new_reports.get(n)}
        return {owners[name] for name in changed if name in owners}

    @classmethod
    def load(cls, ctx: SourceContext) -> ClusterView:
        from kvc import kube  # noqa: PLC0415 - informers exist in the controller only

        nodes, volumenodes = kube.informer(kube.NODES), kube.informer(kube.VOLUMENODES)
        if nodes is None or volumenodes is None:
            listed_nodes = {n.metadata.name: n for n in ctx.core.list_node().items}
            listed = ctx.custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL)
            volumenodes_listed = {v["metadata"]["name"]: v for v in listed.get("items", [])}
            return cls(listed_nodes, volumenodes_listed, ctx.agent_grace_seconds)
        clock = time.monotonic()
        last = cls._last
        # Only while nothing changed: passes decide from the view whether a label is still to
        # be removed, and one deciding from a view older than the last write would leave it.
        if (
            last is not None
            and last[0] == (nodes.revision, volumenodes.revision, ctx.agent_grace_seconds)
            and clock - last[1] < cls.REUSE_SECONDS
        ):
            return last[2]
        node_items, vnode_items = nodes.snapshot(), volumenodes.snapshot()
        view = cls(
            dict(node_items.items),
            dict(vnode_items.items),
            ctx.agent_grace_seconds,
            by_replica=vnode_items.indexes.get("replica"),
            by_owner=vnode_items.indexes.get("owner"),
            by_namespace=vnode_items.indexes.get("namespace"),
        )
        cls._last = ((node_items.revision, vnode_items.revision, ctx.agent_grace_seconds), clock, view)
        return view

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
        if self.by_replica is not None:
            return sorted(self.by_replica.get(key, ()))
        return sorted(name for name, vnode in self.volumenodes.items() if key in self.replica_keys(vnode))

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

    def _node_info(self, name: str, node: Any, vnode: Mapping[str, Any], alive: bool) -> NodeInfo:
        status = vnode.get("status") or {}
        try:
            free = int(((status.get("disk") or {}).get("free")) or "")
        except ValueError:
            free = None
        return NodeInfo(
            name=name,
            labels=node.metadata.labels or {},
            taints=[{"key": t.key, "value": t.value, "effect": t.effect} for t in node.spec.taints or []],
            ready=self.node_ready(name),
            agent_alive=alive,
            free_bytes=free,
            replicas=len((vnode.get("spec") or {}).get("replicas") or []),
            assigned_bytes=sum(int(r.get("totalBytes") or 0) for r in status.get("replicas") or []),
        )

    @staticmethod
    def _heartbeat(vnode: Mapping[str, Any] | None) -> dt.datetime | None:
        # fromisoformat: strptime takes 30 us, too long for thousands of nodes in a pass.
        value = ((vnode or {}).get("status") or {}).get("heartbeatTime")
        try:
            parsed = dt.datetime.fromisoformat(str(value)) if value else None
        except ValueError:
            return None
        return parsed.replace(tzinfo=dt.UTC) if parsed is not None and parsed.tzinfo is None else parsed

    def node_infos(self) -> list[NodeInfo]:
        if self._node_infos is None:
            self._node_infos = self._compute_node_infos()
        return list(self._node_infos)

    def _compute_node_infos(self) -> list[NodeInfo]:
        from dataclasses import replace  # noqa: PLC0415

        known = ClusterView._infos
        fresh: dict[str, tuple[Any, Any, NodeInfo, dt.datetime | None]] = {}
        oldest_alive = self.now - dt.timedelta(seconds=self.agent_grace_seconds)
        infos = []
        for name, node in self.nodes.items():
            vnode = self.volumenodes.get(name)
            seen = known.get(name)
            if seen is not None and seen[0] is node and seen[1] is vnode:
                info, heartbeat = seen[2], seen[3]
                alive = heartbeat is not None and heartbeat > oldest_alive
                if info.agent_alive != alive:
                    info = replace(info, agent_alive=alive)
            else:
                heartbeat = self._heartbeat(vnode)
                alive = heartbeat is not None and heartbeat > oldest_alive
                info = self._node_info(name, node, vnode or {}, alive)
            fresh[name] = (node, vnode, info, heartbeat)
            infos.append(info)
        ClusterView._infos = fresh
        return infos

    def namespace_replicas(self, namespace: str, except_key: str = "") -> int:
        """How many replicas of the namespace's VolumeManagers are assigned to nodes, but
        those of the replica ``except_key``."""
        index = self.by_namespace
        holders = index.get(namespace, ()) if index is not None else self.volumenodes
        return sum(
            1
            for name in holders
            for entry in ((self.volumenodes.get(name) or {}).get("spec") or {}).get("replicas") or []
            if (entry.get("volumeManager") or {}).get("namespace") == namespace and entry.get("name") != except_key
        )

    def entries_of(self, owner: VolumeManagerRef) -> list[tuple[str, dict[str, Any]]]:
        """(node, replica entry) for every replica of this VolumeManager on any node."""
        holders = sorted(self.by_owner.get(owner.uid, ())) if self.by_owner is not None else list(self.volumenodes)
        found = []
        for name in holders:
            for entry in ((self.volumenodes.get(name) or {}).get("spec") or {}).get("replicas") or []:
                if (entry.get("volumeManager") or {}).get("uid") == owner.uid:
                    found.append((name, entry))
        return found


# --------------------------------------------------------------------------- node health


class HeartbeatWatch:
    """How long this controller has seen each agent's heartbeat stand still, on its own clock.

    A heartbeat's age on the wall clock alone blames agents for outages that were not theirs:
    once kube-apiserver (or this controller) has been away for longer than the grace, every
    heartbeat is old, and every replica in the cluster would be released and fetched again.
    So an agent is gone only when its heartbeat is old *and* this controller, while able to
    look, has seen it stand still for the whole grace.  A gap between two looks longer than
    half the grace (the API server was down, this process was stopped) restarts every count,
    and so does a restart of the controller: it waits one grace before it blames anyone.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[str, float]] = {}  # node -> (heartbeat, when first seen)
        self._last_look: float | None = None

    def observe(self, volumenodes: Mapping[str, Mapping[str, Any]], grace_seconds: float) -> None:
        now = self._clock()
        with self._lock:
            blind = self._last_look is None or now - self._last_look > grace_seconds / 2
            self._last_look = now
            for name, vnode in volumenodes.items():
                beat = str((vnode.get("status") or {}).get("heartbeatTime") or "")
                seen = self._seen.get(name)
                if blind or seen is None or seen[0] != beat:
                    self._seen[name] = (beat, now)

    def still_for(self, name: str) -> float:
        """Seconds this controller has seen the node's heartbeat unchanged (0: never seen)."""
        with self._lock:
            seen = self._seen.get(name)
            return 0.0 if seen is None else self._clock() - seen[1]


HEARTBEATS = HeartbeatWatch()


def load_view(ctx: SourceContext) -> ClusterView:
    view = ClusterView.load(ctx)
    if not view.heartbeats_observed:
        view.heartbeats_observed = True  # first: the passes sharing the view do not queue to observe it
        HEARTBEATS.observe(view.volumenodes, view.agent_grace_seconds)
    return view


def agent_gone(view: ClusterView, name: str, watch: HeartbeatWatch = HEARTBEATS) -> bool:
    return not view.agent_alive(name) and watch.still_for(name) >= view.agent_grace_seconds


def _as_time(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return _parse_time(str(value)) if value else None


def unready_seconds(view: ClusterView, name: str) -> float | None:
    """How long the node has been NotReady; None when it is Ready or does not exist."""
    node = view.nodes.get(name)
    if node is None:
        return None
    for condition in (node.status.conditions if node.status else None) or []:
        if condition.type != "Ready":
            continue
        if condition.status == "True":
            return None
        since = _as_time(condition.last_transition_time)
        return max(0.0, (view.now - since).total_seconds()) if since else math.inf
    return math.inf  # never reported Ready


def node_lost(view: ClusterView, name: str, watch: HeartbeatWatch = HEARTBEATS) -> bool:
    """Whether the node's replicas are lost: node deleted, NotReady past the grace, or agent gone.

    Within the grace a NotReady node keeps its replicas: a kubelet restart or a short
    network partition must not throw away data that is still on the disk.
    """
    if name not in view.nodes:
        return True
    unready = unready_seconds(view, name)
    if unready is not None and unready >= view.agent_grace_seconds:
        return True
    return agent_gone(view, name, watch)


def keeps_replica(view: ClusterView, name: str, watch: HeartbeatWatch = HEARTBEATS) -> bool:
    """Whether an assigned node still counts as one of the volume's replicas.

    A cordoned node does not: no new pod can land there, so the replica is placed elsewhere
    (the data itself stays while running pods use it).
    """
    node = view.nodes.get(name)
    if node is None or (node.spec is not None and node.spec.unschedulable):
        return False
    return not node_lost(view, name, watch)


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
    """Write ``entry`` into the node's VolumeNode; a new one only below the admin's cap.

    Placement skips full nodes, but passes running at once may choose the same node: a node
    found full here is left alone, and the next pass places the replica elsewhere.
    """
    cap = ctx.policy.max_replicas_per_node

    def add(replicas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        others = [r for r in replicas if r.get("name") != entry["name"]]
        if len(others) == len(replicas) and len(others) >= cap:
            logger.info(
                "not assigning %s to node %s: it holds %d replicas (%s)", entry["name"], node, cap, NODE_CAP_FLAG
            )
            return replicas
        return [*others, entry]

    _update_replicas(ctx, node, add)


def unassign(ctx: SourceContext, node: str, keys: Iterable[str]) -> None:
    drop = set(keys)
    _update_replicas(ctx, node, lambda replicas: [r for r in replicas if r.get("name") not in drop])


def set_label(ctx: SourceContext, view: ClusterView, node: str, label: str, present: bool) -> bool:
    """Add or remove a node's data label; True when this call changed it."""
    current = view.nodes.get(node)
    if current is None:
        return False
    has = label in (current.metadata.labels or {})
    if has == present:
        return False
    try:
        ctx.core.patch_node(node, {"metadata": {"labels": {label: "true" if present else None}}})
    except ApiException as exc:
        if exc.status != 404:
            raise
        return False
    return True


def pods_using_path(ctx: SourceContext, node: str, path: str, claim: str, namespace: str | None = None) -> list[str]:
    """Pods of the VolumeManager's namespace (or ``namespace``) on ``node``, not finished, that
    mount the data: through its ``claim``, or ``path`` as a hostPath (pods wired by earlier
    versions, or by the hostPath opt-in)."""
    pods = ctx.core.list_namespaced_pod(namespace or ctx.owner.namespace, field_selector=f"spec.nodeName={node}").items
    users = []
    for pod in pods:
        if pod.status and pod.status.phase in ("Succeeded", "Failed"):
            continue
        for volume in pod.spec.volumes or []:
            by_path = volume.host_path is not None and volume.host_path.path == path
            by_claim = volume.persistent_volume_claim is not None and volume.persistent_volume_claim.claim_name == claim
            if by_path or by_claim:
                users.append(pod.metadata.name)
                break
    return users


def forget_removed_nodes(ctx: SourceContext, view: ClusterView) -> None:
    """Delete the VolumeNodes of nodes that are gone for good (no Node, agent silent).

    The controller deletes a VolumeNode when it sees its Node deleted; one deleted while the
    controller was down (a watch does not replay deletions) is found here.
    """
    for name in view.volumenodes:
        if name in view.nodes or not agent_gone(view, name):
            continue
        try:
            ctx.custom.delete_cluster_custom_object(names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL, name)
            logger.info("deleted VolumeNode %s: its node is gone", name)
        except ApiException as exc:
            if exc.status != 404:
                raise


GARBAGE_COLLECTION = Throttle(30.0)


def collect_garbage(ctx: SourceContext, view: ClusterView, sweeps: Throttle = GARBAGE_COLLECTION) -> None:
    """Remove data labels from nodes not assigned the data; release the assignments of
    VolumeManagers that are gone.

    A VolumeManager's passes and its finalizer clean up after it, but a pass that was already
    running when another released a node or the finalizer ran (a timer that started before
    the deletion) can still write a label or an assignment from what it had read: nothing
    would ever remove those. So every 30 s one pass looks at the whole cluster. The view
    (nodes, then VolumeNodes) is read before the VolumeManagers are listed: whatever the view
    shows of a VolumeManager that still exists is in that list. Data that running pods mount
    stays until they are gone.
    """
    if not sweeps.due():
        return
    try:
        listed = ctx.custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.VOLUMEMANAGER_PLURAL)
    except ApiException as exc:
        logger.warning("cannot list VolumeManagers to find orphaned data: %s", exc.reason)
        return
    uids = {vm["metadata"]["uid"] for vm in listed.get("items", [])}
    known: set[tuple[str, str]] = set()  # (node, label) of assignments of existing VolumeManagers
    orphans: list[tuple[str, VolumeManagerRef, dict[str, Any]]] = []
    for node, vnode in view.volumenodes.items():
        for entry in (vnode.get("spec") or {}).get("replicas") or []:
            ref = entry.get("volumeManager") or {}
            owner = VolumeManagerRef(str(ref.get("namespace")), str(ref.get("name")), str(ref.get("uid")))
            if owner.uid in uids:
                known.add((node, data_label(owner, str(entry.get("volumeId")), str(entry.get("sourceHash")))))
            else:
                orphans.append((node, owner, entry))
    for name, node in view.nodes.items():
        for key in list(node.metadata.labels or {}):
            if not key.startswith(f"{DATA_LABEL_PREFIX}/") or (name, key) in known:
                continue
            # A label is set only on a node assigned the data, and removed before the data is
            # released: one without an assignment of an existing VolumeManager is stale.
            if set_label(ctx, view, name, key, present=False):
                logger.info("removed stale label %s from node %s: it holds no such data", key, name)
    for node, owner, entry in orphans:
        path = str(entry.get("path"))
        claim = claim_name(owner, str(entry.get("volumeId")), str(entry.get("sourceHash")))
        if node in view.nodes and pods_using_path(ctx, node, path, claim, owner.namespace):
            continue
        logger.info("releasing %s from node %s: its VolumeManager is gone", entry.get("name"), node)
        unassign(ctx, node, [str(entry.get("name"))])


def release_blocked(ctx: SourceContext, view: ClusterView, node: str, label: str, *, path: str, claim: str) -> bool:
    """Unlabel ``node`` for the data at ``path``; True while that data must stay there.

    It stays while a pod that has not finished runs on the node and mounts it, and for one
    more pass after this call removed the label: the scheduler may have bound a pod there on
    the strength of the label just before it went, and the next pass sees that pod.
    """
    unlabelled_now = set_label(ctx, view, node, label, present=False)
    if node in view.nodes and pods_using_path(ctx, node, path, claim):
        return True
    return unlabelled_now


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


def namespace_cap_problem(ctx: SourceContext, view: ClusterView, key: str, wanted: int) -> str | None:
    """Why the replica ``key`` may not be on ``wanted`` nodes: the namespace's other replicas
    on nodes and these would pass the admin's cap. Passes running at once may each see the
    others' writes late and pass it by a few; the cap per node is the hard bound."""
    namespace = ctx.owner.namespace
    return ctx.policy.namespace_cap_problem(namespace, view.namespace_replicas(namespace, except_key=key), wanted)


def place_replica(
    view: ClusterView,
    config: VolumeConfig,
    key: str,
    max_node_replicas: int = 0,
    *,
    meet_on: str | None = None,
    in_use: Callable[[str], bool] | None = None,
) -> tuple[list[str], Placement, str | None]:
    """The nodes assigned the replica ``key`` now, where it goes, and why it cannot also go
    to ``meet_on`` (gated workloads need the volume there, with others).

    The assigned nodes that still count are kept (new ones added up to ``replicas``, none
    holding ``max_node_replicas``). Holding more than ``replicas`` (a move done, or
    ``replicas`` lowered), the nodes where the data is ``in_use`` stay first, then Ready ones:
    the replicas that go are the ones nothing reads.
    """
    assigned = view.assigned(key)
    healthy = [n for n in assigned if keeps_replica(view, n)]
    used = set(filter(in_use, healthy)) if in_use is not None and len(healthy) > config.replicas else set()
    healthy.sort(key=lambda n: (n not in used, view.report(n, key).get("phase") != "Ready", n))
    request = VolumeRequest(
        replicas=config.replicas,
        capacity_bytes=parse_quantity(config.capacity) if config.capacity else 0,
        node_affinity=config.node_affinity,
        tolerations=config.tolerations,
        max_node_replicas=max_node_replicas,
    )
    if meet_on is None:
        return assigned, place(request, view.node_infos(), current=healthy), None
    return assigned, *meet(request, view.node_infos(), healthy, meet_on)


def _placement(
    ctx: SourceContext, view: ClusterView, config: VolumeConfig, replica: Replica, *, key: str, path: str, claim: str
) -> tuple[list[str], Placement, str | None]:
    """place_replica, with a replica also where gated workloads need it (ctx.together_on)
    unless the node cannot take it, the volume's replicas hold different shards, or the
    namespace would pass its cap; the reason goes back to the gated-pod pass
    (ctx.cannot_meet), which then chooses another node or tells the pod none can."""
    meet_on = ctx.together_on.get(config.id)
    max_node = ctx.policy.max_replicas_per_node
    cannot_meet: str | None

    def in_use(node: str) -> bool:
        return bool(pods_using_path(ctx, node, path, claim))

    if meet_on is not None and replica.slots:
        cannot_meet = "its replicas hold different shards (distributionStrategy), so none can move"
        assigned, placement, _ = place_replica(view, config, key, max_node, in_use=in_use)
    else:
        assigned, placement, cannot_meet = place_replica(view, config, key, max_node, meet_on=meet_on, in_use=in_use)
    if meet_on is not None and placement.added and namespace_cap_problem(ctx, view, key, len(placement.nodes)):
        # A move takes one more replica for a while: never past the namespace's cap.
        assigned, placement, _ = place_replica(view, config, key, max_node, in_use=in_use)
        cannot_meet = "the namespace is at its cap of replicas"
    if meet_on is not None and cannot_meet:
        ctx.cannot_meet(config.id, meet_on, cannot_meet)
    return assigned, placement, cannot_meet


def provision(ctx: SourceContext, config: VolumeConfig, replica: Replica) -> VolumeStatus:
    owner = ctx.owner
    view = load_view(ctx)
    key = replica_key(owner, config.id, replica.digest)
    path = node_path(replica.root or ctx.node_data_root, owner, config.id, replica.digest)
    label = data_label(owner, config.id, replica.digest)
    claim = claim_name(owner, config.id, replica.digest)
    assigned, placement, cannot_meet = _placement(ctx, view, config, replica, key=key, path=path, claim=claim)
    if placement.added and (over := namespace_cap_problem(ctx, view, key, len(placement.nodes))):
        # New replicas only: those already placed stay, until the spec or the cap changes.
        return VolumeStatus(id=config.id, sourceType=config.source_type, phase=VolumePhase.FAILED, message=over)
    if cannot_meet:
        logger.info("%s: a gated workload needs it with other volumes on one node, but %s", key, cannot_meet)
    entry: dict[str, Any] = {
        "name": key,
        "volumeManager": {"namespace": owner.namespace, "name": owner.name, "uid": owner.uid},
        "volumeId": config.id,
        "sourceType": config.source_type,
        "sourceHash": replica.digest,
        "path": path,
        "options": dict(replica.options),
        # The bytes the agent lets the replica take: the volume's capacity, else the admin's default.
        "capacity": config.capacity or ctx.default_capacity,
    }
    kept = [n for n in placement.nodes if n not in placement.added]
    if replica.credentials_secret:
        # The agents read a copy in KVC's credentials namespace, never the tenant's Secret.
        # It is refreshed while some node still fetches: the user may fix the Secret meanwhile.
        entry["credentialsSecret"] = _credentials.reference(ctx, config.id, replica.credentials_secret)
        if placement.added or any(view.report(node, key).get("phase") != "Ready" for node in kept):
            _credentials.refresh(ctx, config, replica.credentials_secret)
    for node in kept:
        # Assigned by an earlier version (the tenant's Secret), or the volume's Secret was
        # named or dropped since: the agent is told where its credentials are now.
        # So is the capacity, raised by the user since (e.g. to heal a replica that outgrew it).
        held = view.entry(node, key)
        if held.get("credentialsSecret") != entry.get("credentialsSecret") or held.get("capacity") != entry["capacity"]:
            held.pop("credentialsSecret", None)
            if "credentialsSecret" in entry:
                held["credentialsSecret"] = entry["credentialsSecret"]
            held["capacity"] = entry["capacity"]
            assign(ctx, node, held)
    free_slots = slots_to_fill(replica.slots, [view.entry(n, key).get("options") or {} for n in kept])
    for index, node in enumerate(placement.added):
        logger.info("assigning %s to node %s", key, node)
        extra = free_slots[index] if index < len(free_slots) else {}
        assign(ctx, node, {**entry, "options": {**entry["options"], **extra}})
    for node in assigned:
        if node in placement.nodes:
            continue
        # Lost (node cordoned, NotReady past the grace, agent gone) or no longer needed:
        # unlabel first, then release the data, but never under a pod that still runs there
        # (whatever the node's state: if it comes back, its pods find their data).
        if release_blocked(ctx, view, node, label, path=path, claim=claim):
            continue
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
    volume_name, _ = _claims.object_names(owner, config.id, replica.digest)
    known = _claims.ensure_pair(
        ctx,
        volume_name,
        build_claim(owner, config, replica.digest),
        lambda claim_uid: build_persistent_volume(
            owner, config, replica.digest, path=path, label=label, claim_uid=claim_uid
        ),
    )
    return _status(
        config,
        shortfall=placement.shortfall_message(config.replicas),
        note=(
            f"gated workloads need it on {ctx.together_on.get(config.id)} with other volumes, but {cannot_meet}"
            if cannot_meet
            else ""
        ),
        ready=ready,
        nodes=nodes_status,
        path=path,
        label=label,
        was_usable=ctx.previous_phases.get(config.id) in ("Ready", "Degraded"),
        claim=(claim, volume_name, known.phase),
    )


def volume_phase(
    desired: int,
    ready: int,
    *,
    shortfall: str,
    failed: list[dict[str, Any]],
    was_usable: bool,
    progress: str,
    placed: int,
) -> tuple[VolumePhase, str]:
    """Phase and message of a node-local volume (pure); ``placed`` nodes hold or fetch it.

    Degraded means usable but short of replicas: some are Ready and more cannot be placed,
    or a volume that was usable lost replicas that are being placed again. A volume with no
    Ready replica is never usable (workloads wait at the scheduling gate): Pending while no
    node can take it, Failed once every node that was given it reports failure, else
    Provisioning, with the shortfall and the first failure in the message. One failed node
    does not fail the volume while others still fetch it: agents retry failures.
    """
    counts = f"{ready}/{desired} replicas ready"
    if ready >= desired:
        return VolumePhase.READY, counts
    failure = f"; {failed[0]['name']}: {failed[0]['message']}" if failed else ""
    if ready and (shortfall or was_usable):
        return VolumePhase.DEGRADED, f"{counts}; {shortfall}" if shortfall else f"{counts}, {progress}{failure}"
    if not placed:
        return VolumePhase.PENDING, f"{counts}; {shortfall or 'no node can take it yet'}"
    if failed and not ready and len(failed) >= placed:
        return VolumePhase.FAILED, f"{failed[0]['name']}: {failed[0]['message']}"
    short = f"; {shortfall}" if shortfall else ""
    return VolumePhase.PROVISIONING, f"{counts}, {progress}{short}{failure}"


def _status(
    config: VolumeConfig,
    *,
    shortfall: str,
    ready: int,
    nodes: list[dict[str, Any]],
    path: str,
    label: str,
    was_usable: bool,
    claim: tuple[str, str, str | None],
    note: str = "",
) -> VolumeStatus:
    """``claim`` is (claim name, PV name, the claim's phase or None while it is being made);
    ``note`` ends the message."""
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
        placed=len(nodes),
    )
    name, volume_name, claim_phase = claim
    if phase in (VolumePhase.READY, VolumePhase.DEGRADED) and claim_phase != "Bound":
        # Workloads mount the claim: the data is not usable until the claim is bound.
        state = f"is {claim_phase}" if claim_phase else "is being created"
        phase = VolumePhase.PROVISIONING
        message = f"{message}; waiting for claim {name} to bind to PersistentVolume {volume_name}: the claim {state}"
    if note:
        message = f"{message}; {note}"
    return VolumeStatus(
        id=config.id,
        sourceType=config.source_type,
        phase=phase,
        message=message,
        # The node path stays in the status (the original KVC contract, and the hostPath
        # opt-in); workloads are wired to the claim.
        volumeSource={"hostPath": {"path": path, "type": "Directory"}},
        claimName=name,
        persistentVolumeName=volume_name,
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
    view = load_view(ctx)
    if not view.removed_nodes_checked:
        view.removed_nodes_checked = True
        forget_removed_nodes(ctx, view)
    collect_garbage(ctx, view)
    kept = []
    stale: dict[str, list[str]] = {}
    waiting: _readers.Readers | None = None
    for node, entry in view.entries_of(ctx.owner):
        if entry.get("sourceType") != source_type:
            continue
        volume_id = str(entry.get("volumeId"))
        if not deleting and volume_id in current and current[volume_id] in (None, entry.get("sourceHash")):
            continue
        label = data_label(ctx.owner, volume_id, str(entry.get("sourceHash")))
        claim = claim_name(ctx.owner, volume_id, str(entry.get("sourceHash")))
        if not deleting:
            # Earlier data that a training job's templates or a waiting pod still mount stays
            # wherever it is, labelled where Ready: their pods are scheduled onto it.
            waiting = waiting if waiting is not None else _readers.waiting_readers(ctx)
            if readers := waiting.of(claim, str(entry.get("path"))):
                ready = view.report(node, str(entry["name"])).get("phase") == "Ready"
                set_label(ctx, view, node, label, present=ready)
                kept.append(f"earlier data of {volume_id} on {node} is kept for {', '.join(readers[:5])}")
                continue
        unlabelled_now = set_label(ctx, view, node, label, present=False)
        # Data stays under running pods, also on a cordoned or silent node. Only a deletion
        # does not wait for a lost node (deleted, NotReady past the grace, agent gone):
        # uninstalling never hangs on it, and its agent deletes the data when it comes back.
        waits = node in view.nodes and not (deleting and node_lost(view, node))
        users = pods_using_path(ctx, node, str(entry.get("path")), claim) if waits else []
        if users:
            kept.append(f"old data of {volume_id} on {node} is kept until pod(s) {', '.join(sorted(users)[:5])} stop")
            continue
        if unlabelled_now:
            # Released at the next pass, once no pod can have been scheduled by the label.
            if deleting:
                kept.append(f"data of {volume_id} on {node} is released once its node label is gone")
            continue
        stale.setdefault(node, []).append(str(entry["name"]))
    for node, keys in stale.items():
        logger.info("releasing %s from node %s", ", ".join(keys), node)
        unassign(ctx, node, keys)
    return kept


# --------------------------------------------------------------------------- the shared plugin base


class NodeLocalSource(Source):
    """A source type whose data is copied onto nodes and mounted through a claim on its node path."""

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

    def claim_name(self, owner: VolumeManagerRef, config: VolumeConfig) -> str | None:
        return claim_name(owner, config.id, self.digest(config))

    def validate(self, config: VolumeConfig) -> list[str]:
        """Also: what goes into every VolumeNode holding the data is small (kvc.policy)."""
        problems = super().validate(config)
        if not problems:
            replica = self.replica(config)
            slot = max(replica.slots, key=stored_bytes, default={})
            problem = copied_options_problem(replica.options, (replica.root or "", slot))
            problems += [problem] if problem else []
        return problems

    def provision(self, ctx: SourceContext, config: VolumeConfig) -> VolumeStatus:
        problem = ctx.policy.toleration_problem(config.tolerations)
        if problem:
            return VolumeStatus(id=config.id, sourceType=config.source_type, phase=VolumePhase.FAILED, message=problem)
        return provision(ctx, config, self.replica(config))

    def cleanup(
        self, ctx: SourceContext, current: Mapping[str, VolumeConfig | None], deleting: bool = False
    ) -> list[str]:
        digests = {
            volume_id: (self.digest(config) if config is not None else None)
            for volume_id, config in current.items()
            if config is None or config.source_type == self.source_type
        }
        wanted = {
            volume_id: secret
            for volume_id, config in current.items()
            if config is not None and (secret := config.options.get(self.credentials_option, "").strip())
        }
        _credentials.remove_stale(ctx, self.source_type, current, wanted, force=deleting)
        # Claims first: one still mounted keeps its PV, and the data under it is kept by cleanup.
        kept = _claims.remove_stale_claims(ctx, self.source_type, current, self.digest, force=deleting)
        return kept + cleanup(ctx, self.source_type, digests, deleting)
