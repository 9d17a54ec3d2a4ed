"""The cluster admin's limits on what tenants' VolumeManagers may ask of the cluster (pure).

Tenants write VolumeManagers; the controller acts on them with its own, cluster-wide
rights: it places replicas on nodes, writes VolumeNodes and creates PersistentVolumes.
So what a VolumeManager may reach is the admin's decision, given as flags of
``kvc run controller`` and carried to the source types in ``SourceContext.policy``:

- which taints replicas may tolerate (``--allowed-toleration``): none by default, so
  control-plane nodes and tainted pools hold no tenant's data unless the admin opened them;
- which NFS exports PVs may name (``--allowed-nfs-server``): none by default, since the
  kubelet mounts them with the node's identity, which NFS servers trust;
- how many replicas one VolumeNode holds (``--max-replicas-per-node``) and one namespace
  has on nodes (``--max-replicas-per-namespace``), so that no VolumeNode nears etcd's
  object size limit, whatever tenants create.

Every check returns why a volume is refused, naming the flag the admin would change, or None.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

TOLERATION_FLAG = "--allowed-toleration"
NFS_FLAG = "--allowed-nfs-server"
NODE_CAP_FLAG = "--max-replicas-per-node"
NAMESPACE_CAP_FLAG = "--max-replicas-per-namespace"

# The options an assignment carries to the agents (with the node path and the part of the
# data each node takes) at most, as stored: see copied_options_problem.
MAX_COPIED_OPTIONS_BYTES = 8192
# One assignment in a VolumeNode's spec at most, as stored: the copied options above, plus
# names bounded by the API (namespace 63, VolumeManager 253, id 63 characters), the
# credentials reference and the capacity (tests/kvc/test_policy.py measures the worst case).
MAX_ENTRY_BYTES = 12 * 1024
# etcd refuses requests over 1.5 MiB: a VolumeNode's spec at the default cap takes at most
# 64 x 12 KiB = 768 KiB, half of it, leaving the other half to the agent's status.
ETCD_REQUEST_BYTES = 1536 * 1024
DEFAULT_MAX_REPLICAS_PER_NODE = 64
# Four full VolumeNodes' worth: one namespace cannot fill every node of any cluster of
# more than four nodes (admins of larger tenants raise it).
DEFAULT_MAX_REPLICAS_PER_NAMESPACE = 256

_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


@dataclass(frozen=True)
class TolerationRule:
    """One ``--allowed-toleration KEY[=VALUE][:EFFECT]``: the tolerations it lets volumes carry.

    ``KEY`` alone allows any toleration of that taint key (any operator, value and effect);
    ``=VALUE`` only ``operator: Equal`` with that value; ``:EFFECT`` only tolerations of that
    effect. ``*`` as the key allows any key, the empty key of "tolerate every taint" included.
    """

    key: str
    value: str | None = None  # None: any value, and operator Exists
    effect: str | None = None  # None: any effect, the empty (every) effect included

    @classmethod
    def parse(cls, text: str) -> TolerationRule:
        head, colon, effect = text.partition(":")
        key, equals, value = head.partition("=")
        if not key or any(c.isspace() for c in text):
            raise ValueError(f"{text!r}: expected KEY[=VALUE][:EFFECT], KEY a taint key or *")
        if key == "*" and equals:
            raise ValueError(f"{text!r}: * (any key) takes no value")
        if colon and effect not in _EFFECTS:
            raise ValueError(f"{text!r}: the effect must be one of {', '.join(_EFFECTS)}")
        return cls(key, value if equals else None, effect if colon else None)

    def __str__(self) -> str:
        value = "" if self.value is None else f"={self.value}"
        effect = "" if self.effect is None else f":{self.effect}"
        return f"{self.key}{value}{effect}"

    def covers(self, toleration: Mapping[str, Any]) -> bool:
        key = str(toleration.get("key") or "")
        exists = (toleration.get("operator") or "Equal") == "Exists"
        if self.key not in ("*", key):
            return False  # an empty key (every taint) only under *
        if self.value is not None and (exists or str(toleration.get("value") or "") != self.value):
            return False
        return self.effect is None or (toleration.get("effect") or "") == self.effect


def describe_toleration(toleration: Mapping[str, Any]) -> str:
    """A toleration in the flag's syntax, as an admin would allow it."""
    key = str(toleration.get("key") or "")
    if not key and (toleration.get("operator") or "Equal") == "Exists":
        key = "*"
    value = "" if toleration.get("operator") == "Exists" else f"={toleration.get('value') or ''}"
    effect = f":{toleration['effect']}" if toleration.get("effect") else ""
    return f"{key}{value}{effect}"


@dataclass(frozen=True)
class NfsExport:
    """One ``--allowed-nfs-server SERVER[:/PATH-PREFIX]``: the exports PVs may name.

    ``*`` as the server allows any server. A prefix matches whole path components:
    ``/exports`` allows ``/exports`` and ``/exports/a``, not ``/exports2``.
    """

    server: str  # lower case, or *
    prefix: str | None = None  # None: any path

    @classmethod
    def parse(cls, text: str) -> NfsExport:
        server, separator, rest = text.partition(":/")
        if not server or any(c.isspace() or c == "/" for c in server):
            raise ValueError(f"{text!r}: expected SERVER[:/PATH-PREFIX], SERVER a host name, an IP address or *")
        if not separator:
            return cls(server.lower())
        written = f"/{rest}"
        prefix = PurePosixPath(written)
        if ".." in prefix.parts or written.startswith("//") or str(prefix) != (written.rstrip("/") or "/"):
            raise ValueError(f"{text!r}: the path prefix must be a normalised absolute path")
        return cls(server.lower(), str(prefix))

    def __str__(self) -> str:
        return self.server if self.prefix is None else f"{self.server}:{self.prefix}"

    def covers(self, server: str, path: str) -> bool:
        if self.server not in ("*", server.lower()):
            return False
        if self.prefix is None:
            return True
        exported = PurePosixPath(path)
        if ".." in exported.parts:
            return False
        prefix = PurePosixPath(self.prefix)
        return exported == prefix or prefix in exported.parents


def nfs_path_problem(path: str) -> str | None:
    """Why an NFS path is refused whatever the admin allows: ``..`` would leave any prefix."""
    if ".." in PurePosixPath(path).parts:
        return f"options.path must not contain '..': {path!r}"
    return None


def _listed(rules: Iterable[object]) -> str:
    return ", ".join(map(str, rules)) or "none"


@dataclass(frozen=True)
class AdminPolicy:
    """The admin's limits, from the controller's flags; the defaults are the flags' defaults."""

    tolerations: tuple[TolerationRule, ...] = ()
    nfs_exports: tuple[NfsExport, ...] = ()
    max_replicas_per_node: int = DEFAULT_MAX_REPLICAS_PER_NODE
    max_replicas_per_namespace: int = DEFAULT_MAX_REPLICAS_PER_NAMESPACE

    def toleration_problem(self, tolerations: Sequence[Mapping[str, Any]]) -> str | None:
        """Why a volume's tolerations are refused: one that no allowed rule covers.

        PreferNoSchedule tolerations change nothing for placement (those taints never keep
        a replica off a node) and are always accepted.
        """
        for index, toleration in enumerate(tolerations):
            if toleration.get("effect") == "PreferNoSchedule" or any(r.covers(toleration) for r in self.tolerations):
                continue
            described = describe_toleration(toleration)
            what = (
                f"tolerates every taint ({described}: operator Exists without a key)"
                if described.startswith("*")
                else f"{described} is not allowed"
            )
            return (
                f"tolerations[{index}] {what}: the cluster admin lets replicas onto tainted nodes only "
                f"with the controller flag {TOLERATION_FLAG} (allowed now: {_listed(self.tolerations)})"
            )
        return None

    def nfs_problem(self, server: str, path: str) -> str | None:
        """Why a PV may not name this NFS export."""
        if any(rule.covers(server, path) for rule in self.nfs_exports):
            return None
        return (
            f"NFS export {server}:{path} is not allowed: the cluster admin allows NFS servers and paths "
            f"with the controller flag {NFS_FLAG} (allowed now: {_listed(self.nfs_exports)})"
        )

    def namespace_cap_problem(self, namespace: str, held: int, wanted: int) -> str | None:
        """Why ``wanted`` replicas of a volume may not be on nodes when the namespace's other
        volumes have ``held`` there."""
        cap = self.max_replicas_per_namespace
        if held + wanted <= cap:
            return None
        return (
            f"namespace {namespace} has {held} replicas of other volumes on nodes: {wanted} more would exceed "
            f"the cluster admin's cap of {cap} (controller flag {NAMESPACE_CAP_FLAG}); lower replicas or "
            "delete volumes no longer needed"
        )


def stored_bytes(value: Any) -> int:
    """An upper bound of the bytes ``value`` takes as JSON in etcd, whatever its characters:
    non-ASCII characters escaped (\\uXXXX, more than their UTF-8), and the API server's
    HTML escapes of <, > and &."""
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"))
    return len(text) + 5 * sum(text.count(c) for c in "<>&")


def copied_options_problem(options: Mapping[str, str], extra: Sequence[Any] = ()) -> str | None:
    """Why a node-local volume's settings are too long to go into every VolumeNode that
    holds it: ``options`` as copied to the agents, ``extra`` the other settings that go
    along (the node path a dataPath chooses, the globs of a distributionStrategy)."""
    size = stored_bytes(dict(options)) + sum(stored_bytes(value) for value in extra)
    if size <= MAX_COPIED_OPTIONS_BYTES:
        return None
    listed = ", ".join(f"options.{key}" for key in sorted(options))
    return (
        f"the settings copied to every node holding the data ({listed}) take {size} bytes: "
        f"at most {MAX_COPIED_OPTIONS_BYTES} are allowed; shorten them"
    )
