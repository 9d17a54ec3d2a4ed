"""KVC under a seeded storm of crashes: everything converges, nothing is left behind.

Run it with ``make test-faults`` (about 2-3 minutes; ``make test`` runs it too, and
``KVC_FAULTS=0`` leaves it out); replay a run with ``KVC_FAULT_SEED=<seed> make test-faults``
(the seed is printed in the run's header, at the start of the test and in every failure).

What runs, all for real: a private local control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, kwok) with five simulated nodes, KVC's controller,
one agent per node, the admission webhook registered with ``failurePolicy: Fail``, a moto
S3 server behind a TCP proxy (``proxy.py`` explains why) and an HTTP file server.

The workload (``chaos.make_plan``): 20 VolumeManagers arriving over the first 40% of a
90-second run (mostly S3 with 1-2 replicas, some NFS and some HTTP), 100 pods annotated
``kvc/volume`` created over the whole run, and three VolumeManagers deleted mid-run (their
pods a few seconds later, as a user would).  Meanwhile, at seeded offsets: the controller
and the webhook are SIGKILLed twice each, agents three times (each component is started
again after a random delay, sometimes longer than the controller's agent grace, so replicas
move), the S3 server restarts twice, kube-apiserver is SIGKILLed and restarted once, and one
node is removed for good (Node deleted, its agent stopped).

After the storm, with generous timeouts, every one of these must hold (a violation fails
the test with the seed and the exact list of what is wrong):

- every KVC process is still running: none exited on its own (a crash is a bug even
  where the cluster heals around it);
- every surviving VolumeManager is Running with its volume Ready;
- every node its status lists holds a replica equal to the source, byte for byte, and
  exactly those nodes carry the volume's data label;
- nothing is orphaned: no PV/PVC of a deleted VolumeManager, no data label on a node that
  does not hold a Ready replica, no VolumeNode of a removed node, no assignment of a
  deleted VolumeManager or to a node that neither holds a listed replica nor runs a pod
  using it, no data or staging directory on a node that is not assigned it;
- data in use is kept: a running pod's node still holds the data it mounts, intact;
- no pod is admitted without its wiring: every pod created with ``kvc/volume`` was either
  denied (recorded; a webhook outage denies, by design) or carries the injected marker,
  volumes and mounts, and for node-local data the scheduling gate or the data affinity;
  none stays gated once its data is Ready;
- the VolumeManagers deleted mid-run are gone, with their labels, claims, assignments and data.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException

from e2e.cluster import ControlPlane, NodeSpec, tail
from e2e.faults import chaos
from e2e.faults.proxy import TcpProxy
from e2e.helpers import restricted_pod, tree, wait_for
from e2e.kvc import NODE_DATA_ROOT, KvcAgent, KvcController, KvcWebhook, apply_crds
from e2e.s3server import S3Server, credentials_secret
from kvc.agent.agent import STATE_FILE
from kvc.api import names
from kvc.testing.fileserver import FileServer
from kvc.wiring.mutation import GATE, INJECTED

logger = logging.getLogger(__name__)

NODES = tuple(f"kvc-fault-node-{i}" for i in range(1, 6))
NAMESPACE = "kvc-faults"
DATA_LABEL_PREFIX = f"data.{names.GROUP}/"
# After the storm: time for every backoff to expire and every replica to be fetched again.
RECOVERY_TIMEOUT = 420.0
T = TypeVar("T")


# --------------------------------------------------------------------------- the environment


@dataclass
class Env:
    """Everything the suite started; components are replaced as faults restart them."""

    plane: ControlPlane
    controller: KvcController
    webhook: KvcWebhook
    agents: dict[str, KvcAgent]
    s3: S3Server
    proxy: TcpProxy
    http: FileServer
    http_root: Path
    removed: set[str] = field(default_factory=set)
    # Where the components' logs are copied when the test fails.
    logs_kept_in: Path = field(default_factory=lambda: Path(".e2e-logs") / f"faults-{time.strftime('%Y%m%d-%H%M%S')}")

    def live_agents(self) -> dict[str, KvcAgent]:
        return {node: agent for node, agent in self.agents.items() if node not in self.removed}


@pytest.fixture(scope="module")
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    plane = ControlPlane()
    environment: Env | None = None
    s3: S3Server | None = None
    proxy: TcpProxy | None = None
    http: FileServer | None = None
    serving: Any = None
    try:
        plane.start()
        plane.add_nodes([NodeSpec(name, labels={"kvc.test/zone": f"zone-{i % 2}"}) for i, name in enumerate(NODES)])
        apply_crds(plane)
        s3 = S3Server(plane.logs_dir / "s3.log").start()
        proxy = TcpProxy(s3.port).start()
        http_root = tmp_path_factory.mktemp("www")
        http = FileServer(http_root)
        serving = http.running()
        serving.__enter__()
        agents = {node: KvcAgent(plane, node).start() for node in NODES}
        controller = KvcController(plane).start()
        webhook = KvcWebhook(plane).start()
        for agent in agents.values():
            agent.wait_reporting(timeout=60)
        webhook.register(plane.api_client())
        environment = Env(plane, controller, webhook, agents, s3, proxy, http, http_root)
        yield environment
    finally:
        if serving is not None:
            serving.__exit__(None, None, None)
        if proxy is not None:
            proxy.stop()
        if environment is not None:
            environment.s3.stop()  # the latest S3 server: faults replace it
        if s3 is not None:
            s3.stop()
        failed = request.session.testsfailed or os.environ.get("KVC_E2E_KEEP_LOGS")
        if environment is not None:
            keep = environment.logs_kept_in if failed else None
        else:
            keep = Path(".e2e-logs") / f"faults-{time.strftime('%Y%m%d-%H%M%S')}" if failed else None
        plane.stop(keep_logs_in=keep)  # stops the KVC processes too: they are its components


# --------------------------------------------------------------------------- API calls that ride out an outage

_OUTAGE_ERRORS = (urllib3.exceptions.HTTPError, OSError)


def api_retry(call: Callable[[], T], what: str, timeout: float = 120.0) -> T:
    """``call()``, retried while the API server is down or restarting (5xx, refused connections)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except ApiException as exc:
            if exc.status and exc.status < 500 and exc.status != 429:
                raise
            error: Exception = exc
        except _OUTAGE_ERRORS as exc:
            error = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: the API server did not answer for {timeout:.0f}s ({error})")
        time.sleep(0.5)


# --------------------------------------------------------------------------- data


def bucket_of(volume: chaos.VolumePlan) -> str:
    return f"bucket-{volume.name}"


def source_tree(seed: int, volume: chaos.VolumePlan) -> dict[str, str]:
    """Relative path -> SHA-256 of the volume's source data (what every replica must equal)."""
    return {
        path: hashlib.sha256(chaos.file_bytes(seed, volume.name, path, size)).hexdigest() for path, size in volume.files
    }


def seed_s3(server: S3Server, plan: chaos.Plan) -> None:
    """Create every S3 volume's bucket and objects (again after a restart: same bytes)."""
    s3 = server.client()
    volumes = [v for v in plan.volumes if v.kind == chaos.S3]
    for volume in volumes:
        s3.create_bucket(Bucket=bucket_of(volume))
    jobs = [(v, path, size) for v in volumes for path, size in v.files]

    def put(job: tuple[chaos.VolumePlan, str, int]) -> None:
        volume, path, size = job
        body = chaos.file_bytes(plan.seed, volume.name, path, size)
        s3.put_object(Bucket=bucket_of(volume), Key=f"data/{path}", Body=body)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(put, jobs))


def write_http_files(root: Path, plan: chaos.Plan) -> None:
    for volume in plan.volumes:
        if volume.kind == chaos.HTTP:
            (root / volume.name).mkdir(parents=True, exist_ok=True)
            for path, size in volume.files:
                (root / volume.name / path).write_bytes(chaos.file_bytes(plan.seed, volume.name, path, size))


def volume_config(env: Env, plan: chaos.Plan, volume: chaos.VolumePlan) -> dict[str, Any]:
    if volume.kind == chaos.NFS:
        return {
            "id": volume.name,
            "sourceType": "NFS",
            "accessMode": "ReadWriteMany",
            "options": {"server": "nfs.example.com", "path": f"/exports/{volume.name}"},
        }
    if volume.kind == chaos.HTTP:
        urls = [f"{env.http.url}/{volume.name}/{path}" for path, _ in volume.files]
        digests = list(source_tree(plan.seed, volume).values())
        options = {"url": ",".join(urls), "sha256": ",".join(digests)}
    else:
        options = {
            "sourceURL": f"s3://{bucket_of(volume)}/data/",
            "endpointURL": env.proxy.url,
            "awsCredentialsSecretName": "aws-creds",
        }
    return {
        "id": volume.name,
        "sourceType": volume.kind,
        "replicas": volume.replicas,
        "accessMode": "ReadOnlyMany",
        "capacity": "100Mi",
        "options": options,
    }


# --------------------------------------------------------------------------- what happened


@dataclass
class Record:
    """What the run did and saw, for the checks and for the failure message."""

    seed: int
    t0: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: dict[str, str] = field(default_factory=dict)  # pod -> admitted | denied: ... | unreachable: ...
    timeline: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def note(self, line: str) -> None:
        with self.lock:
            self.timeline.append(f"t={time.monotonic() - self.t0:6.1f}s {line}")
        logger.info("%s", line)

    def error(self, line: str) -> None:
        with self.lock:
            self.errors.append(f"t={time.monotonic() - self.t0:6.1f}s {line}")

    def outcome_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            kind = outcome.split(":", 1)[0]
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def summary(self) -> str:
        """Pods by outcome, and denials by reason (volume names left out)."""
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.outcome_counts().items()))
        reasons: dict[str, int] = {}
        for outcome in self.outcomes.values():
            if outcome.startswith("denied"):
                reason = outcome.split("denied the request: ", 1)[-1]
                reason = re.sub(r"(s3|nfs|http)-\d\d", "<id>", reason)[:100]
                reasons[reason] = reasons.get(reason, 0) + 1
        why = "".join(f"\n  {n:3d} x {reason}" for reason, n in sorted(reasons.items(), key=lambda r: -r[1]))
        return f"pods: {counts}{why}"


Action = tuple[float, str, Callable[[], None]]


def run_timeline(actions: list[Action], record: Record) -> None:
    """Run actions at their offsets, one after another; an action's error is recorded, not raised."""
    for at, what, action in sorted(actions, key=lambda a: a[0]):
        delay = record.t0 + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            action()
            record.note(what)
        except Exception as exc:
            logger.exception("%s failed", what)
            record.error(f"{what}: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- the workload


def pod_body(pod: chaos.PodPlan) -> dict[str, Any]:
    return {
        "metadata": {
            "name": pod.name,
            "annotations": {"kvc/volume": pod.annotation},
            "labels": {"kvc.test/fault": "1"},
        },
        "spec": restricted_pod(pod.name)["spec"],
    }


def create_pod(core: Any, pod: chaos.PodPlan, record: Record) -> None:
    try:
        core.create_namespaced_pod(NAMESPACE, pod_body(pod))
        outcome = "admitted"
    except ApiException as exc:
        try:
            message = str(json.loads(exc.body or "{}").get("message", exc.reason))
        except ValueError:
            message = str(exc.reason)
        if "denied the request" in message or "failed calling webhook" in message:
            outcome = f"denied: {message}"
        else:
            outcome = f"error: {exc.status} {message}"
    except _OUTAGE_ERRORS as exc:
        # The API server went away mid-request: the pod may or may not exist; the checks
        # look at what exists.
        outcome = f"unreachable: {type(exc).__name__}"
    with record.lock:
        record.outcomes[pod.name] = outcome


def workload(env: Env, plan: chaos.Plan, record: Record) -> list[Action]:
    api = env.plane.api_client()
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    group, version, plural = names.GROUP, names.VERSION, names.VOLUMEMANAGER_PLURAL
    actions: list[Action] = []

    def create_vm(volume: chaos.VolumePlan) -> None:
        body = {
            "apiVersion": f"{group}/{version}",
            "kind": "VolumeManager",
            "metadata": {"name": volume.name},
            "spec": {"volumeConfigs": [volume_config(env, plan, volume)]},
        }
        try:
            api_retry(
                lambda: custom.create_namespaced_custom_object(group, version, NAMESPACE, plural, body),
                f"create {volume.name}",
            )
        except ApiException as exc:
            if exc.status != 409:  # created before a lost response: fine
                raise

    def delete_vm(volume: chaos.VolumePlan) -> None:
        api_retry(
            lambda: custom.delete_namespaced_custom_object(group, version, NAMESPACE, plural, volume.name),
            f"delete {volume.name}",
        )

    def delete_pods_of(volume: chaos.VolumePlan) -> None:
        for pod in plan.pods:
            if volume.name in pod.volumes:
                try:
                    api_retry(
                        functools.partial(core.delete_namespaced_pod, pod.name, NAMESPACE, grace_period_seconds=0),
                        f"delete pod {pod.name}",
                    )
                except ApiException as exc:
                    if exc.status != 404:
                        raise

    for volume in plan.volumes:
        actions.append(
            (volume.created_at, f"created VolumeManager {volume.name}", functools.partial(create_vm, volume))
        )
        if volume.deleted_at is not None:
            actions.append(
                (volume.deleted_at, f"deleted VolumeManager {volume.name}", functools.partial(delete_vm, volume))
            )
            actions.append(
                (volume.deleted_at + 5, f"deleted the pods of {volume.name}", functools.partial(delete_pods_of, volume))
            )
    for pod in plan.pods:
        actions.append((pod.at, f"pod {pod.name} ({pod.annotation})", functools.partial(create_pod, core, pod, record)))
    return actions


# --------------------------------------------------------------------------- the faults


def faults(env: Env, plan: chaos.Plan, record: Record) -> list[Action]:
    core = client.CoreV1Api(env.plane.api_client())
    actions: list[Action] = []
    for fault in plan.faults:
        if fault.kind == chaos.KILL_CONTROLLER:
            actions.append((fault.at, "SIGKILL controller", env.controller.kill))
            actions.append((fault.at + fault.down, "started controller", functools.partial(start, env.controller)))
        elif fault.kind == chaos.KILL_WEBHOOK:
            actions.append((fault.at, "SIGKILL webhook", env.webhook.kill))
            actions.append((fault.at + fault.down, "started webhook", functools.partial(start, env.webhook)))
        elif fault.kind == chaos.KILL_AGENT:
            agent = env.agents[fault.target]
            actions.append((fault.at, f"SIGKILL agent of {fault.target}", agent.kill))
            actions.append((fault.at + fault.down, f"started agent of {fault.target}", functools.partial(start, agent)))
        elif fault.kind == chaos.RESTART_S3:
            actions.append((fault.at, "S3 server down", lambda: stop_s3(env)))
            actions.append((fault.at + fault.down, "S3 server back with its data", lambda: start_s3(env, plan)))
        elif fault.kind == chaos.RESTART_APISERVER:
            actions.append(
                (
                    fault.at,
                    f"SIGKILL kube-apiserver, restarted after {fault.down:.1f}s",
                    functools.partial(env.plane.restart_apiserver, fault.down),
                )
            )
        elif fault.kind == chaos.REMOVE_NODE:
            actions.append(
                (fault.at, f"removed node {fault.target}", functools.partial(remove_node, env, core, fault.target))
            )
    return actions


def start(component: KvcController | KvcWebhook | KvcAgent) -> None:
    component.start()


def stop_s3(env: Env) -> None:
    env.proxy.down()
    env.s3.stop()


def start_s3(env: Env, plan: chaos.Plan) -> None:
    env.s3.stop()  # (already stopped by stop_s3)
    server = S3Server(env.plane.logs_dir / "s3.log").start()
    seed_s3(server, plan)  # before any agent can see it: a restart keeps the data
    env.s3 = server
    env.proxy.up(server.port)


def remove_node(env: Env, core: Any, node: str) -> None:
    env.removed.add(node)
    env.agents[node].kill()
    api_retry(lambda: core.delete_node(node), f"delete node {node}")


# --------------------------------------------------------------------------- the invariants


def _labels_of(node: Any) -> dict[str, str]:
    return dict(node.metadata.labels or {})


def _data_label(volume_status: dict[str, Any]) -> str:
    terms = volume_status["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    return str(terms[0]["matchExpressions"][0]["key"])


def _tree_difference(actual: dict[str, str], expected: dict[str, str]) -> str:
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    differ = sorted(k for k in set(actual) & set(expected) if actual[k] != expected[k])
    parts = [
        f"{len(what)} {how} (e.g. {what[0]})"
        for what, how in ((missing, "missing"), (extra, "extra"), (differ, "differing"))
        if what
    ]
    return ", ".join(parts)


class Checks:
    """The invariants, each violation one precise line."""

    def __init__(self, env: Env, plan: chaos.Plan) -> None:
        self.env = env
        self.plan = plan
        api = env.plane.api_client()
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.expected = {v.name: source_tree(plan.seed, v) for v in plan.volumes}
        self.by_name = {v.name: v for v in plan.volumes}

    def _replica_problem(self, node: str, path: str, volume: str) -> str | None:
        agent = self.env.agents[node]
        local = agent.local(path)
        try:
            actual = tree(local)
        except OSError as exc:
            return f"cannot read it ({type(exc).__name__})"
        if not local.is_dir():
            return "its directory is missing"
        difference = _tree_difference(actual, self.expected[volume])
        return f"it differs from the source: {difference}" if difference else None

    def violations(self) -> list[str]:  # noqa: PLR0912 - one list of checks reads best
        problems: list[str] = []
        listed = self.custom.list_namespaced_custom_object(
            names.GROUP, names.VERSION, NAMESPACE, names.VOLUMEMANAGER_PLURAL
        )["items"]
        vms = {vm["metadata"]["name"]: vm for vm in listed}
        nodes = {n.metadata.name: n for n in self.core.list_node().items}
        vnodes = {
            v["metadata"]["name"]: v
            for v in self.custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL)[
                "items"
            ]
        }
        pods = self.core.list_namespaced_pod(NAMESPACE).items
        live_agents = self.env.live_agents()

        # Every KVC process rode out the storm: a crash is a bug even where the cluster heals.
        processes: list[KvcController | KvcWebhook | KvcAgent] = [
            self.env.controller,
            self.env.webhook,
            *live_agents.values(),
        ]
        for process in processes:
            if not process.running:
                log = process.component.log_path if process.component else None
                last = tail(log, 3) if log else "(never started)"
                problems.append(f"{process.name} is not running (it exited on its own):\n{last}")

        # VolumeManagers: deleted ones gone, the others Running with Ready, correct replicas.
        live: dict[str, dict[str, Any]] = {}  # name -> volume status
        uids: dict[str, str] = {}
        holders: dict[str, set[str]] = {}
        for volume in self.plan.volumes:
            vm = vms.get(volume.name)
            if volume.deleted_at is not None:
                if vm is not None:
                    status = vm.get("status") or {}
                    problems.append(
                        f"{volume.name}: deleted at t={volume.deleted_at:.0f}s but still exists "
                        f"({status.get('state')}: {status.get('message')})"
                    )
                continue
            if vm is None:
                problems.append(f"{volume.name}: VolumeManager missing")
                continue
            uids[vm["metadata"]["uid"]] = volume.name
            status = vm.get("status") or {}
            current = status.get("observedGeneration") == vm["metadata"].get("generation")
            if status.get("state") != "Running" or not current:
                problems.append(
                    f"{volume.name}: state {status.get('state')} (current: {current}): {status.get('message')}"
                )
            entries = status.get("volumes") or []
            if not entries:
                continue
            entry = entries[0]
            live[volume.name] = entry
            if entry.get("phase") != "Ready":
                problems.append(f"{volume.name}: volume {entry.get('phase')}: {entry.get('message')}")
            if not volume.node_local or "hostPath" not in (entry.get("volumeSource") or {}):
                continue
            path = entry["volumeSource"]["hostPath"]["path"]
            ready = {n["name"] for n in entry.get("nodes") or [] if n.get("phase") == "Ready"}
            holders[volume.name] = ready
            if len(ready) != volume.replicas:
                problems.append(f"{volume.name}: {len(ready)} Ready replicas listed, {volume.replicas} wanted")
            for node in sorted(ready):
                if node not in live_agents:
                    problems.append(f"{volume.name}: status lists a replica on {node}, a removed node")
                    continue
                problem = self._replica_problem(node, path, volume.name)
                if problem:
                    problems.append(f"{volume.name}: replica on {node}: {problem}")
            label = _data_label(entry)
            labelled = {name for name, node in nodes.items() if label in _labels_of(node)}
            if labelled != ready:
                problems.append(
                    f"{volume.name}: nodes labelled {sorted(labelled)} but Ready replicas on {sorted(ready)}"
                )

        # Node labels: each data label belongs to a live volume with a Ready replica there.
        labels = {_data_label(entry): name for name, entry in live.items() if "nodeAffinity" in entry}
        for name, node in nodes.items():
            for key in _labels_of(node):
                if key.startswith(DATA_LABEL_PREFIX):
                    owner = labels.get(key)
                    if owner is None or name not in holders.get(owner, set()):
                        problems.append(f"orphan label {key} on node {name} (volume: {owner or 'none'})")

        # PVs and claims (NFS and node-local volumes alike): only for live VolumeManagers.
        selector = names.LABEL_VOLUMEMANAGER_UID
        for pv in self.core.list_persistent_volume(label_selector=selector).items:
            if (pv.metadata.labels or {}).get(selector) not in uids:
                problems.append(f"orphan PV {pv.metadata.name} (VolumeManager uid {pv.metadata.labels.get(selector)})")
        for pvc in self.core.list_namespaced_persistent_volume_claim(NAMESPACE, label_selector=selector).items:
            if (pvc.metadata.labels or {}).get(selector) not in uids:
                problems.append(f"orphan claim {pvc.metadata.name}")

        # VolumeNodes: only for existing nodes; each assignment current and needed.
        paths = {
            name: entry["volumeSource"]["hostPath"]["path"]
            for name, entry in live.items()
            if "hostPath" in (entry.get("volumeSource") or {})
        }
        claim_paths = {entry["claimName"]: paths[name] for name, entry in live.items() if name in paths}

        # Pods: which node-local paths are in use where (data in use must be kept), mounted
        # through their claim or as a hostPath.
        in_use: dict[tuple[str, str], list[str]] = {}
        for pod in pods:
            node = pod.spec.node_name
            if not node or node not in nodes or (pod.status and pod.status.phase in ("Succeeded", "Failed")):
                continue
            for volume in pod.spec.volumes or []:
                claim = volume.persistent_volume_claim
                path = volume.host_path.path if volume.host_path is not None else None
                path = claim_paths.get(claim.claim_name) if claim is not None else path
                if path is not None:
                    in_use.setdefault((node, path), []).append(pod.metadata.name)

        for name, vnode in vnodes.items():
            if name not in nodes:
                problems.append(f"VolumeNode {name} left behind by a removed node")
            for assignment in (vnode.get("spec") or {}).get("replicas") or []:
                owner = uids.get((assignment.get("volumeManager") or {}).get("uid", ""))
                path = assignment.get("path")
                if owner is None:
                    problems.append(
                        f"VolumeNode {name}: assignment {assignment.get('name')} of a deleted VolumeManager"
                    )
                elif path != paths.get(owner):
                    problems.append(f"VolumeNode {name}: stale assignment {assignment.get('name')} ({path})")
                elif name not in holders.get(owner, set()) and (name, path) not in in_use:
                    problems.append(
                        f"VolumeNode {name}: assignment {assignment.get('name')} on a node that is not "
                        "listed as holding it and runs no pod using it"
                    )

        # Data on the nodes' disks: only what the node is assigned, nothing half-written.
        for node, agent in live_agents.items():
            assigned = {a.get("path") for a in ((vnodes.get(node) or {}).get("spec") or {}).get("replicas") or []}
            for child in agent.data_root.iterdir() if agent.data_root.is_dir() else []:
                if child.name not in (NAMESPACE, STATE_FILE, "extra"):
                    problems.append(f"{node}: unexpected {child.name} in the data root")
            for directory in sorted((agent.data_root / NAMESPACE).glob("*/*")):
                node_path = f"{NODE_DATA_ROOT}/{NAMESPACE}/{directory.parent.name}/{directory.name}"
                if directory.name.endswith(".partial"):
                    problems.append(f"{node}: staging directory {node_path} left behind")
                elif node_path not in assigned:
                    problems.append(f"{node}: data directory {node_path} is not assigned to this node")

        # Data in use is kept, intact, where the pods run.
        for (node, path), users in sorted(in_use.items()):
            owner = next((name for name, p in paths.items() if p == path), None)
            if owner is None or node not in live_agents:
                continue  # a deleted volume's data (its pods are deleted with it)
            problem = self._replica_problem(node, path, owner)
            if problem:
                problems.append(f"{owner}: pod(s) {', '.join(sorted(users)[:3])} on {node} mount it but {problem}")

        # Gated pods are released once all their data is Ready.
        for pod in pods:
            gates = [g.name for g in pod.spec.scheduling_gates or []]
            refs = self._refs(pod)
            if GATE in gates and refs and all(live.get(r, {}).get("phase") == "Ready" for r in refs):
                problems.append(f"pod {pod.metadata.name}: still gated although {', '.join(refs)} Ready")
        return problems

    @staticmethod
    def _refs(pod: Any) -> list[str]:
        annotation = (pod.metadata.annotations or {}).get("kvc/volume", "")
        return [ref.strip().split("/")[-1] for ref in annotation.split(",") if ref.strip()]

    def wiring_problems(self, record: Record) -> list[str]:
        """Every annotated pod that exists was wired; none that was denied exists."""
        problems = []
        vms = {
            vm["metadata"]["name"]: vm
            for vm in self.custom.list_namespaced_custom_object(
                names.GROUP, names.VERSION, NAMESPACE, names.VOLUMEMANAGER_PLURAL
            )["items"]
        }
        for pod in self.core.list_namespaced_pod(NAMESPACE, label_selector="kvc.test/fault=1").items:
            name = pod.metadata.name
            outcome = record.outcomes.get(name, "not recorded")
            if outcome.startswith("denied"):
                problems.append(f"pod {name} exists although its creation was denied ({outcome})")
            problem = self._wiring_problem(pod, vms)
            if problem:
                problems.append(f"pod {name} ({outcome}) admitted without its wiring: {problem}")
        return problems

    def _wiring_problem(self, pod: Any, vms: dict[str, Any]) -> str | None:
        annotations = pod.metadata.annotations or {}
        if INJECTED not in annotations:
            return f"no {INJECTED} marker"
        volumes = {v.name: v for v in pod.spec.volumes or []}
        gated = GATE in [g.name for g in pod.spec.scheduling_gates or []]
        required = (
            pod.spec.affinity
            and pod.spec.affinity.node_affinity
            and pod.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution
        )
        terms = required.node_selector_terms if required else []
        for ref in self._refs(pod):
            volume_name = names.bounded_name("kvc", ref, ref)
            volume = volumes.get(volume_name)
            if volume is None:
                return f"no volume {volume_name} for {ref}"
            for container in pod.spec.containers:
                mounts = {(m.name, m.mount_path) for m in container.volume_mounts or []}
                if (volume_name, f"/var/datasets/{ref}") not in mounts:
                    return f"container {container.name} does not mount {ref}"
            if volume.persistent_volume_claim is None:
                return f"{ref} is not mounted from its claim"
            if not self.by_name[ref].node_local:
                continue
            if gated:
                continue
            status = ((vms.get(ref) or {}).get("status") or {}).get("volumes") or [{}]
            label = _data_label(status[0]) if "nodeAffinity" in status[0] else None
            for term in terms or [None]:
                keys = {e.key for e in (term.match_expressions or [])} if term else set()
                wanted = {label} if label else {k for k in keys if k.startswith(DATA_LABEL_PREFIX)}
                if not wanted or not wanted <= keys:
                    return f"neither the scheduling gate nor the data affinity of {ref}"
        return None


# --------------------------------------------------------------------------- the test


def show(request: pytest.FixtureRequest, text: str) -> None:
    """Print past pytest's output capture: the seed must be visible while the test runs."""
    logger.info("%s", text)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(text)


@pytest.mark.timeout(1500)
def test_kvc_converges_after_a_seeded_storm_of_faults(
    env: Env, fault_seed: int, request: pytest.FixtureRequest
) -> None:
    plan = chaos.make_plan(fault_seed, NODES)
    show(request, f"\nKVC_FAULT_SEED={fault_seed}\n{plan.describe()}")

    api = env.plane.api_client()
    core = client.CoreV1Api(api)
    # Node-local data reaches the pods through claims, which Pod Security `restricted` admits.
    core.create_namespace(
        {"metadata": {"name": NAMESPACE, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    wait_for(
        lambda: core.list_namespaced_service_account(NAMESPACE, field_selector="metadata.name=default").items,
        what="the namespace's default ServiceAccount",
    )
    core.create_namespaced_secret(NAMESPACE, credentials_secret("aws-creds"))
    seed_s3(env.s3, plan)
    write_http_files(env.http_root, plan)

    record = Record(fault_seed, t0=time.monotonic())
    started = time.monotonic()
    users = threading.Thread(target=run_timeline, args=(workload(env, plan, record), record), name="workload")
    users.start()
    # The faults run on this thread: the components they restart are started with
    # PR_SET_PDEATHSIG, which fires when the *thread* that started them ends.
    run_timeline(faults(env, plan, record), record)
    users.join()

    def fail(what: str, problems: list[str]) -> None:
        pytest.fail(
            f"KVC_FAULT_SEED={fault_seed}: {what}:\n  - "
            + "\n  - ".join(problems[:40])
            + (f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else "")
            + f"\n{record.summary()}\ncomponent logs: {env.logs_kept_in}/\n{plan.describe()}\nwhat happened:\n  "
            + "\n  ".join(record.timeline),
            pytrace=False,
        )

    if record.errors:
        fail("the harness could not carry out the plan", record.errors)
    storm = time.monotonic() - started

    checks = Checks(env, plan)
    # Wiring first: the pods of deleted VolumeManagers are removed afterwards, as their users would.
    wiring = api_retry(lambda: checks.wiring_problems(record), "check the pods")
    if wiring:
        fail("pods admitted without their wiring", wiring)
    for pod in core.list_namespaced_pod(NAMESPACE).items:
        if any(r in {v.name for v in plan.volumes if v.deleted_at is not None} for r in Checks._refs(pod)):
            core.delete_namespaced_pod(pod.metadata.name, NAMESPACE, grace_period_seconds=0)

    deadline = time.monotonic() + RECOVERY_TIMEOUT
    problems: list[str] = ["not checked yet"]
    while time.monotonic() < deadline:
        problems = checks.violations()
        if not problems:
            break
        time.sleep(3)
    if problems:
        fail(f"not recovered {RECOVERY_TIMEOUT:.0f}s after the last fault", problems)
    recovered = time.monotonic() - started - storm
    summary = f"KVC_FAULT_SEED={fault_seed}: recovered {recovered:.0f}s after a {storm:.0f}s storm; {record.summary()}"
    show(request, summary)
