"""Choosing the nodes that hold a volume's replicas: a pure, deterministic function.

A node is eligible when it is Ready, its agent heartbeats, it matches the volume's
required node affinity, every NoSchedule/NoExecute taint on it is tolerated, and it has
free disk for the volume's capacity.  Among eligible nodes, those that already hold the
data come first, then the least loaded (fewest replicas, then fewest bytes), then by name
so the same cluster state always gives the same answer.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kvc.policy import NODE_CAP_FLAG

# Taint effects that keep a replica off a node unless tolerated (PreferNoSchedule does not).
_BLOCKING_EFFECTS = frozenset({"NoSchedule", "NoExecute"})


@dataclass(frozen=True)
class NodeInfo:
    """What placement needs to know about a node."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: Sequence[Mapping[str, Any]] = ()
    ready: bool = True
    agent_alive: bool = True
    free_bytes: int | None = None  # None: unknown (the agent has not reported yet)
    replicas: int = 0
    assigned_bytes: int = 0


@dataclass(frozen=True)
class VolumeRequest:
    replicas: int
    capacity_bytes: int = 0
    node_affinity: Mapping[str, Any] | None = None
    tolerations: Sequence[Mapping[str, Any]] = ()
    # A node already holding this many replicas takes no new one (0: no limit).
    max_node_replicas: int = 0


@dataclass(frozen=True)
class Placement:
    nodes: tuple[str, ...]  # kept + added, at most `replicas`
    added: tuple[str, ...]
    shortfall: int  # replicas that found no eligible node
    reasons: Mapping[str, int]  # why nodes were not eligible: reason -> count

    def shortfall_message(self, replicas: int) -> str:
        if not self.shortfall:
            return ""
        placed = replicas - self.shortfall
        message = f"only {placed} of {replicas} replicas can be placed: {placed} eligible nodes"
        if self.reasons:
            why = ", ".join(f"{count} {reason}" for reason, count in sorted(self.reasons.items()))
            message += f"; other nodes are {why}"
        return message


def _compare(value: str | None, values: list[str], greater: bool) -> bool:
    try:
        left, right = int(value or ""), int(values[0])
    except (ValueError, IndexError):
        return False
    return left > right if greater else left < right


Test = Callable[[str | None], bool]
NodeTest = Callable[[NodeInfo], bool]


def _expression(expression: Mapping[str, Any]) -> Test:
    """One match expression as a test of a label's (or field's) value; unknown operators match nothing."""
    operator = str(expression.get("operator"))
    values = [str(v) for v in expression.get("values") or []]
    listed = frozenset(values)
    if operator == "In":
        return lambda value: value is not None and value in listed
    if operator == "NotIn":
        return lambda value: value is None or value not in listed
    if operator == "Exists":
        return lambda value: value is not None
    if operator == "DoesNotExist":
        return lambda value: value is None
    if operator in ("Gt", "Lt"):
        greater = operator == "Gt"
        return lambda value: _compare(value, values, greater)
    return lambda value: False


def compile_term(term: Mapping[str, Any]) -> NodeTest:
    """A node selector term as a test: every expression must match (an empty term matches nothing).

    Compiled once per placement, then applied to every node: with thousands of nodes,
    reading the term's dictionaries again for each node would cost more than the matching.
    """
    expressions = [(str(e.get("key")), _expression(e)) for e in term.get("matchExpressions") or []]
    fields = [(e.get("key") == "metadata.name", _expression(e)) for e in term.get("matchFields") or []]
    if not expressions and not fields:
        return lambda node: False

    def matches(node: NodeInfo) -> bool:
        labels = node.labels
        for key, test in expressions:
            if not test(labels.get(key)):
                return False
        return all(test(node.name if by_name else None) for by_name, test in fields)

    return matches


def compile_required(node_affinity: Mapping[str, Any] | None) -> NodeTest | None:
    """Required node affinity as kube-scheduler reads it (the terms are ORed); None: no requirement."""
    required = (node_affinity or {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    if not required:
        return None
    terms = [compile_term(term) for term in required.get("nodeSelectorTerms") or []]
    if len(terms) == 1:
        return terms[0]

    def matches(node: NodeInfo) -> bool:
        return any(term(node) for term in terms)

    return matches


def compile_preferred(node_affinity: Mapping[str, Any] | None) -> tuple[tuple[int, NodeTest], ...]:
    preferred = (node_affinity or {}).get("preferredDuringSchedulingIgnoredDuringExecution") or []
    return tuple((int(p.get("weight", 0)), compile_term(p.get("preference") or {})) for p in preferred)


def affinity_matches(node_affinity: Mapping[str, Any] | None, node: NodeInfo) -> bool:
    """Required node affinity, as kube-scheduler reads it: the terms are ORed."""
    required = compile_required(node_affinity)
    return required is None or required(node)


def tolerates(tolerations: Sequence[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    for toleration in tolerations:
        effect = toleration.get("effect") or ""
        if effect and effect != taint.get("effect"):
            continue
        operator = toleration.get("operator") or "Equal"
        key = toleration.get("key") or ""
        if operator == "Exists":
            if not key or key == taint.get("key"):
                return True
        elif key == taint.get("key") and (toleration.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def _ineligibility(node: NodeInfo, request: VolumeRequest, required: NodeTest | None) -> str | None:
    if not node.ready:
        return "not Ready"
    if not node.agent_alive:
        return "without a live KVC agent"
    if required is not None and not required(node):
        return "not matching nodeAffinity"
    for taint in node.taints:
        if taint.get("effect") in _BLOCKING_EFFECTS and not tolerates(request.tolerations, taint):
            return "with untolerated taints"
    if request.capacity_bytes and node.free_bytes is not None and node.free_bytes < request.capacity_bytes:
        return "short of free disk"
    full = bool(request.max_node_replicas) and node.replicas >= request.max_node_replicas
    return f"full ({NODE_CAP_FLAG}={request.max_node_replicas})" if full else None


def ineligibility(node: NodeInfo, request: VolumeRequest) -> str | None:
    """Why a node may not hold a new replica of the volume, or None if it may."""
    return _ineligibility(node, request, compile_required(request.node_affinity))


def place(
    request: VolumeRequest,
    nodes: Sequence[NodeInfo],
    current: Sequence[str] = (),
    holding: Sequence[str] = (),
) -> Placement:
    """Which nodes should hold the volume.

    ``current`` are nodes already assigned and still healthy (kept, up to ``replicas``);
    ``holding`` are nodes that already have the data on disk (preferred for new replicas).
    """
    known = {node.name for node in nodes}
    kept = [name for name in current if name in known][: request.replicas]
    missing = request.replicas - len(kept)
    if missing <= 0:
        return Placement(tuple(kept), (), 0, {})
    required = compile_required(request.node_affinity)
    reasons: dict[str, int] = {}
    candidates = []
    taken = set(kept)
    for node in nodes:
        if node.name in taken:
            continue
        reason = _ineligibility(node, request, required)
        if reason:
            reasons[reason] = reasons.get(reason, 0) + 1
            continue
        candidates.append(node)
    holds = set(holding)
    preferred = compile_preferred(request.node_affinity)

    def rank(node: NodeInfo) -> tuple[Any, ...]:
        score = sum(weight for weight, term in preferred if term(node)) if preferred else 0
        return (node.name not in holds, -score, node.replicas, node.assigned_bytes, node.name)

    # The first `missing` of the sorted candidates, without sorting thousands of them.
    added = tuple(node.name for node in heapq.nsmallest(missing, candidates, key=rank))
    return Placement(tuple(kept) + added, added, missing - len(added), reasons)


def meet(
    request: VolumeRequest, nodes: Sequence[NodeInfo], current: Sequence[str], on: str
) -> tuple[Placement, str | None]:
    """``place``, with a replica also on node ``on`` (a workload needs this volume there,
    together with others), and why it cannot go there (None when it can).

    The replica on ``on`` comes in addition to the others, which all stay while the wish
    stands (a move never leaves a gap, and pods released onto the other nodes keep their
    data); once the wish is gone the volume goes back to ``replicas`` (``place`` keeps the first
    ``replicas`` of ``current``). A node
    that may not hold a new replica (full, short of disk, tainted, outside the volume's
    affinity) is not used.
    """
    if on in current:
        wider = replace(request, replicas=max(request.replicas, len(current)))
        return place(wider, nodes, current=current), None
    placement = place(request, nodes, current=current)
    if on in placement.nodes:
        return placement, None
    node = next((n for n in nodes if n.name == on), None)
    reason = "not a schedulable node" if node is None else ineligibility(node, request)
    if reason is not None:
        return placement, f"node {on} cannot take a replica: it is {reason}"
    return Placement((*placement.nodes, on), (*placement.added, on), placement.shortfall, placement.reasons), None
