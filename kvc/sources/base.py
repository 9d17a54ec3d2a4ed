"""The interface every source type implements, and what the controller hands it.

Controller side: ``validate`` (pure), ``provision`` (create or adopt what the volume
needs, report its status) and ``cleanup`` (remove what no volume needs any more).  A
new type is a subclass registered under the ``kvc.sources`` entry point group; the core
never changes for it.
"""

from __future__ import annotations

import abc
import difflib
import ipaddress
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlparse

from kvc import defaults
from kvc.agent.files import Limits, Manifest, ReplicaDir
from kvc.api import names
from kvc.api.models import VolumeConfig, VolumeStatus
from kvc.policy import AdminPolicy
from kvc.sources._egress import EgressPolicy
from kvc.sources.transfer import Progress


@dataclass(frozen=True)
class VolumeManagerRef:
    """The VolumeManager a volume belongs to."""

    namespace: str
    name: str
    uid: str

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": names.API_VERSION,
            "kind": names.VOLUMEMANAGER_KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def labels(self, volume_id: str | None = None) -> dict[str, str]:
        """Labels that mark an object as KVC's, for this VolumeManager (and volume)."""
        labels = {
            names.LABEL_MANAGED_BY: names.MANAGED_BY,
            names.LABEL_VOLUMEMANAGER: names.bounded_name(self.name),
            names.LABEL_VOLUMEMANAGER_NAMESPACE: self.namespace,
            names.LABEL_VOLUMEMANAGER_UID: self.uid,
        }
        if volume_id is not None:
            labels[names.LABEL_VOLUME_ID] = volume_id
        return labels

    def selector(self, volume_id: str | None = None) -> str:
        """A label selector for the objects KVC made for this VolumeManager (and volume)."""
        selected = {names.LABEL_VOLUMEMANAGER_UID: self.uid}
        if volume_id is not None:
            selected[names.LABEL_VOLUME_ID] = volume_id
        return ",".join(f"{key}={value}" for key, value in selected.items())


# What a replica of a volume without a capacity may hold, unless the admin says otherwise.


@dataclass(frozen=True)
class SourceContext:
    """Cluster access for a source type, scoped to one VolumeManager."""

    owner: VolumeManagerRef
    core: Any  # kubernetes.client.CoreV1Api
    custom: Any = None  # kubernetes.client.CustomObjectsApi
    # Node path under which every agent keeps its data (one for the whole cluster).
    node_data_root: str = defaults.NODE_DATA_ROOT
    # An agent silent for longer is gone: its replicas are placed elsewhere.
    agent_grace_seconds: float = defaults.AGENT_GRACE_SECONDS
    # Node paths under which users may place data with options.dataPath (admin setting).
    allowed_data_roots: tuple[str, ...] = ()
    # What else the admin lets tenants' volumes reach (tolerations, NFS exports) and the caps
    # on replicas per node and per namespace.
    policy: AdminPolicy = field(default_factory=AdminPolicy)
    # KVC's own namespace for the copies of the Secrets that replicas need: the only place
    # agents may read Secrets (kvc.sources._credentials).
    credentials_namespace: str = names.DEFAULT_CREDENTIALS_NAMESPACE
    # Each volume's phase in the status before this pass (id -> phase).
    previous_phases: Mapping[str, str] = field(default_factory=dict)
    # The bytes a node-local replica may take when its volume gives no capacity
    # (the controller's --default-capacity).
    default_capacity: str = defaults.NODE_CAPACITY
    # Volume id -> a node that should also hold a replica: gated workloads need it there
    # together with other volumes (kvc.controller.gates.Together).
    together_on: Mapping[str, str] = field(default_factory=dict)
    # Told (volume id, node, why) when a volume cannot go to its ``together_on`` node.
    cannot_meet: Callable[[str, str, str], None] = field(default=lambda volume_id, node, reason: None)


@dataclass(frozen=True)
class FetchRequest:
    """What an agent hands a node-local source type to bring one replica onto its node."""

    options: Mapping[str, str]
    credentials: Mapping[str, str]  # the credentials Secret's data; never logged
    replica: ReplicaDir
    progress: Progress
    stop: threading.Event
    # Its volume's capacity, the agent's free-disk floor and most objects (agent flags).
    limits: Limits = field(default_factory=Limits)
    # The networks no connection of the fetch may reach (the agent's --blocked-network).
    egress: EgressPolicy = field(default_factory=EgressPolicy)


class Source(abc.ABC):
    """A source type: validates its options, provisions volumes and cleans up after them."""

    source_type: ClassVar[str]
    access_modes: ClassVar[frozenset[str]]
    # Every option the type reads, in the order messages list them: any other key is a
    # mistake (a misspelt endpointURL would silently fetch from AWS) and is refused.
    known_options: ClassVar[tuple[str, ...]]
    # Node-local types copy data onto nodes (replicas); the others mount shared storage.
    node_local: ClassVar[bool] = False

    def validate(self, config: VolumeConfig) -> list[str]:
        """Problems with the volume's settings, each naming the field and the fix; [] if none."""
        problems = []
        if config.access_mode not in self.access_modes:
            allowed = " or ".join(sorted(self.access_modes))
            problems.append(
                f"accessMode {config.access_mode} is not supported by {self.source_type} volumes: use {allowed}"
            )
        return problems + self.validate_options(config) + self._unknown_options(config)

    def _unknown_options(self, config: VolumeConfig) -> list[str]:
        problems = []
        for option in config.options:
            if option in self.known_options:
                continue
            same_but_case = [known for known in self.known_options if known.lower() == option.lower()]
            close = same_but_case or difflib.get_close_matches(option, self.known_options, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            known = ", ".join(self.known_options)
            problems.append(f"unknown option options.{option}{hint}: {self.source_type} volumes read {known}")
        return problems

    @abc.abstractmethod
    def validate_options(self, config: VolumeConfig) -> list[str]:
        """Problems with ``config.options`` (and other type-specific fields)."""

    @abc.abstractmethod
    def provision(self, ctx: SourceContext, config: VolumeConfig) -> VolumeStatus:
        """Create or adopt what the volume needs (idempotent) and report its status."""

    def cleanup(
        self, ctx: SourceContext, current: Mapping[str, VolumeConfig | None], deleting: bool = False
    ) -> list[str]:
        """Remove what this type made for volumes that are gone or whose source changed.

        ``current`` maps the ids of the spec's volumes to their config, or to None when the
        config is invalid (its existing resources are then kept as they are); ``deleting``
        means the whole VolumeManager is going. Returns what could not be removed yet, as
        messages; [] when everything is clean.
        """
        return []

    def claim_name(self, owner: VolumeManagerRef, config: VolumeConfig) -> str | None:
        """The claim workloads mount for this (valid) volume, known from its spec alone: the
        webhook wires it before the controller has reported anything. None: the type has none."""
        return None

    def fetch(self, request: FetchRequest) -> Manifest:
        """Agent side of node-local types: fetch, verify and publish one replica."""
        raise NotImplementedError(f"{self.source_type} volumes are not fetched onto nodes")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_problem(option: str, url: str) -> str | None:
    """Why ``url`` is not acceptable for ``option``: not http(s), or plaintext off this machine."""
    parsed = urlparse(url)
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        return f"options.{option} must be an https:// URL, not {url!r}"
    if parsed.scheme == "http" and not _loopback(parsed.hostname):
        return (
            f"options.{option} uses plaintext http: credentials and data would cross the network unencrypted; use https"
        )
    return None


def object_name_problem(option: str, value: str, kind: str) -> str | None:
    """Why ``value`` cannot name a namespaced object of this namespace (a Secret, a claim)."""
    if len(value) > 253 or not all(names.is_dns_label(part) for part in value.split(".")):
        return f"options.{option} {value!r} is not a valid {kind} name"
    return None


def required_options(config: VolumeConfig, fields: Mapping[str, str]) -> list[str]:
    """One problem per missing option; ``fields`` maps each option to what it holds."""
    return [
        f"options.{field} is required for {config.source_type} volumes: {meaning}"
        for field, meaning in fields.items()
        if not config.options.get(field, "").strip()
    ]
