"""Choosing the nodes that hold a volume's replicas: a pure, deterministic function.

A node is eligible when it is Ready, its agent heartbeats, it matches the volume's
required node affinity, every NoSchedule/NoExecute taint on it is tolerated, and it has
free disk for the volume's capacity.  Among eligible nodes, those that already hold the
data come first, then the least loaded (fewest replicas, then fewest bytes), then by name
so the same cluster state always gives the same answer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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


_OPERATORS: dict[str, Callable[[str | None, list[str]], bool]] = {
    "In": lambda value, values: value is not None and value in values,
    "NotIn": lambda value, values: value is None or value not in values,
    "Exists": lambda value, values: value is not None,
    "DoesNotExist": lambda value, values: value is None,
    "Gt": lambda value, values: _compare(value, values, greater=True),
    "Lt": lambda value, values: _compare(value, values, greater=False),
}


def _expression_matches(expression: Mapping[str, Any], value: str | None) -> bool:
    operator = _OPERATORS.get(str(expression.get("operator")))
    return operator is not None and operator(value, [str(v) for v in expression.get("values") or []])


def term_matches(term: Mapping[str, Any], node: NodeInfo) -> bool:
    """A node selector term: every expression must match (an empty term matches nothing)."""
    expressions = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not expressions and not fields:
        return False
    for expression in expressions:
        if not _expression_matches(expression, node.labels.get(str(expression.get("key")))):
            return False
    for expression in fields:
        value = node.name if expression.get("key") == "metadata.name" else None
        if not _expression_matches(expression, value):
            return False
    return True


def affinity_matches(node_affinity: Mapping[str, Any] | None, node: NodeInfo) -> bool:
    """Required node affinity, as kube-scheduler reads it: the terms are ORed."""
    required = (node_affinity or {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    if not required:
        return True
    return any(term_matches(term, node) for term in required.get("nodeSelectorTerms") or [])


def preference_score(node_affinity: Mapping[str, Any] | None, node: NodeInfo) -> int:
    """Sum of the weights of the preferred terms the node matches."""
    preferred = (node_affinity or {}).get("preferredDuringSchedulingIgnoredDuringExecution") or []
    return sum(int(p.get("weight", 0)) for p in preferred if term_matches(p.get("preference") or {}, node))


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


def ineligibility(node: NodeInfo, request: VolumeRequest) -> str | None:
    """Why a node may not hold a new replica of the volume, or None if it may."""
    if not node.ready:
        return "not Ready"
    if not node.agent_alive:
        return "without a live KVC agent"
    if not affinity_matches(request.node_affinity, node):
        return "not matching nodeAffinity"
    for taint in node.taints:
        if taint.get("effect") in _BLOCKING_EFFECTS and not tolerates(request.tolerations, taint):
            return "with untolerated taints"
    if request.capacity_bytes and node.free_bytes is not None and node.free_bytes < request.capacity_bytes:
        return "short of free disk"
    return None


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
    by_name = {node.name: node for node in nodes}
    kept = [name for name in current if name in by_name][: request.replicas]
    missing = request.replicas - len(kept)
    if missing <= 0:
        return Placement(tuple(kept), (), 0, {})
    holds = set(holding)
    reasons: dict[str, int] = {}
    candidates = []
    taken = set(kept)
    for node in nodes:
        if node.name in taken:
            continue
        reason = ineligibility(node, request)
        if reason:
            reasons[reason] = reasons.get(reason, 0) + 1
            continue
        candidates.append(node)
    candidates.sort(
        key=lambda n: (
            n.name not in holds,
            -preference_score(request.node_affinity, n),
            n.replicas,
            n.assigned_bytes,
            n.name,
        )
    )
    added = tuple(node.name for node in candidates[:missing])
    return Placement(tuple(kept) + added, added, missing - len(added), reasons)
