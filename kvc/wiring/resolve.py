"""Finding the requested volumes among the namespace's VolumeManagers (pure).

The index hands this module the VolumeManagers of the workload's namespace; a request
resolves only there, never across namespaces.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kvc.sources.base import VolumeManagerRef
from kvc.sources.registry import SourceRegistry
from kvc.wiring import grammar
from kvc.wiring.mutation import Denial, MutationError, ResolvedVolume


@dataclass(frozen=True)
class CatalogEntry:
    """One volume of one VolumeManager, as admission needs it."""

    manager: str
    volume_id: str
    phase: str
    message: str
    volume_source: Mapping[str, Any] | None
    node_affinity: Mapping[str, Any] | None
    access_mode: str
    deleting: bool = False
    # Node-local data: the nodes holding a Ready replica (None for shared storage).
    ready_nodes: frozenset[str] | None = None


def _workload_source(status: Mapping[str, Any], host_path: bool) -> Mapping[str, Any] | None:
    """What a workload mounts for a volume: its claim, or (node-local data, with the admin's
    hostPath opt-in) the node path itself."""
    source = status.get("volumeSource")
    claim = status.get("claimName")
    if isinstance(source, dict) and "hostPath" in source and claim and not host_path:
        return {"persistentVolumeClaim": {"claimName": claim}}
    return source


def _ready_nodes(status: Mapping[str, Any]) -> frozenset[str] | None:
    nodes = status.get("nodes")
    if not isinstance(nodes, list):
        return None
    return frozenset(str(n.get("name")) for n in nodes if isinstance(n, dict) and n.get("phase") == "Ready")


def _from_spec(
    owner: VolumeManagerRef, raw: Mapping[str, Any], registry: SourceRegistry
) -> tuple[Mapping[str, Any] | None, str | None]:
    """(what a workload mounts, or why the volume can never be provisioned, in the controller's
    words) for a volume the controller has not reported yet, from its spec alone: claim names
    are deterministic."""
    checked = registry.check(raw)
    if isinstance(checked, str):
        return None, checked
    config, source = checked
    claim = source.claim_name(owner, config)
    return ({"persistentVolumeClaim": {"claimName": claim}} if claim else None), None


def catalog_entries(
    volumemanager: Mapping[str, Any], *, host_path: bool = False, registry: SourceRegistry | None = None
) -> list[CatalogEntry]:
    """The volumes of a VolumeManager object, with what its status says about each.

    Node-local data (its status gives both the node path and a claim) is wired through its
    claim, which Pod Security ``restricted`` admits; ``host_path`` wires the node path as a
    hostPath instead, an admin's opt-in for single-tenant clusters. A status written before
    node-local volumes had claims gives the node path alone, which is wired as it is until
    the controller's next pass reports the claim. With a ``registry`` of source types, a
    volume the controller has not reported yet is wired to its claim, named from its spec
    (the pod waits at the scheduling gate), or refused at once when its settings are wrong.
    """
    metadata = volumemanager.get("metadata") or {}
    name = str(metadata.get("name"))
    owner = VolumeManagerRef(str(metadata.get("namespace")), name, str(metadata.get("uid") or ""))
    deleting = bool(metadata.get("deletionTimestamp"))
    statuses = {v.get("id"): v for v in (volumemanager.get("status") or {}).get("volumes") or []}
    entries = []
    for config in (volumemanager.get("spec") or {}).get("volumeConfigs") or []:
        status = statuses.get(config.get("id")) or {}
        phase = str(status.get("phase") or "Pending")
        message = str(status.get("message") or "not provisioned yet")
        volume_source = _workload_source(status, host_path)
        if volume_source is None and registry is not None and not host_path:
            volume_source, problem = _from_spec(owner, config, registry)
            if problem is not None:
                phase, message = "Failed", problem
        entries.append(
            CatalogEntry(
                manager=name,
                volume_id=str(config.get("id")),
                phase=phase,
                message=message,
                volume_source=volume_source,
                node_affinity=status.get("nodeAffinity"),
                access_mode=str(config.get("accessMode") or "ReadWriteOnce"),
                deleting=deleting,
                ready_nodes=_ready_nodes(status),
            )
        )
    return entries


class Catalog:
    """The volumes of one namespace, found by id without scanning them all."""

    def __init__(self, entries: Iterable[CatalogEntry]) -> None:
        self.entries = tuple(entries)
        # What resolve() found here, by refs: a Catalog never changes (the index builds a
        # new one when a VolumeManager changes), so neither do its answers.
        self._resolved: dict[tuple[grammar.VolumeRef, ...], tuple[ResolvedVolume, ...]] = {}
        self._by_id: dict[str, list[CatalogEntry]] = {}
        for entry in self.entries:
            self._by_id.setdefault(entry.volume_id, []).append(entry)

    def matching(self, ref: grammar.VolumeRef) -> list[CatalogEntry]:
        candidates = self._by_id.get(ref.volume_id, [])
        return [e for e in candidates if ref.manager is None or e.manager == ref.manager]

    def describe(self) -> str:
        return ", ".join(sorted({f"{e.manager}/{e.volume_id}" for e in self.entries})) or "none"


def resolve(
    request: grammar.VolumeRequest, namespace: str, catalog: Catalog | Iterable[CatalogEntry]
) -> list[ResolvedVolume]:
    """The requested volumes, or a MutationError saying which ref fails and why."""
    available = catalog if isinstance(catalog, Catalog) else Catalog(catalog)
    known = available._resolved.get(request.refs)
    if known is None:
        known = tuple(_resolve(request, namespace, available))
        if len(available._resolved) >= _RESOLVED_KEPT:
            available._resolved.clear()
        available._resolved[request.refs] = known
    return list(known)


_RESOLVED_KEPT = 1024


def _resolve(request: grammar.VolumeRequest, namespace: str, available: Catalog) -> list[ResolvedVolume]:
    resolved = []
    for ref in request.refs:
        matches = available.matching(ref)
        if not matches:
            raise MutationError(
                f"volume {ref} not found in namespace {namespace}; volumes there: {available.describe()}",
                Denial.UNKNOWN,
            )
        if len(matches) > 1:
            options = " or ".join(f"{m.manager}/{m.volume_id}" for m in sorted(matches, key=lambda m: m.manager))
            raise MutationError(
                f"volume {ref} is in several VolumeManagers of {namespace}: write {options}", Denial.AMBIGUOUS
            )
        entry = matches[0]
        if entry.deleting:
            raise MutationError(f"volume {ref} belongs to VolumeManager {entry.manager}, which is being deleted")
        if entry.phase == "Failed":
            raise MutationError(f"volume {ref} is Failed: {entry.message}", Denial.FAILED)
        if not entry.volume_source:
            raise MutationError(
                f"volume {ref} of VolumeManager {entry.manager} has no volume source yet (the controller has not "
                "reported it): retry in a few seconds"
            )
        resolved.append(
            ResolvedVolume(
                ref=ref,
                manager=entry.manager,
                volume_id=entry.volume_id,
                phase=entry.phase,
                message=entry.message,
                volume_source=entry.volume_source,
                node_affinity=entry.node_affinity,
                access_mode=entry.access_mode,
                ready_nodes=entry.ready_nodes,
            )
        )
    return resolved
