"""The fault suite's plan: a workload and a schedule of faults, all drawn from one seed.

``make_plan(seed, nodes)`` is pure: the same seed and nodes always give the same
VolumeManagers, data, pods and faults at the same offsets, so a failing run can be
replayed with ``KVC_FAULT_SEED=<seed>``.  (Only the plan is deterministic: the processes
it disturbs run on their own clocks, so a replay hits the same moments, not the same
instructions.)
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

# Fault kinds, in the order the suite documents them.
KILL_CONTROLLER = "kill-controller"
KILL_WEBHOOK = "kill-webhook"
KILL_AGENT = "kill-agent"
RESTART_S3 = "restart-s3"
RESTART_APISERVER = "restart-apiserver"
REMOVE_NODE = "remove-node"
KINDS = (KILL_CONTROLLER, KILL_WEBHOOK, KILL_AGENT, RESTART_S3, RESTART_APISERVER, REMOVE_NODE)

S3, NFS, HTTP = "S3", "NFS", "HTTP"


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the workload starts
    kind: str
    target: str = ""  # the node, for agent kills and node removal
    down: float = 0.0  # seconds before the killed component is started again

    def describe(self) -> str:
        target = f" {self.target}" if self.target else ""
        down = f", back after {self.down:.1f}s" if self.down else ""
        return f"t={self.at:5.1f}s {self.kind}{target}{down}"


@dataclass(frozen=True)
class VolumePlan:
    """One VolumeManager with one volume whose id is the VolumeManager's name."""

    name: str
    kind: str  # S3 | NFS | HTTP
    replicas: int
    created_at: float
    deleted_at: float | None = None  # a user deletes it mid-run
    files: tuple[tuple[str, int], ...] = ()  # (relative path, size) of the source data

    @property
    def node_local(self) -> bool:
        return self.kind in (S3, HTTP)


@dataclass(frozen=True)
class PodPlan:
    name: str
    at: float
    volumes: tuple[str, ...]  # VolumeManager names; the volume id is the same
    qualified: bool = False  # refer to the volumes as <volumemanager>/<id>

    @property
    def annotation(self) -> str:
        return ",".join(f"{v}/{v}" if self.qualified else v for v in self.volumes)


@dataclass(frozen=True)
class Plan:
    seed: int
    duration: float
    volumes: tuple[VolumePlan, ...]
    pods: tuple[PodPlan, ...]
    faults: tuple[Fault, ...]
    removed_nodes: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        kinds = {kind: sum(1 for v in self.volumes if v.kind == kind) for kind in (S3, NFS, HTTP)}
        deleted = [v.name for v in self.volumes if v.deleted_at is not None]
        lines = [
            f"seed {self.seed}: {len(self.volumes)} VolumeManagers ({kinds[S3]} S3, {kinds[NFS]} NFS, "
            f"{kinds[HTTP]} HTTP; deleted mid-run: {', '.join(deleted) or 'none'}), {len(self.pods)} pods "
            f"over {self.duration:.0f}s; faults:",
            *(f"  {fault.describe()}" for fault in self.faults),
        ]
        return "\n".join(lines)


def file_bytes(seed: int, volume: str, path: str, size: int) -> bytes:
    """The content of one source file: a function of the seed, so re-seeding gives the same bytes."""
    digest = hashlib.sha256(f"{seed}/{volume}/{path}".encode()).digest()
    return random.Random(digest).randbytes(size)


def _files(rng: random.Random, kind: str) -> tuple[tuple[str, int], ...]:
    if kind == S3:
        count = rng.randint(8, 30)
        small = [(f"part-{i // 10}/item-{i:03d}.bin", rng.randint(1, 48 * 1024)) for i in range(count)]
        # One larger object, so that some faults land while a transfer is in flight.
        return (*small, ("weights.bin", rng.randint(512 * 1024, 3 * 1024 * 1024)))
    if kind == HTTP:
        return tuple((f"model-{i}.bin", rng.randint(64 * 1024, 2 * 1024 * 1024)) for i in range(rng.randint(1, 2)))
    return ()


def make_plan(
    seed: int,
    nodes: Sequence[str],
    *,
    duration: float = 90.0,
    volumes: int = 20,
    pods: int = 100,
    nfs: int = 3,
    http: int = 3,
    deleted: int = 3,
) -> Plan:
    """The workload and faults of one run (pure)."""
    rng = random.Random(seed)
    kinds = [NFS] * nfs + [HTTP] * http + [S3] * (volumes - nfs - http)
    rng.shuffle(kinds)
    # VolumeManagers arrive over the first 40% of the run, so faults also hit fresh ones.
    created = sorted(rng.uniform(0, duration * 0.4) for _ in kinds)
    doomed = set(rng.sample(range(volumes), deleted))
    plans = []
    for index, (kind, at) in enumerate(zip(kinds, created, strict=True)):
        name = f"{kind.lower()}-{index:02d}"
        deleted_at = rng.uniform(max(at + 10, duration * 0.4), duration * 0.9) if index in doomed else None
        replicas = rng.choice((1, 2, 2)) if kind in (S3, HTTP) else 1
        plans.append(VolumePlan(name, kind, replicas, at, deleted_at, _files(rng, kind)))

    pod_plans = []
    for i in range(pods):
        at = rng.uniform(created[0] + 1, duration)
        existing = [v for v in plans if v.created_at <= at]
        count = 2 if rng.random() < 0.15 and len(existing) > 1 else 1
        chosen = tuple(v.name for v in rng.sample(existing, count))
        pod_plans.append(PodPlan(f"pod-{i:03d}", at, chosen, qualified=rng.random() < 0.3))
    pod_plans.sort(key=lambda p: p.at)

    removed = rng.choice(list(nodes))
    survivors = [n for n in nodes if n != removed]
    removal_at = rng.uniform(duration * 0.3, duration * 0.7)

    def spaced(kind: str, count: int, down: tuple[float, float], target: str = "") -> list[Fault]:
        """``count`` faults of one component whose outages do not overlap (it is down or up)."""
        while True:
            drawn = sorted((rng.uniform(5, duration - 5), rng.uniform(*down)) for _ in range(count))
            if all(at + gone + 2 < later for (at, gone), (later, _) in itertools.pairwise(drawn)):
                return [Fault(at, kind, target, gone) for at, gone in drawn]

    # Some agents stay away longer than the controller's grace: their replicas move.
    agent_kills = [rng.choice(survivors) for _ in range(3)]
    faults = [
        *spaced(KILL_CONTROLLER, 2, (1, 8)),
        *spaced(KILL_WEBHOOK, 2, (1, 8)),
        *(f for node in sorted(set(agent_kills)) for f in spaced(KILL_AGENT, agent_kills.count(node), (1, 16), node)),
        *spaced(RESTART_S3, 2, (0.5, 4)),
        *spaced(RESTART_APISERVER, 1, (0.5, 4)),
        Fault(removal_at, REMOVE_NODE, removed),
    ]
    faults.sort(key=lambda f: f.at)
    return Plan(seed, duration, tuple(plans), tuple(pod_plans), tuple(faults), (removed,))
