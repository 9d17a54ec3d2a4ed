"""Releasing pods the webhook gated while their data was being provisioned.

Once every volume a gated pod asks for is usable, and some node holds all of its node-local
volumes, the pod gets the data's node affinity (appended to its required terms, which a
gated pod may still narrow) and loses KVC's scheduling gate; other gates are left alone,
even when their controllers remove theirs at the same moment.

A pod whose node-local volumes are Ready on nodes of their own (placed apart, each within
its replicas) would fit nowhere: it stays gated, an Event on it names the volumes and their
nodes, and the pass chooses the node that already holds most of them for the others to move
onto (``Together``); the VolumeManagers' passes move one replica each (kvc.sources._nodelocal).
A pod that can never be released (its volume Failed, or gone) gets an Event saying why.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonpatch
import kopf
from kubernetes.client.rest import ApiException

from kvc.api import names
from kvc.placement import NodeInfo, affinity_matches
from kvc.wiring import grammar
from kvc.wiring.mutation import (
    MutationError,
    ResolvedVolume,
    add_node_affinity,
    data_expressions,
    injected_volumes,
    share_no_node,
    wired_earlier,
)
from kvc.wiring.resolve import Catalog, CatalogEntry, catalog_entries, resolve

logger = logging.getLogger(__name__)


Expressions = list[dict[str, Any]]


def _no_earlier_data(pod_volume: Mapping[str, Any]) -> Expressions | None:
    return None


def released(
    pod: Mapping[str, Any],
    entries: Catalog | Iterable[CatalogEntry],
    earlier_ready: Callable[[Mapping[str, Any]], Expressions | None] = _no_earlier_data,
) -> dict[str, Any] | None:
    """The pod ready to schedule, or None while some of its data is not usable yet (pure).

    A pod gated while a volume had an earlier source still mounts that source's claim or node
    path (its volumes cannot change): it waits for that data. ``earlier_ready`` gives, for such a
    pod volume, the node-selector expressions under which the earlier data can be used ([] for
    shared storage), or None while it is Ready nowhere.
    """
    metadata = pod.get("metadata") or {}
    try:
        request = grammar.parse(metadata.get("annotations") or {})
        volumes = resolve(request, str(metadata.get("namespace")), entries) if request else []
    except (grammar.GrammarError, MutationError):
        return None  # e.g. the VolumeManager is gone: the pod stays gated, visibly Pending
    earlier = wired_earlier(pod.get("spec") or {}, volumes, injected_volumes(pod))
    current = [v for v in volumes if v not in earlier]
    if not all(volume.ready for volume in current) or share_no_node(current):
        return None
    expressions = data_expressions(current)
    earlier_names = {v.volume_name for v in earlier}
    for pod_volume in (pod.get("spec") or {}).get("volumes") or []:
        if pod_volume.get("name") not in earlier_names:
            continue
        usable_where = earlier_ready(pod_volume)
        if usable_where is None:
            return None
        expressions += usable_where
    ungated = copy.deepcopy(dict(pod))
    spec = ungated.setdefault("spec", {})
    add_node_affinity(spec, expressions)
    spec["schedulingGates"] = [g for g in spec.get("schedulingGates") or [] if g.get("name") != names.SCHEDULING_GATE]
    if not spec["schedulingGates"]:
        del spec["schedulingGates"]
    ungated.setdefault("metadata", {}).setdefault("labels", {}).pop(names.LABEL_GATED, None)
    return ungated


VolumeKey = tuple[str, str]  # (VolumeManager, volume id)


def _anywhere(node: str) -> bool:
    return True


def _never_refused(volume: VolumeKey, node: str) -> str | None:
    return None


def meeting_node(
    volumes: Sequence[ResolvedVolume],
    *,
    planned: Mapping[VolumeKey, str] | None = None,
    fits: Callable[[str], bool] = _anywhere,
    refused: Callable[[VolumeKey, str], str | None] = _never_refused,
) -> tuple[str | None, list[str]]:
    """Where volumes placed apart should meet, and why the nodes passed over could not be it.

    The node holding Ready replicas of most of them (the fewest moves; a move already
    planned for another pod counts as done), the first by name among equals, among the
    nodes the pod itself may run on (``fits``) and where no volume that would have to move
    was refused (``refused``: a placement pass found the node cannot take it: affinity,
    taints, disk, caps). None when no node can be it.
    """
    planned = planned or {}

    def holders(volume: ResolvedVolume) -> set[str]:
        key = (volume.manager, volume.volume_id)
        return {*(volume.ready_nodes or ()), *([planned[key]] if key in planned else [])}

    count: dict[str, int] = {}
    for volume in volumes:
        for node in holders(volume):
            count[node] = count.get(node, 0) + 1
    why_not: list[str] = []
    for node in sorted(count, key=lambda name: (-count[name], name)):
        if not fits(node):
            why_not.append(f"the pod's own node selection excludes {node}")
            continue
        refusals = [
            f"{volume.ref} cannot go to {node}: {reason}"
            for volume in volumes
            if node not in holders(volume) and (reason := refused((volume.manager, volume.volume_id), node))
        ]
        if not refusals:
            return node, why_not
        why_not += refusals
    return None, why_not


@dataclass(frozen=True)
class Held:
    """Why a gated pod cannot be released yet, when that needs someone to act."""

    reason: str  # the Event's reason: DataUnavailable or DataApart
    message: str
    # Volumes placed apart: (VolumeManager, volume id) -> the node it should also be on.
    moves: Mapping[VolumeKey, str] = field(default_factory=dict)


def held(
    pod: Mapping[str, Any],
    entries: Catalog | Iterable[CatalogEntry],
    *,
    planned: Mapping[VolumeKey, str] | None = None,
    fits: Callable[[str], bool] = _anywhere,
    refused: Callable[[VolumeKey, str], str | None] = _never_refused,
) -> Held | None:
    """Why ``pod`` stays gated when waiting alone will not release it (pure): its volume is
    Failed, unknown or being deleted, or its node-local volumes are Ready apart (then where
    they should meet: ``meeting_node``)."""
    metadata = pod.get("metadata") or {}
    try:
        request = grammar.parse(metadata.get("annotations") or {})
        volumes = resolve(request, str(metadata.get("namespace")), entries) if request else []
    except (grammar.GrammarError, MutationError) as exc:
        if "has no volume source yet" in str(exc):
            return None  # created a moment ago: the controller reports it within seconds
        return Held("DataUnavailable", f"{exc}; the pod stays gated until that is fixed (or delete it)")
    current = [v for v in volumes if v not in wired_earlier(pod.get("spec") or {}, volumes, injected_volumes(pod))]
    local = [v for v in current if v.ready_nodes is not None]
    if not local or not all(v.ready for v in local) or not share_no_node(local):
        return None
    where = "; ".join(f"{v.ref} on {', '.join(sorted(v.ready_nodes or ())) or 'no node yet'}" for v in local)
    target, why_not = meeting_node(local, planned=planned, fits=fits, refused=refused)
    if target is None:
        return Held(
            "DataApart",
            f"no node holds all of its volumes ({where}), and none can: {'; '.join(why_not)}. Widen the "
            "volumes' nodeAffinity (or the pod's), or ask for them in separate pods",
        )
    moves = {(v.manager, v.volume_id): target for v in local if target not in (v.ready_nodes or ())}
    moving = ", ".join(str(v.ref) for v in local if (v.manager, v.volume_id) in moves)
    return Held(
        "DataApart",
        f"no node holds all of its volumes ({where}): KVC is placing a replica of {moving} on {target}, "
        "the pod is released once that node holds them all",
        moves,
    )


class Together:
    """Where volumes of a namespace should also be placed, so that its gated pods find one
    node holding all they ask for: (namespace, VolumeManager, volume id) -> node; and the
    nodes a placement pass found could not take a volume, so the next choice avoids them.

    Each gated-pod pass gives its namespace's wishes. A wish outlives the last pod that
    needed it by ``linger_seconds``, so that the pods released onto the node it made are
    bound before the volume goes back to ``replicas`` (kvc.placement.meet keeps every
    replica while a wish stands). Wishes live in memory; after a restart the next pass over
    the still-gated pods finds them again.
    """

    # Released pods are bound within seconds of losing their gate; the rest is margin.
    def __init__(self, linger_seconds: float = 20.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.linger_seconds = linger_seconds
        self._clock = clock
        self._lock = threading.Lock()
        # namespace -> volume -> (node, when a pass last wanted it there)
        self._wishes: dict[str, dict[VolumeKey, tuple[str, float]]] = {}
        # (namespace, volume, node) -> (why it cannot go there, when that was found)
        self._refused: dict[tuple[str, VolumeKey, str], tuple[str, float]] = {}

    def replace(self, namespace: str, moves: Mapping[VolumeKey, str]) -> set[str]:
        """Record the namespace's wishes now; returns the VolumeManagers given a new one."""
        now = self._clock()
        with self._lock:
            before = self._wishes.get(namespace, {})
            wishes = {
                volume: (node, seen)
                for volume, (node, seen) in before.items()
                if now - seen <= self.linger_seconds and volume not in moves
            }
            changed = {volume[0] for volume, node in moves.items() if before.get(volume, ("", 0.0))[0] != node}
            wishes.update((volume, (node, now)) for volume, node in moves.items())
            if wishes:
                self._wishes[namespace] = wishes
            else:
                self._wishes.pop(namespace, None)
            self._refused = {
                key: value for key, value in self._refused.items() if now - value[1] <= self.linger_seconds
            }
        return changed

    def wishes(self, namespace: str) -> dict[VolumeKey, str]:
        """The namespace's standing wishes: volume -> node."""
        now = self._clock()
        with self._lock:
            standing = self._wishes.get(namespace, {})
            return {volume: node for volume, (node, seen) in standing.items() if now - seen <= self.linger_seconds}

    def of(self, namespace: str, manager: str) -> dict[str, str]:
        """Volume id -> the node that volume should also be on."""
        return {volume_id: node for (owner, volume_id), node in self.wishes(namespace).items() if owner == manager}

    def refuse(self, namespace: str, volume: VolumeKey, node: str, reason: str) -> None:
        """A placement pass found ``node`` cannot take a replica of ``volume``: drop that wish,
        and let the next gated-pod pass choose another node (or tell the pod none can)."""
        now = self._clock()
        with self._lock:
            self._refused[(namespace, volume, node)] = (reason, now)
            wishes = self._wishes.get(namespace, {})
            if wishes.get(volume, ("", 0.0))[0] == node:
                del wishes[volume]

    def refusal(self, namespace: str, volume: VolumeKey, node: str) -> str | None:
        with self._lock:
            found = self._refused.get((namespace, volume, node))
        return found[0] if found and self._clock() - found[1] <= self.linger_seconds else None


TOGETHER = Together()


class _Told:
    """The Events already posted on gated pods (uid -> a digest of the message), so each is
    posted once; a message that changes (the volumes moved, another node was chosen) is news."""

    def __init__(self, limit: int = 65536) -> None:
        self._lock = threading.Lock()
        self._told: dict[str, bytes] = {}
        self._limit = limit

    def first_time(self, uid: str, message: str) -> bool:
        digest = hashlib.blake2b(message.encode(), digest_size=8).digest()
        with self._lock:
            if self._told.get(uid) == digest:
                return False
            if len(self._told) >= self._limit:
                self._told.clear()
            self._told[uid] = digest
            return True


_TOLD = _Told()


@dataclass(frozen=True)
class GatedPass:
    released: int
    # The VolumeManagers (uids) given new placement wishes: their passes should run now.
    rearranged: set[str] = field(default_factory=set)


def release_gated_pods(core: Any, custom: Any, namespace: str, together: Together = TOGETHER) -> GatedPass:
    """Release the namespace's gated pods whose data is usable; say why the others wait
    when waiting alone will not do, and where their volumes should meet."""
    pods = core.list_namespaced_pod(namespace, label_selector=f"{names.LABEL_GATED}=true").items
    if not pods:
        together.replace(namespace, {})
        return GatedPass(0)
    listed = custom.list_namespaced_custom_object(names.GROUP, names.VERSION, namespace, names.VOLUMEMANAGER_PLURAL)
    # One catalog for the pass: it resolves each set of refs once, whatever number of pods ask for it.
    entries = Catalog(entry for vm in listed.get("items", []) for entry in catalog_entries(vm))
    moves: dict[VolumeKey, str] = {}
    standing = together.wishes(namespace)
    nodes = _NodeLabels(core)
    patches: list[tuple[Any, list[dict[str, Any]]]] = []  # (the pod as read, its patch)
    for pod in pods:
        current = core.api_client.sanitize_for_serialization(pod)
        # Listed pods come without their kind: an Event needs it to show in `kubectl describe pod`.
        current.update(apiVersion="v1", kind="Pod")
        target = released(current, entries, lambda volume: _where_usable(core, namespace, volume))
        if target is None:
            reason = held(
                current,
                entries,
                planned={**standing, **moves},
                fits=functools.partial(nodes.admit, current["spec"]),
                refused=lambda volume, node: together.refusal(namespace, volume, node),
            )
            if reason is not None:
                for volume, node in reason.moves.items():
                    moves.setdefault(volume, node)
                if _TOLD.first_time(str(pod.metadata.uid), reason.message):
                    kopf.event(current, type="Warning", reason=reason.reason, message=reason.message)
            continue
        # Another controller (Kueue, ...) may remove its own gate meanwhile, shifting the
        # list's indexes under ours: the test makes such a patch fail (the next pass retries)
        # rather than remove a gate that is not ours.
        patch = jsonpatch.make_patch(current, target).patch
        if "schedulingGates" in current["spec"]:
            patch.insert(
                0, {"op": "test", "path": "/spec/schedulingGates", "value": current["spec"]["schedulingGates"]}
            )
        patches.append((current, patch))
    count = 0
    # Hundreds of pods may wait for one volume: released a few at a time, not one after another.
    for current, done in zip(
        patches, _RELEASERS.map(lambda item: _patch(core, namespace, *item), patches), strict=True
    ):
        if done:
            # Seen in `kubectl describe pod`: why a pod that waited is now scheduled.
            kopf.event(
                current[0], type="Normal", reason="DataReady", message="its KVC volumes are ready: scheduling it"
            )
            count += 1
    changed = together.replace(namespace, moves)
    uids = {str(vm["metadata"].get("uid")) for vm in listed.get("items", []) if vm["metadata"].get("name") in changed}
    return GatedPass(count, uids)


_RELEASERS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="release")


class _NodeLabels:
    """Whether a pod's own node selection admits a node, reading the nodes once per pass and
    only if some pod needs it (a pass over pods whose volumes are apart)."""

    def __init__(self, core: Any) -> None:
        self._core = core
        self._labels: dict[str, Mapping[str, str]] | None = None

    def admit(self, pod_spec: Mapping[str, Any], node: str) -> bool:
        if self._labels is None:
            self._labels = {n.metadata.name: n.metadata.labels or {} for n in self._core.list_node().items}
        labels = self._labels.get(node)
        if labels is None:
            return False
        selector = pod_spec.get("nodeSelector") or {}
        if any(labels.get(key) != value for key, value in selector.items()):
            return False
        affinity = (pod_spec.get("affinity") or {}).get("nodeAffinity")
        return affinity_matches(affinity, NodeInfo(node, labels))


def _patch(core: Any, namespace: str, pod: Mapping[str, Any], patch: list[dict[str, Any]]) -> bool:
    name = pod["metadata"]["name"]
    try:
        core.patch_namespaced_pod(name, namespace, patch)
    except Exception as exc:  # the API server refused it, or could not be reached: the next pass retries
        logger.warning("releasing pod %s/%s failed: %s", namespace, name, getattr(exc, "reason", None) or exc)
        return False
    logger.info("released pod %s/%s: its data is ready", namespace, name)
    return True


def _where_usable(core: Any, namespace: str, pod_volume: Mapping[str, Any]) -> Expressions | None:
    """Where the earlier data a pod volume mounts (a claim, or with the hostPath opt-in a node
    path) can be used: the expressions its PV's node affinity requires, once some node carries
    each of them (the data is Ready there); [] for shared storage (an NFS export); None while the
    data is Ready nowhere, or when its PV is gone."""
    volume = _persistent_volume_of(core, namespace, pod_volume)
    if volume is None:
        return None
    required = volume.spec.node_affinity.required if volume.spec.node_affinity else None
    terms = required.node_selector_terms if required else []
    keys = [e.key for term in terms for e in term.match_expressions or []]
    if not all(core.list_node(label_selector=key, limit=1).items for key in keys):
        return None
    return [{"key": key, "operator": "Exists"} for key in keys]


def _persistent_volume_of(core: Any, namespace: str, pod_volume: Mapping[str, Any]) -> Any:
    claim = (pod_volume.get("persistentVolumeClaim") or {}).get("claimName")
    path = (pod_volume.get("hostPath") or {}).get("path")
    try:
        if claim:
            bound = core.read_namespaced_persistent_volume_claim(claim, namespace).spec.volume_name
            return core.read_persistent_volume(bound) if bound else None
    except ApiException as exc:
        if exc.status != 404:
            raise
        return None
    if path:
        # The node path of earlier node-local data: the `local` PV KVC made for it.
        selector = f"{names.LABEL_MANAGED_BY}={names.MANAGED_BY},{names.LABEL_VOLUMEMANAGER_NAMESPACE}={namespace}"
        for volume in core.list_persistent_volume(label_selector=selector).items:
            if volume.spec.local is not None and volume.spec.local.path == path:
                return volume
    return None
