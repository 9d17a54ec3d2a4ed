"""Controller benchmark: 1,000 NFS VolumeManagers at once, placement on 5,000 nodes, memory.

The real local control plane and `kvc run controller` as a local process, as in the e2e
tests. Every comparison is measured in the same run:

- **VolumeManagers**: 1,000 NFS VolumeManagers (one volume each) created at once by a
  pool of API clients, timed from the first create until the watch has seen every one
  `Running`. Baselines: the same 1,000 PV+PVC pairs created directly by the benchmark
  until every claim is Bound (the floor: what the API server and kube-controller-manager
  allow, with no controller in between), and the 1,000 VolumeManager objects alone. Then
  where the time went, step by step from the objects' own timestamps (created, finalizer,
  claim made, claim Bound, Running), with kube-controller-manager's binding on its own;
  and the API server's requests in the burst by verb and resource.
- **Placement**: kwok nodes, each with a VolumeNode reporting a fresh heartbeat and free
  disk as its agent would (the controller runs with a long ``--agent-grace`` so that the
  heartbeats stay fresh without 5,000 agents). The time of ``ClusterView.load`` +
  ``kvc.placement.place`` for an S3 volume, measured in this process with the controller's
  own code and informers against the real API server; and, end to end in the controller,
  from creating an S3 VolumeManager to its replicas being assigned. On 50 nodes (the
  baseline) and on 5,000.
- **Memory**: the controller's resident set (VmRSS, and its peak VmHWM) right after start,
  with the 1,000 VolumeManagers Running, and with the 5,000 nodes as well.

Targets are printed as met or NOT met; the benchmark never fails because of them.

    python -m e2e.bench_controller [--managers 1000] [--nodes 5000] [--baseline-nodes 50] [--runs 7]
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from kubernetes import client
from kubernetes.client.rest import ApiException

from e2e.cluster import KWOK_NODE_ANNOTATION, ControlPlane, NodeSpec
from e2e.kvc import KvcController, apply_crds
from kvc import kube
from kvc.api import names
from kvc.api.models import VolumeConfig
from kvc.controller import caches
from kvc.sources import nfs
from kvc.sources._nodelocal import ClusterView, load_view, place_replica, replica_key
from kvc.sources.base import SourceContext, VolumeManagerRef

NAMESPACE = "bench"
FLOOR_NAMESPACE = "bench-floor"
GROUP, VERSION, PLURAL = names.GROUP, names.VERSION, names.VOLUMEMANAGER_PLURAL
CLIENT_THREADS = 16
# Heartbeats written once stay fresh this long: the nodes need no agents.
AGENT_GRACE_SECONDS = 3600
# The benchmark's nodes report Ready once; kube-controller-manager waits this long for the
# next heartbeat before it marks them Unknown: longer than the benchmark.
NODE_LEASE_SECONDS = 3600
TARGET_RUNNING_SECONDS = 60.0
TARGET_PLACEMENT_MS = 50.0
TARGET_RSS_MB = 250.0
# How long the controller's CPU is watched while every VolumeManager is Running, unchanged.
IDLE_SECONDS = 20.0


# --------------------------------------------------------------------------- helpers


class Clients(threading.local):
    """One API client per thread: the benchmark's requests do not queue for a connection."""

    def __init__(self, plane: ControlPlane) -> None:
        api = plane.api_client()
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM in MB, and CPU seconds used so far, of a process."""
    found: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    found["cpu"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


def open_sockets(pid: int) -> int:
    """How many sockets a process has open (its connections, listeners included)."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            continue  # closed meanwhile
    return count


@contextmanager
def peak_sockets(pid: int, seen: dict[str, int]) -> Iterator[None]:
    """The most sockets ``pid`` had open at once while the block ran, in ``seen["peak"]``."""
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            seen["peak"] = max(seen.get("peak", 0), open_sockets(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        done.set()
        sampler.join()


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    print(f"  ! timed out after {timeout:.0f}s waiting for {what}", file=sys.stderr)
    return False


@contextmanager
def watching(name: str, lister: Callable[..., Any], see: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """Call ``see`` with every object a list+watch reports, while the block runs."""

    def transform(raw: dict[str, Any]) -> None:
        see(raw)

    informer: kube.Informer[None] = kube.Informer(name, lister, transform)
    informer.start()
    if not informer.wait_synced(30):
        raise RuntimeError(f"could not watch {name}: {informer.error}")
    try:
        yield
    finally:
        informer.stop()


def nfs_volume(index: int) -> dict[str, Any]:
    """The NFS volume of the e2e tests (deploy/samples' shape), one export per VolumeManager."""
    return {
        "id": "data",
        "sourceType": "NFS",
        "accessMode": "ReadWriteMany",
        "capacity": "2Gi",
        "labels": {"team": "vision", "kind": "dataset"},
        "options": {"server": "nfs.example.com", "path": f"/exports/set-{index:04d}", "mountOptions": "nfsvers=4.1"},
    }


def volumemanager(name: str, volumes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VolumeManager",
        "metadata": {"name": name},
        "spec": {"volumeConfigs": volumes},
    }


@dataclass
class Timing:
    """Per-object latencies (from its create to done) and the whole batch's wall time."""

    total: float
    latencies: list[float] = field(default_factory=list)
    done: int = 0
    wanted: int = 0
    extra: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- control plane


def prepare(plane: ControlPlane) -> None:
    apply_crds(plane)
    core = plane.core_v1()
    for namespace in (NAMESPACE, FLOOR_NAMESPACE):
        core.create_namespace({"metadata": {"name": namespace}})


# --------------------------------------------------------------------------- 1: the floor


def floor_pairs(plane: ControlPlane, clients: Clients, count: int, timeout: float) -> Timing:
    """``count`` PV+PVC pairs as the controller makes them, created directly, until all are Bound."""
    started: dict[str, float] = {}
    bound: dict[str, float] = {}

    def see(raw: dict[str, Any]) -> None:
        name = raw["metadata"]["name"]
        if (raw.get("status") or {}).get("phase") == "Bound" and name not in bound:
            bound[name] = time.perf_counter()

    owners = [VolumeManagerRef(FLOOR_NAMESPACE, f"vm-{i:04d}", str(uuid.uuid4())) for i in range(count)]
    config = VolumeConfig.model_validate(nfs_volume(0))

    def create(owner: VolumeManagerRef) -> None:
        claim = nfs.build_claim(owner, config)
        # No VolumeManager owns these: the garbage collector would delete an orphan claim.
        claim["metadata"].pop("ownerReferences")
        name = claim["metadata"]["name"]
        started[name] = time.perf_counter()
        # In the controller's order: the claim, its PV bound to the claim's uid, the annotation.
        made = clients.core.create_namespaced_persistent_volume_claim(FLOOR_NAMESPACE, claim)
        clients.core.create_persistent_volume(nfs.build_persistent_volume(owner, config, claim_uid=made.metadata.uid))
        clients.core.patch_namespaced_persistent_volume_claim(name, FLOOR_NAMESPACE, nfs.volume_created())

    lister = functools.partial(clients.core.list_namespaced_persistent_volume_claim, FLOOR_NAMESPACE)
    with watching("floor-claims", lister, see), ThreadPoolExecutor(CLIENT_THREADS) as pool:
        first = time.perf_counter()
        list(pool.map(create, owners))
        created = time.perf_counter() - first
        wait_until(lambda: len(bound) >= count, timeout, f"{count} claims Bound")
    done = [bound[name] - started[name] for name in bound if name in started]
    total = (max(bound.values()) - first) if bound else float("nan")
    timing = Timing(total, done, len(bound), count, {"created": created})

    # Out of the way before the controller's turn: no binding work left for kube-controller-manager.
    selector = f"{names.LABEL_MANAGED_BY}={names.MANAGED_BY},{names.LABEL_VOLUMEMANAGER_NAMESPACE}={FLOOR_NAMESPACE}"
    clients.core.delete_collection_namespaced_persistent_volume_claim(FLOOR_NAMESPACE)
    clients.core.delete_collection_persistent_volume(label_selector=selector)
    wait_until(
        lambda: not clients.core.list_persistent_volume(label_selector=selector, limit=1).items,
        120,
        "the floor's PVs to be deleted",
        interval=1,
    )
    return timing


def floor_objects(clients: Clients, count: int) -> Timing:
    """``count`` VolumeManager objects created (no controller running), then deleted."""
    latencies: list[float] = []

    def create(i: int) -> None:
        began = time.perf_counter()
        clients.custom.create_namespaced_custom_object(
            GROUP, VERSION, FLOOR_NAMESPACE, PLURAL, volumemanager(f"vm-{i:04d}", [nfs_volume(i)])
        )
        latencies.append(time.perf_counter() - began)

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        first = time.perf_counter()
        list(pool.map(create, range(count)))
        total = time.perf_counter() - first
    clients.custom.delete_collection_namespaced_custom_object(GROUP, VERSION, FLOOR_NAMESPACE, PLURAL)
    wait_until(
        lambda: (
            not clients.custom.list_namespaced_custom_object(GROUP, VERSION, FLOOR_NAMESPACE, PLURAL, limit=1)["items"]
        ),
        60,
        "the VolumeManager objects to be deleted",
        interval=0.5,
    )
    return Timing(total, latencies, count, count)


# --------------------------------------------------------------------------- 2: the controller


def volumemanagers_running(clients: Clients, count: int, timeout: float) -> Timing:
    """``count`` NFS VolumeManagers created at once, until the watch sees every one Running."""
    started: dict[str, float] = {}
    running: dict[str, float] = {}

    def see(raw: dict[str, Any]) -> None:
        metadata, status = raw["metadata"], raw.get("status") or {}
        current = status.get("observedGeneration") == metadata.get("generation")
        if current and status.get("state") == "Running" and metadata["name"] not in running:
            running[metadata["name"]] = time.perf_counter()

    def create(i: int) -> None:
        name = f"vm-{i:04d}"
        started[name] = time.perf_counter()
        clients.custom.create_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, volumemanager(name, [nfs_volume(i)])
        )

    lister = functools.partial(clients.custom.list_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL)
    with watching("volumemanagers", lister, see), ThreadPoolExecutor(CLIENT_THREADS) as pool:
        first, first_wall = time.perf_counter(), time.time()
        list(pool.map(create, range(count)))
        created = time.perf_counter() - first
        wait_until(lambda: len(running) >= count, timeout, f"{count} VolumeManagers Running", interval=0.2)
    latencies = [running[name] - started[name] for name in running if name in started]
    total = (max(running.values()) - first) if len(running) >= count else time.perf_counter() - first
    return Timing(total, latencies, len(running), count, {"created": created, "first_wall": first_wall})


def _timestamp(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _updated_at(raw: dict[str, Any], field: str, subresource: str | None = None) -> float | None:
    """When a write that set ``field`` (``f:...`` of managedFields) was last made, if any."""
    times = [
        _timestamp(entry["time"])
        for entry in raw["metadata"].get("managedFields") or []
        if entry.get("subresource") == subresource and f'"{field}"' in json.dumps(entry.get("fieldsV1") or {})
    ]
    return max(times) if times else None


STAGES = (
    "VolumeManager created",
    "its finalizer on (kopf)",
    "claim made (its PV and annotation next)",
    "claim Bound (kube-controller-manager)",
    "VolumeManager Running",
    "  annotated -> Bound, the binder alone",
)


def stages(managers: list[dict[str, Any]], claims: list[dict[str, Any]], start: float) -> dict[str, list[float]]:
    """Seconds from ``start`` at which each VolumeManager and claim passed each step, from
    the objects' own timestamps (whole seconds): where the time of the burst went.

    The last row is kube-controller-manager's share alone: from the write that tells it the
    claim's PV exists (the ``volume-created`` annotation) to the claim's Bound status.
    """
    steps: dict[str, list[float]] = {name: [] for name in STAGES}
    for raw in managers:
        steps["VolumeManager created"].append(_timestamp(raw["metadata"]["creationTimestamp"]) - start)
        if (finalized := _updated_at(raw, "f:finalizers")) is not None:
            steps["its finalizer on (kopf)"].append(finalized - start)
        ready = [c for c in (raw.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"]
        if ready and ready[0].get("status") == "True":
            steps["VolumeManager Running"].append(_timestamp(ready[0]["lastTransitionTime"]) - start)
    for raw in claims:
        steps["claim made (its PV and annotation next)"].append(
            _timestamp(raw["metadata"]["creationTimestamp"]) - start
        )
        annotated = _updated_at(raw, f"f:{names.ANNOTATION_VOLUME_CREATED}")
        if (raw.get("status") or {}).get("phase") != "Bound":
            continue
        bound = _updated_at(raw, "f:phase", "status")
        if bound is not None:
            steps["claim Bound (kube-controller-manager)"].append(bound - start)
            if annotated is not None:
                steps["  annotated -> Bound, the binder alone"].append(bound - annotated)
    return steps


def burst_stages(clients: Clients, start: float) -> dict[str, list[float]]:
    managers = clients.custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["items"]
    response = clients.core.list_namespaced_persistent_volume_claim(NAMESPACE, _preload_content=False)
    return stages(managers, json.loads(response.data)["items"], start)


# --------------------------------------------------------------------------- 3: nodes and placement


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def add_nodes(plane: ControlPlane, clients: Clients, first: int, count: int, timeout: float = 600) -> float:
    """Register nodes ``first``..``first+count-1`` with a reporting VolumeNode each; returns seconds.

    In bulk, from many clients: ``ControlPlane.add_nodes`` creates one by one and lists
    every node while it waits, which at thousands of nodes takes minutes.
    """
    ready: set[str] = set()
    wanted = {f"bench-node-{i:05d}" for i in range(first, first + count)}

    def see(raw: dict[str, Any]) -> None:
        name = raw["metadata"]["name"]
        conditions = (raw.get("status") or {}).get("conditions") or []
        is_ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        # The node lifecycle controller removes this taint only once the node is Ready.
        tainted = any(
            t.get("key", "").startswith("node.kubernetes.io/") for t in (raw.get("spec") or {}).get("taints") or []
        )
        if is_ready and not tainted:
            ready.add(name)

    def create(i: int) -> None:
        name = f"bench-node-{i:05d}"
        spec = NodeSpec(
            name,
            labels={"topology.kubernetes.io/zone": f"zone-{i % 3}", "kvc.bench/rack": f"rack-{i % 50}"},
            internal_ip=f"10.{100 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}",
        )
        # Not kwok's: at thousands of nodes kwok falls minutes behind (and its Leases and
        # heartbeats would load the API server for the whole run). The benchmark reports each
        # node Ready once, as a kubelet would; no pod runs on these nodes.
        node = spec.manifest()
        node["metadata"]["annotations"].pop(KWOK_NODE_ANNOTATION)
        clients.core.create_node(node)
        now = _now()
        ready = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "benchmark node",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }
        clients.core.patch_node_status(name, {"status": {"conditions": [ready]}})
        clients.custom.create_cluster_custom_object(
            GROUP,
            VERSION,
            names.VOLUMENODE_PLURAL,
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VolumeNode", "metadata": {"name": name}, "spec": {}},
        )
        # What the node's agent reports: a heartbeat, its disk, no replicas yet.
        status = {
            "heartbeatTime": _now(),
            "agentVersion": "bench",
            "dataRoot": "/var/lib/kvc",
            "disk": {"capacity": str(1 << 40), "free": str((1 << 40) - (i % 97) * (1 << 30))},
            "summary": {"replicas": 0, "ready": 0},
            "replicas": [],
        }
        clients.custom.patch_cluster_custom_object_status(
            GROUP, VERSION, names.VOLUMENODE_PLURAL, name, {"status": status}
        )

    began = time.perf_counter()
    with watching("bench-nodes", clients.core.list_node, see), ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(create, range(first, first + count)))
        wait_until(lambda: wanted <= ready, timeout, f"{count} nodes Ready", interval=0.5)
    return time.perf_counter() - began


def s3_volume(replicas: int) -> dict[str, Any]:
    return {
        "id": "images",
        "sourceType": "S3",
        "replicas": replicas,
        "capacity": "20Gi",
        "options": {"sourceURL": "s3://bench/images/", "awsCredentialsSecretName": "aws-creds"},
    }


def nodes_seen(ctx: SourceContext, count: int) -> bool:
    return len(ClusterView.load(ctx).nodes) >= count


def placement_in_process(ctx: SourceContext, replicas: int, runs: int) -> dict[str, float]:
    """Reading the cluster (``ClusterView.load``, via ``load_view``) and ``place``, as the
    controller's S3 provisioning calls them (ms, medians)."""
    config = VolumeConfig.model_validate(s3_volume(replicas))
    key = replica_key(ctx.owner, config.id, "0123456789")
    loads, places, totals = [], [], []
    cold = 0.0
    for run in range(runs + 1):
        # Every run builds its view again, as after any change in the cluster; the first
        # also computes every node's NodeInfo, as the controller's first pass does.
        ClusterView._last = None
        if run == 0:
            ClusterView._infos = {}
        began = time.perf_counter()
        view = load_view(ctx)
        loaded = time.perf_counter()
        _, placement, _ = place_replica(view, config, key)
        ended = time.perf_counter()
        assert len(placement.nodes) == min(replicas, len(view.nodes)), placement
        if run == 0:
            cold = (ended - began) * 1000
            continue
        loads.append((loaded - began) * 1000)
        places.append((ended - loaded) * 1000)
        totals.append((ended - began) * 1000)
    return {
        "load": statistics.median(loads),
        "place": statistics.median(places),
        "total": statistics.median(totals),
        "p90": percentile(totals, 0.9),
        "cold": cold,
    }


def placement_end_to_end(clients: Clients, replicas: int, expected: int, runs: int, tag: str) -> list[float]:
    """Seconds from creating an S3 VolumeManager to the controller reporting its replicas assigned."""
    durations = []
    for run in range(runs):
        name = f"place-{tag}-{replicas}-{run}"
        assigned = threading.Event()

        def see(raw: dict[str, Any], name: str = name, event: threading.Event = assigned) -> None:
            if raw["metadata"]["name"] != name:
                return
            volumes = (raw.get("status") or {}).get("volumes") or []
            if volumes and len(volumes[0].get("nodes") or []) >= expected:
                event.set()

        lister = functools.partial(clients.custom.list_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL)
        with watching(f"placement-{name}", lister, see):
            began = time.perf_counter()
            clients.custom.create_namespaced_custom_object(
                GROUP, VERSION, NAMESPACE, PLURAL, volumemanager(name, [s3_volume(replicas)])
            )
            if assigned.wait(120):
                durations.append(time.perf_counter() - began)
            else:
                print(f"  ! {name}: replicas not assigned within 120s", file=sys.stderr)
        clients.custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)

        def gone(name: str = name) -> bool:
            try:
                clients.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
            except ApiException as exc:
                return bool(exc.status == 404)
            return False

        wait_until(gone, 120, f"{name} to be deleted", interval=0.2)
    return durations


# --------------------------------------------------------------------------- report


def progress(what: str, timing: Timing) -> None:
    p50 = statistics.median(timing.latencies) if timing.latencies else float("nan")
    print(
        f"  {what}: {timing.done}/{timing.wanted} in {timing.total:.1f} s, p50 {p50:.2f} s {timing.extra}",
        file=sys.stderr,
    )


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def api_requests(plane: ControlPlane) -> dict[tuple[str, str, str], float]:
    """kube-apiserver's request counters so far, by (verb, resource, subresource), from its /metrics."""
    text = plane.kubectl("get", "--raw", "/metrics").stdout
    counts: dict[tuple[str, str, str], float] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels_text, _, value = line.rpartition(" ")
        labels = dict(part.split("=", 1) for part in labels_text[len("apiserver_request_total{") : -1].split(","))
        verb, resource, subresource = (labels.get(k, '""').strip('"') for k in ("verb", "resource", "subresource"))
        key = (verb, resource, subresource)
        counts[key] = counts.get(key, 0.0) + float(value)
    return counts


def request_delta(
    before: dict[tuple[str, str, str], float], after: dict[tuple[str, str, str], float]
) -> dict[tuple[str, str, str], float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) >= 1}


def metric_values(url: str, names_: Iterable[str]) -> dict[str, float]:
    values: dict[str, float] = {}
    try:
        text = requests.get(url, timeout=5).text
    except requests.RequestException:
        return values
    for line in text.splitlines():
        for name in names_:
            if line.startswith(name + " ") or line.startswith(name + "{"):
                values[line.rsplit(" ", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--managers", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--baseline-nodes", type=int, default=50)
    parser.add_argument("--runs", type=int, default=7, help="placement measurements per row (median)")
    parser.add_argument("--e2e-runs", type=int, default=3, help="end-to-end placements per row (median)")
    parser.add_argument("--timeout", type=float, default=600, help="give up waiting for Running after this")
    args = parser.parse_args(argv)

    import urllib3  # noqa: PLC0415

    urllib3.disable_warnings()
    with ControlPlane(node_lease_seconds=NODE_LEASE_SECONDS) as plane:
        prepare(plane)
        clients = Clients(plane)
        print(f"==> floor: {args.managers} PV+PVC pairs, created directly until Bound", file=sys.stderr)
        pairs = floor_pairs(plane, clients, args.managers, args.timeout)
        progress("floor pairs", pairs)
        print(f"==> floor: {args.managers} VolumeManager objects, no controller", file=sys.stderr)
        objects = floor_objects(clients, args.managers)
        progress("VolumeManager objects", objects)

        # Heartbeats written once stay fresh for the whole run: no agents needed.
        controller = KvcController(plane, agent_grace=AGENT_GRACE_SECONDS, timeout=120).start()
        assert controller.component is not None
        pid = controller.component.pid
        time.sleep(3)
        at_start = proc_status(pid)
        print(f"==> {args.managers} NFS VolumeManagers at once, until Running", file=sys.stderr)
        requests_before = api_requests(plane)
        sockets: dict[str, int] = {}
        with peak_sockets(pid, sockets):
            managers = volumemanagers_running(clients, args.managers, args.timeout)
        requests_during = request_delta(requests_before, api_requests(plane))
        progress("VolumeManagers Running", managers)
        timeline = burst_stages(clients, managers.extra["first_wall"])
        after_running = proc_status(pid)
        managers.extra["cpu"] = after_running["cpu"] - at_start["cpu"]
        reconciles = metric_values(
            controller.metrics_url, ["kvc_controller_reconciles_total", "kvc_controller_reconcile_seconds_sum"]
        )
        time.sleep(5)  # steady state: every VolumeManager Running, timers going
        steady = proc_status(pid)
        time.sleep(IDLE_SECONDS)  # what the controller costs while nothing changes
        steady["idle_cpu"] = (proc_status(pid)["cpu"] - steady["cpu"]) / IDLE_SECONDS
        steady["sockets"] = sockets.get("peak", 0)

        # The placement measurements in this process read the cluster as the controller does.
        bench_api = plane.api_client()
        caches.start(bench_api)
        ctx = SourceContext(
            owner=VolumeManagerRef(NAMESPACE, "placement", str(uuid.uuid4())),
            core=client.CoreV1Api(bench_api),
            custom=client.CustomObjectsApi(bench_api),
            agent_grace_seconds=AGENT_GRACE_SECONDS,
        )
        placements: dict[tuple[int, int], dict[str, float]] = {}
        end_to_end: dict[tuple[int, int], list[float]] = {}
        registered = 0
        node_seconds: dict[int, float] = {}
        for total_nodes in (args.baseline_nodes, args.nodes):
            print(f"==> {total_nodes} nodes with VolumeNodes; placement", file=sys.stderr)
            node_seconds[total_nodes] = add_nodes(plane, clients, registered, total_nodes - registered)
            registered = total_nodes
            wait_until(functools.partial(nodes_seen, ctx, total_nodes), 120, "the informers", 0.5)
            for replicas in (3, 100):
                placements[(total_nodes, replicas)] = placement_in_process(ctx, replicas, args.runs)
                end_to_end[(total_nodes, replicas)] = placement_end_to_end(
                    clients, replicas, min(replicas, total_nodes), args.e2e_runs, str(total_nodes)
                )
                print(
                    f"  {total_nodes} nodes, {replicas} replicas: {placements[(total_nodes, replicas)]}, "
                    f"end to end {end_to_end[(total_nodes, replicas)]}",
                    file=sys.stderr,
                )
        time.sleep(5)
        with_nodes = proc_status(pid)
        kube.stop_informers()
        controller.stop()

    report(
        args, pairs, objects, managers, reconciles, placements, end_to_end, node_seconds, at_start, steady, with_nodes
    )
    report_stages(args.managers, timeline)
    report_requests(args.managers, managers.total, requests_during)
    return 0


def report(
    args: argparse.Namespace,
    pairs: Timing,
    objects: Timing,
    managers: Timing,
    reconciles: dict[str, float],
    placements: dict[tuple[int, int], dict[str, float]],
    end_to_end: dict[tuple[int, int], list[float]],
    node_seconds: dict[int, float],
    at_start: dict[str, float],
    steady: dict[str, float],
    with_nodes: dict[str, float],
) -> None:
    count = args.managers
    print(
        f"\nController benchmark: {count} NFS VolumeManagers, placement on {args.nodes} nodes "
        f"(baseline {args.baseline_nodes}), {os.cpu_count()} CPUs shared by the control plane, "
        f"the controller and the benchmark; {CLIENT_THREADS} client threads create"
    )
    print(f"\n{count} objects created at once, until done (seconds)")
    print(f"{'what':<58} {'done':>9} {'total':>7} {'p50':>6} {'p99':>6} {'vs floor':>9}  target")
    all_running = managers.done >= count and managers.total <= TARGET_RUNNING_SECONDS
    rows = [
        (f"floor: {count} PV+PVC pairs created directly, until Bound", pairs, ""),
        (f"{count} VolumeManager objects created (no controller)", objects, ""),
        (
            f"{count} NFS VolumeManagers, created until Running",
            managers,
            f"<= {TARGET_RUNNING_SECONDS:.0f} s: {met(all_running)}",
        ),
    ]
    for label, timing, target in rows:
        p50 = statistics.median(timing.latencies) if timing.latencies else float("nan")
        p99 = percentile(timing.latencies, 0.99) if timing.latencies else float("nan")
        print(
            f"{label:<58} {timing.done:>4}/{timing.wanted:<4} {timing.total:>7.1f} {p50:>6.1f} {p99:>6.1f} "
            f"{timing.total / pairs.total:>8.2f}x  {target}"
        )
    calls = sum(v for k, v in reconciles.items() if k.startswith("kvc_controller_reconciles_total"))
    seconds = sum(v for k, v in reconciles.items() if k.startswith("kvc_controller_reconcile_seconds_sum"))
    print(
        f"  (all {count} created in {managers.extra.get('created', 0):.1f} s; the controller used "
        f"{managers.extra.get('cpu', 0):.1f} CPU-seconds until all were Running, in {calls:.0f} reconciles "
        f"of {1000 * seconds / max(calls, 1):.1f} ms on average)"
    )

    print("\nPlacement of an S3 volume: ClusterView.load + place, in-process against the API server (ms, medians)")
    print(
        f"{'nodes':>6} {'replicas':>8} {'load':>8} {'place':>8} {'total':>8} {'p90':>8} {'vs base':>8} "
        f"{'1st pass':>8}  target"
    )
    for (nodes, replicas), row in placements.items():
        base = placements[(args.baseline_nodes, replicas)]["total"]
        target = ""
        if nodes == args.nodes:
            target = f"<= {TARGET_PLACEMENT_MS:.0f} ms: {met(row['total'] <= TARGET_PLACEMENT_MS)}"
        print(
            f"{nodes:>6} {replicas:>8} {row['load']:>8.2f} {row['place']:>8.2f} {row['total']:>8.2f} "
            f"{row['p90']:>8.2f} {row['total'] / base:>7.2f}x {row['cold']:>8.2f}  {target}"
        )
    print("\nEnd to end in the controller: S3 VolumeManager created -> replicas assigned in its status (s)")
    print(f"{'nodes':>6} {'replicas':>8} {'median':>8} {'max':>8} {'vs base':>8}")
    for (nodes, replicas), durations in end_to_end.items():
        base_runs = end_to_end[(args.baseline_nodes, replicas)]
        if not durations or not base_runs:
            print(f"{nodes:>6} {replicas:>8} {'-':>8}")
            continue
        median = statistics.median(durations)
        print(
            f"{nodes:>6} {replicas:>8} {median:>8.2f} {max(durations):>8.2f} "
            f"{median / statistics.median(base_runs):>7.2f}x"
        )
    print(
        "  (nodes registered with their VolumeNodes in "
        + ", ".join(f"{s:.0f} s ({n})" for n, s in node_seconds.items())
        + ")"
    )

    print("\nController resident memory (MB)")
    print(f"{'when':<58} {'VmRSS':>7} {'VmHWM':>7} {'vs start':>9}  target")
    memory_rows = [
        ("right after start", at_start, ""),
        (f"{count} VolumeManagers Running", steady, ""),
        (
            f"{count} VolumeManagers Running and {args.nodes} nodes",
            with_nodes,
            f"<= {TARGET_RSS_MB:.0f} MB: {met(with_nodes['VmHWM'] <= TARGET_RSS_MB)} (peak)",
        ),
    ]
    for label, row, target in memory_rows:
        print(
            f"{label:<58} {row['VmRSS']:>7.1f} {row['VmHWM']:>7.1f} {row['VmRSS'] / at_start['VmRSS']:>8.2f}x  {target}"
        )
    print(
        f"  (at most {steady['sockets']:.0f} sockets open while the {count} were created; then, with nothing"
        f" changing, {100 * steady['idle_cpu']:.0f}% of a CPU over {IDLE_SECONDS:.0f} s)"
    )


def report_stages(count: int, timeline: dict[str, list[float]]) -> None:
    print(f"\nWhere the {count} VolumeManagers' time went: seconds from the first create (objects' timestamps)")
    print(f"{'step':<42} {'count':>6} {'p10':>6} {'p50':>6} {'p90':>6} {'max':>6}")
    for step, values in timeline.items():
        if not values:
            print(f"{step:<42} {0:>6}")
            continue
        quantiles = [percentile(values, q) for q in (0.1, 0.5, 0.9)]
        print(f"{step:<42} {len(values):>6} " + " ".join(f"{v:>6.1f}" for v in (*quantiles, max(values))))


def report_requests(count: int, seconds: float, requests: dict[tuple[str, str, str], float]) -> None:
    """What the API server did while the VolumeManagers were made Running: where its time went."""
    total = sum(requests.values())
    print(f"\nkube-apiserver requests while {count} VolumeManagers became Running ({total:.0f} in {seconds:.0f} s)")
    print(f"{'verb':<8} {'resource':<36} {'requests':>9} {'per VM':>7} {'share':>6}")
    for (verb, resource, subresource), value in sorted(requests.items(), key=lambda item: -item[1])[:14]:
        name = f"{resource}/{subresource}" if subresource else resource
        print(f"{verb:<8} {name:<36} {value:>9.0f} {value / count:>7.2f} {value / total:>6.1%}")


if __name__ == "__main__":
    sys.exit(main())
