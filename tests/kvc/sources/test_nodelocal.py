from __future__ import annotations

import copy
import datetime as dt
import json
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kvc.api import names
from kvc.api.models import VolumeConfig, VolumePhase
from kvc.policy import MAX_COPIED_OPTIONS_BYTES, MAX_ENTRY_BYTES, AdminPolicy, TolerationRule, stored_bytes
from kvc.sources import _claims, _credentials, _nodelocal
from kvc.sources._nodelocal import (
    ClusterView,
    HeartbeatWatch,
    Replica,
    agent_gone,
    cleanup,
    collect_garbage,
    data_label,
    keeps_replica,
    node_affinity,
    node_lost,
    node_path,
    provision,
    replica_key,
    unready_seconds,
    volume_phase,
)
from kvc.sources.base import SourceContext, VolumeManagerRef
from kvc.sources.http import HTTPSource
from kvc.sources.s3 import S3Source
from kvc.throttle import Throttle
from tests.fakeclock import FakeClock

FAILED = [{"name": "node-1", "message": "bucket b does not exist"}]


@pytest.mark.parametrize(
    ("ready", "shortfall", "failed", "was_usable", "placed", "phase", "message"),
    [
        (2, "", [], False, 2, VolumePhase.READY, "2/2 replicas ready"),
        (0, "", [], False, 2, VolumePhase.PROVISIONING, "0/2 replicas ready, 5/10 bytes"),
        (1, "", [], False, 2, VolumePhase.PROVISIONING, "1/2 replicas ready, 5/10 bytes"),
        (1, "", [], True, 2, VolumePhase.DEGRADED, "1/2 replicas ready, 5/10 bytes"),
        (1, "only 1 of 2", [], False, 1, VolumePhase.DEGRADED, "1/2 replicas ready; only 1 of 2"),
        # No node can take it at all: Pending, whatever it was before.
        (0, "only 0 of 2", [], True, 0, VolumePhase.PENDING, "0/2 replicas ready; only 0 of 2"),
        # Too few nodes, and the one there is still fetching: not usable yet, but progressing.
        (0, "only 1 of 2", [], False, 1, VolumePhase.PROVISIONING, "0/2 replicas ready, 5/10 bytes; only 1 of 2"),
        # Every node that was given the data failed: Failed (the agents keep retrying).
        (0, "", FAILED * 2, False, 2, VolumePhase.FAILED, "node-1: bucket b does not exist"),
        (0, "only 1 of 2", FAILED, False, 1, VolumePhase.FAILED, "node-1: bucket b does not exist"),
        # One node failed while another still fetches: the volume is not Failed.
        (
            0,
            "",
            FAILED,
            False,
            2,
            VolumePhase.PROVISIONING,
            "0/2 replicas ready, 5/10 bytes; node-1: bucket b does not exist",
        ),
        (
            1,
            "",
            FAILED,
            False,
            2,
            VolumePhase.PROVISIONING,
            "1/2 replicas ready, 5/10 bytes; node-1: bucket b does not exist",
        ),
    ],
)
def test_volume_phase(
    ready: int,
    shortfall: str,
    failed: list[dict[str, str]],
    was_usable: bool,
    placed: int,
    phase: VolumePhase,
    message: str,
) -> None:
    assert volume_phase(
        2, ready, shortfall=shortfall, failed=failed, was_usable=was_usable, progress="5/10 bytes", placed=placed
    ) == (phase, message)


def test_names_for_long_namespaces_names_and_ids_stay_valid() -> None:
    owner = VolumeManagerRef(namespace="n" * 63, name="v" * 253, uid="uid-1")
    label = data_label(owner, "i" * 63, "abc")
    prefix, name = label.split("/")
    assert prefix == "data.kvc.kubeflow.org"
    assert len(name) <= 63
    assert label != data_label(owner, "i" * 63, "abd")
    assert data_label(VolumeManagerRef("a", "b", "u1"), "c", "d") != data_label(
        VolumeManagerRef("a", "b", "u2"), "c", "d"
    )


def test_paths_keys_and_affinity() -> None:
    owner = VolumeManagerRef(namespace="team-a", name="datasets", uid="u")
    assert node_path("/var/lib/kvc/", owner, "cifar", "0123") == "/var/lib/kvc/team-a/datasets/cifar-0123"
    assert replica_key(owner, "cifar", "0123") == "team-a.datasets.cifar-0123"
    assert node_affinity("k") == {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "k", "operator": "Exists"}]}]
        }
    }


# --------------------------------------------------------------------------- node health and releasing data

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
GRACE = 45.0


def _stamp(seconds_ago: float) -> str:
    return (NOW - dt.timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_node(
    name: str,
    *,
    ready: bool = True,
    unready_for: float = 0,
    cordoned: bool = False,
    labels: dict[str, str] | None = None,
) -> Any:
    condition = client.V1NodeCondition(
        type="Ready",
        status="True" if ready else "False",
        last_transition_time=NOW - dt.timedelta(seconds=unready_for),
    )
    return client.V1Node(
        metadata=client.V1ObjectMeta(name=name, labels=dict(labels or {})),
        spec=client.V1NodeSpec(unschedulable=cordoned or None),
        status=client.V1NodeStatus(conditions=[condition]),
    )


def make_vnode(name: str, *, beat_ago: float = 1, replicas: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"replicas": list(replicas or [])},
        "status": {"heartbeatTime": _stamp(beat_ago), "disk": {"free": str(10**12)}},
    }


def test_a_heartbeat_is_stale_only_after_the_controller_saw_it_stand_still_for_the_grace(clock: FakeClock) -> None:
    watch = HeartbeatWatch(clock)
    view = ClusterView(nodes={"n": make_node("n")}, volumenodes={"n": make_vnode("n", beat_ago=600)}, now=NOW)
    # A controller that just started blames nobody: the old heartbeat may be its own absence.
    watch.observe(view.volumenodes, GRACE)
    assert not agent_gone(view, "n", watch)
    for _ in range(5):  # looking every 10 s, the heartbeat never moves
        clock.now += 10
        watch.observe(view.volumenodes, GRACE)
    assert agent_gone(view, "n", watch)


def test_an_outage_longer_than_the_grace_blames_no_agent(clock: FakeClock) -> None:
    watch = HeartbeatWatch(clock)
    before = {"n": make_vnode("n", beat_ago=1)}
    watch.observe(before, GRACE)
    clock.now += 120  # kube-apiserver was down: no look for two minutes
    after = ClusterView(nodes={"n": make_node("n")}, volumenodes={"n": make_vnode("n", beat_ago=121)}, now=NOW)
    watch.observe(after.volumenodes, GRACE)
    assert not agent_gone(after, "n", watch)
    for _ in range(5):  # ...but silence seen for a whole grace since then is real
        clock.now += 10
        watch.observe(after.volumenodes, GRACE)
    assert agent_gone(after, "n", watch)


def test_a_fresh_heartbeat_is_alive_whatever_the_watch_says(clock: FakeClock) -> None:
    watch = HeartbeatWatch(clock)
    view = ClusterView(nodes={"n": make_node("n")}, volumenodes={"n": make_vnode("n", beat_ago=1)}, now=NOW)
    watch.observe(view.volumenodes, GRACE)
    clock.now += 1000
    assert not agent_gone(view, "n", watch)


@pytest.mark.parametrize(
    ("node", "lost", "keeps"),
    [
        (make_node("n"), False, True),
        (make_node("n", cordoned=True), False, False),  # moves, but its data is not lost
        (make_node("n", ready=False, unready_for=10), False, True),  # within the grace
        (make_node("n", ready=False, unready_for=GRACE + 1), True, False),
    ],
)
def test_which_nodes_keep_their_replicas(node: Any, lost: bool, keeps: bool) -> None:
    view = ClusterView(nodes={"n": node}, volumenodes={"n": make_vnode("n")}, agent_grace_seconds=GRACE, now=NOW)
    watch = HeartbeatWatch(FakeClock())
    assert node_lost(view, "n", watch) is lost
    assert keeps_replica(view, "n", watch) is keeps
    assert node_lost(view, "gone", watch)
    assert not keeps_replica(view, "gone", watch)


def test_unready_seconds() -> None:
    nodes = {"ready": make_node("ready"), "down": make_node("down", ready=False, unready_for=30)}
    view = ClusterView(nodes=nodes, volumenodes={}, now=NOW)
    assert unready_seconds(view, "ready") is None
    assert unready_seconds(view, "down") == 30
    assert unready_seconds(view, "missing") is None


class FakeCluster:
    """Just enough of CoreV1Api and CustomObjectsApi for provision() and cleanup()."""

    def __init__(self, nodes: list[Any], vnodes: list[dict[str, Any]]) -> None:
        self.nodes = {n.metadata.name: n for n in nodes}
        self.vnodes = {v["metadata"]["name"]: v for v in vnodes}
        self.pods: list[Any] = []
        self.volumemanagers = [OWNER.uid]
        self.claims: dict[str, dict[str, Any]] = {}
        self.volumes: dict[str, dict[str, Any]] = {}
        self.api_client = client.ApiClient()
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.secret_reads: list[tuple[str, str]] = []
        self.versions = 0

    # CoreV1Api: the claims and PVs through which workloads mount the data (dicts, as the API's JSON)
    def create_namespaced_persistent_volume_claim(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        if body["metadata"]["name"] in self.claims:
            raise ApiException(status=409)
        claim = copy.deepcopy(body)
        claim["metadata"]["uid"] = f"uid-{claim['metadata']['name']}"
        claim["status"] = {"phase": "Pending"}
        self.claims[claim["metadata"]["name"]] = claim
        return claim

    def read_namespaced_persistent_volume_claim(self, name: str, namespace: str) -> dict[str, Any]:
        return copy.deepcopy(self.claims[name])

    def read_persistent_volume(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.volumes[name])

    def create_persistent_volume(self, body: dict[str, Any]) -> dict[str, Any]:
        if body["metadata"]["name"] in self.volumes:
            raise ApiException(status=409)
        self.volumes[body["metadata"]["name"]] = copy.deepcopy(body)
        claim = self.claims[body["spec"]["claimRef"]["name"]]
        claim["status"] = {"phase": "Bound"}  # kube-controller-manager's part, at once
        return body

    def patch_namespaced_persistent_volume_claim(self, name: str, namespace: str, body: dict[str, Any]) -> None:
        self.claims[name]["metadata"].setdefault("annotations", {}).update(body["metadata"]["annotations"])

    def list_namespaced_persistent_volume_claim(self, namespace: str, label_selector: str = "") -> Any:
        return SimpleNamespace(items=[c for c in self.claims.values() if not c["metadata"].get("deletionTimestamp")])

    def list_persistent_volume(self, label_selector: str = "") -> Any:
        return SimpleNamespace(items=list(self.volumes.values()))

    def delete_namespaced_persistent_volume_claim(self, name: str, namespace: str) -> None:
        self.claims.pop(name, None)

    def delete_persistent_volume(self, name: str) -> None:
        self.volumes.pop(name, None)

    # CoreV1Api: Secrets, as (namespace, name) -> the API's JSON
    def read_namespaced_secret(self, name: str, namespace: str) -> dict[str, Any]:
        self.secret_reads.append((namespace, name))
        if (namespace, name) not in self.secrets:
            raise ApiException(status=404)
        return copy.deepcopy(self.secrets[namespace, name])

    def create_namespaced_secret(self, namespace: str, body: dict[str, Any]) -> None:
        if (namespace, body["metadata"]["name"]) in self.secrets:
            raise ApiException(status=409)
        self.put_secret(namespace, body)

    def replace_namespaced_secret(self, name: str, namespace: str, body: dict[str, Any]) -> None:
        self.put_secret(namespace, body)

    def delete_namespaced_secret(self, name: str, namespace: str) -> None:
        self.secrets.pop((namespace, name), None)

    def list_namespaced_secret(self, namespace: str, label_selector: str = "") -> Any:
        return SimpleNamespace(items=[s for (ns, _), s in self.secrets.items() if ns == namespace])

    def put_secret(self, namespace: str, body: dict[str, Any]) -> None:
        secret = copy.deepcopy(body)
        secret["metadata"]["namespace"] = namespace
        self.versions += 1
        secret["metadata"]["resourceVersion"] = str(self.versions)
        self.secrets[namespace, secret["metadata"]["name"]] = secret

    # CoreV1Api
    def list_node(self) -> Any:
        return SimpleNamespace(items=list(self.nodes.values()))

    def patch_node(self, name: str, body: dict[str, Any]) -> None:
        labels = self.nodes[name].metadata.labels
        for key, value in body["metadata"]["labels"].items():
            if value is None:
                labels.pop(key, None)
            else:
                labels[key] = value

    def list_namespaced_pod(self, namespace: str, field_selector: str = "") -> Any:
        node = field_selector.removeprefix("spec.nodeName=")
        return SimpleNamespace(items=[p for p in self.pods if not node or p.spec.node_name == node])

    # CustomObjectsApi
    def list_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str) -> Any:
        raise ApiException(status=404)  # no training job CRDs here

    def list_cluster_custom_object(self, group: str, version: str, plural: str) -> dict[str, Any]:
        if plural == "volumemanagers":
            return {"items": [{"metadata": {"uid": uid}} for uid in self.volumemanagers]}
        return {"items": copy.deepcopy(list(self.vnodes.values()))}

    def get_cluster_custom_object(self, group: str, version: str, plural: str, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.vnodes[name])

    def replace_cluster_custom_object(self, group: str, version: str, plural: str, name: str, body: Any) -> None:
        self.vnodes[name] = copy.deepcopy(body)

    def delete_cluster_custom_object(self, group: str, version: str, plural: str, name: str) -> None:
        del self.vnodes[name]

    def holders(self, key: str) -> list[str]:
        return sorted(n for n, v in self.vnodes.items() if any(r["name"] == key for r in v["spec"]["replicas"]))

    def report(self, node: str, key: str, phase: str = "Ready") -> None:
        self.vnodes[node]["status"]["replicas"] = [{"name": key, "phase": phase, "bytes": 1, "totalBytes": 1}]


OWNER = VolumeManagerRef(namespace="ns", name="vm", uid="uid-1")
CONFIG = VolumeConfig.model_validate(
    {"id": "d", "sourceType": "S3", "replicas": 1, "options": {"sourceURL": "s3://b/", "awsCredentialsSecretName": "c"}}
)
REPLICA = Replica(digest="abc", options={}, credentials_secret=None)
KEY = replica_key(OWNER, "d", "abc")
PATH = node_path("/var/lib/kvc", OWNER, "d", "abc")
LABEL = data_label(OWNER, "d", "abc")


CLAIM = _nodelocal.claim_name(OWNER, "d", "abc")


def running_pod(node: str, *, through_claim: bool = False) -> Any:
    """A pod on ``node`` that mounts the data: as a hostPath (wired by earlier versions), or its claim."""
    volume = (
        client.V1Volume(name="data", persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(CLAIM))
        if through_claim
        else client.V1Volume(name="data", host_path=client.V1HostPathVolumeSource(path=PATH))
    )
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name="reader"),
        spec=client.V1PodSpec(node_name=node, containers=[], volumes=[volume]),
        status=client.V1PodStatus(phase="Running"),
    )


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> FakeCluster:
    # Heartbeats in the fake are always fresh; the watch must not get in the way.
    monkeypatch.setattr(_nodelocal, "HEARTBEATS", HeartbeatWatch(FakeClock()))
    monkeypatch.setattr(_nodelocal, "GARBAGE_COLLECTION", Throttle(30.0, FakeClock()))
    monkeypatch.setattr(
        _nodelocal.ClusterView,
        "load",
        classmethod(
            lambda cls, ctx: cls(
                nodes=copy.deepcopy(ctx.core.nodes), volumenodes=copy.deepcopy(ctx.core.vnodes), now=NOW
            )
        ),
    )
    entry = {
        "name": KEY,
        "volumeManager": {"namespace": OWNER.namespace, "name": OWNER.name, "uid": OWNER.uid},
        "sourceType": "S3",
        "volumeId": "d",
        "sourceHash": "abc",
    }
    fake = FakeCluster(
        [make_node("a", labels={LABEL: "true"}), make_node("b")],
        [make_vnode("a", replicas=[{**entry, "path": PATH}]), make_vnode("b")],
    )
    fake.report("a", KEY)
    # The data was Ready before these tests: its claim and PV exist and are bound.
    fake.create_namespaced_persistent_volume_claim(OWNER.namespace, _nodelocal.build_claim(OWNER, CONFIG, "abc"))
    fake.create_persistent_volume(_nodelocal.build_persistent_volume(OWNER, CONFIG, "abc", path=PATH, label=LABEL))
    return fake


@pytest.fixture
def bare(cluster: FakeCluster) -> FakeCluster:
    """One node whose agent reports, nothing assigned yet (with the ``cluster`` fixture's views)."""
    return FakeCluster([make_node("a")], [make_vnode("a")])


def context(cluster: FakeCluster) -> SourceContext:
    return SourceContext(owner=OWNER, core=cluster, custom=cluster, agent_grace_seconds=GRACE)


@pytest.mark.parametrize("through_claim", [False, True], ids=["hostPath", "claim"])
def test_a_cordoned_node_keeps_data_a_running_pod_uses_while_the_replica_moves(
    cluster: FakeCluster, through_claim: bool
) -> None:
    cluster.nodes["a"].spec.unschedulable = True
    cluster.pods.append(running_pod("a", through_claim=through_claim))
    status = provision(context(cluster), CONFIG, REPLICA)
    assert [n["name"] for n in status.nodes or []] == ["b"]  # placed elsewhere
    assert LABEL not in cluster.nodes["a"].metadata.labels  # no new pod is sent there
    assert cluster.holders(KEY) == ["a", "b"]  # but the data under the pod stays
    provision(context(cluster), CONFIG, REPLICA)
    assert cluster.holders(KEY) == ["a", "b"]
    cluster.pods.clear()
    provision(context(cluster), CONFIG, REPLICA)
    assert cluster.holders(KEY) == ["b"]  # released once the pod is gone


def test_a_node_whose_agent_is_gone_keeps_data_in_use(cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_nodelocal, "agent_gone", lambda view, name, watch=None: name == "a")
    cluster.pods.append(running_pod("a"))
    provision(context(cluster), CONFIG, REPLICA)
    assert cluster.holders(KEY) == ["a", "b"]


def test_a_released_replica_waits_one_pass_after_its_label_is_removed(cluster: FakeCluster) -> None:
    cluster.nodes["a"].spec.unschedulable = True
    provision(context(cluster), CONFIG, REPLICA)
    # The scheduler may have bound a pod by the label just before it went: not released yet.
    assert LABEL not in cluster.nodes["a"].metadata.labels
    assert cluster.holders(KEY) == ["a", "b"]
    provision(context(cluster), CONFIG, REPLICA)
    assert cluster.holders(KEY) == ["b"]


def test_a_deleted_node_is_released_at_once(cluster: FakeCluster) -> None:
    del cluster.nodes["a"]
    provision(context(cluster), CONFIG, REPLICA)
    assert cluster.holders(KEY) == ["b"]


def test_a_node_notready_within_the_grace_keeps_its_replica(cluster: FakeCluster) -> None:
    cluster.nodes["a"] = make_node("a", ready=False, unready_for=10, labels={LABEL: "true"})
    status = provision(context(cluster), CONFIG, REPLICA)
    assert cluster.holders(KEY) == ["a"]
    assert status.phase == VolumePhase.READY
    cluster.nodes["a"] = make_node("a", ready=False, unready_for=GRACE + 1, labels={LABEL: "true"})
    status = provision(context(cluster), CONFIG, REPLICA)
    assert [n["name"] for n in status.nodes or []] == ["b"]


def test_deletion_waits_for_pods_on_a_cordoned_node_but_not_for_a_lost_one(cluster: FakeCluster) -> None:
    cluster.nodes["a"].spec.unschedulable = True
    cluster.pods.append(running_pod("a"))
    remaining = cleanup(context(cluster), "S3", {}, deleting=True)
    assert remaining == ["old data of d on a is kept until pod(s) reader stop"]
    assert cluster.holders(KEY) == ["a"]
    cluster.nodes["a"] = make_node("a", ready=False, unready_for=GRACE + 1)
    assert cleanup(context(cluster), "S3", {}, deleting=True) == []
    assert cluster.holders(KEY) == []


def test_deletion_reports_a_release_deferred_after_unlabelling(cluster: FakeCluster) -> None:
    remaining = cleanup(context(cluster), "S3", {}, deleting=True)
    assert remaining == ["data of d on a is released once its node label is gone"]
    assert cluster.holders(KEY) == ["a"]
    assert cleanup(context(cluster), "S3", {}, deleting=True) == []
    assert cluster.holders(KEY) == []


def test_the_volumenode_of_a_node_deleted_while_the_controller_was_down_is_removed(
    cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    del cluster.nodes["a"]
    cleanup(context(cluster), "S3", {"d": "abc"}, deleting=False)
    assert "a" in cluster.vnodes  # its agent may still be shutting down: not yet
    monkeypatch.setattr(_nodelocal, "agent_gone", lambda view, name, watch=None: name == "a")
    cleanup(context(cluster), "S3", {"d": "abc"}, deleting=False)
    assert sorted(cluster.vnodes) == ["b"]


def test_labels_and_assignments_of_a_volumemanager_that_is_gone_are_collected(cluster: FakeCluster) -> None:
    cluster.nodes["b"].metadata.labels[LABEL] = "true"  # written by a pass that read a stale view
    sweeps = Throttle(30.0, FakeClock())
    collect_garbage(context(cluster), load(cluster), sweeps)
    assert LABEL in cluster.nodes["a"].metadata.labels  # the VolumeManager exists: all of it is kept...
    assert LABEL not in cluster.nodes["b"].metadata.labels  # ...but a label without an assignment
    assert cluster.holders(KEY) == ["a"]
    cluster.volumemanagers.clear()
    cluster.pods.append(running_pod("a"))
    collect_garbage(context(cluster), load(cluster), sweeps)
    assert cluster.holders(KEY) == ["a"]  # not due yet: once per 30 s
    sweeps = Throttle(30.0, FakeClock())
    collect_garbage(context(cluster), load(cluster), sweeps)
    assert LABEL not in cluster.nodes["a"].metadata.labels
    assert cluster.holders(KEY) == ["a"]  # a running pod still mounts the data
    cluster.pods.clear()
    sweeps = Throttle(30.0, FakeClock())
    collect_garbage(context(cluster), load(cluster), sweeps)
    assert cluster.holders(KEY) == []


def load(cluster: FakeCluster) -> ClusterView:
    return ClusterView.load(context(cluster))


def test_heartbeats_are_observed_once_per_view_however_many_passes_share_it(monkeypatch: pytest.MonkeyPatch) -> None:
    observed: list[int] = []

    class CountingWatch(HeartbeatWatch):
        def observe(self, volumenodes: Any, grace_seconds: float) -> None:
            observed.append(len(volumenodes))

    shared = ClusterView({}, {"a": {}, "b": {}})
    monkeypatch.setattr(_nodelocal, "HEARTBEATS", CountingWatch())
    monkeypatch.setattr(ClusterView, "load", classmethod(lambda cls, ctx: shared))
    for _ in range(3):
        assert _nodelocal.load_view(None) is shared  # type: ignore[arg-type]
    assert observed == [2]
    fresh = ClusterView({}, {"a": {}})
    monkeypatch.setattr(ClusterView, "load", classmethod(lambda cls, ctx: fresh))
    _nodelocal.load_view(None)  # type: ignore[arg-type]
    assert observed == [2, 1]


def _vnode(spec: list[tuple[str, str]], reports: list[tuple[str, str]], heartbeat: str = "t0") -> dict[str, Any]:
    """A VolumeNode with (replica, owner uid) assignments and (replica, phase) reports."""
    return {
        "spec": {"replicas": [{"name": name, "volumeManager": {"uid": uid}} for name, uid in spec]},
        "status": {"heartbeatTime": heartbeat, "replicas": [{"name": n, "phase": p} for n, p in reports]},
    }


def test_the_owners_whose_replicas_changed_on_a_volumenode() -> None:
    before = _vnode([("r1", "u1"), ("r2", "u2")], [("r1", "Fetching"), ("r2", "Ready")])
    # A heartbeat alone concerns nobody.
    assert (
        ClusterView.changed_owners(before, {**before, "status": {**before["status"], "heartbeatTime": "t1"}}) == set()
    )
    assert ClusterView.changed_owners(before, copy.deepcopy(before)) == set()
    # A report that moved: its owner only.
    reported = _vnode([("r1", "u1"), ("r2", "u2")], [("r1", "Ready"), ("r2", "Ready")], heartbeat="t1")
    assert ClusterView.changed_owners(before, reported) == {"u1"}
    # Assigned, released: the owner of each, also when the released one's report stays.
    moved = _vnode([("r1", "u1"), ("r3", "u3")], [("r1", "Fetching"), ("r2", "Ready")])
    assert ClusterView.changed_owners(before, moved) == {"u2", "u3"}
    # A VolumeNode that comes or goes concerns all its owners.
    assert ClusterView.changed_owners(None, before) == {"u1", "u2"}
    assert ClusterView.changed_owners(before, None) == {"u1", "u2"}


# --------------------------------------------------------------------------- the claim workloads mount


def test_a_volume_gets_a_local_pv_on_its_node_path_pinned_to_the_data_label_and_a_claim_bound_to_it(
    bare: FakeCluster,
) -> None:
    fake = bare
    status = provision(context(fake), CONFIG, REPLICA)
    volume_name, claim = _claims.object_names(OWNER, "d", "abc")
    assert claim == CLAIM
    pv = fake.volumes[volume_name]
    assert pv["spec"]["local"] == {"path": PATH}
    assert pv["spec"]["nodeAffinity"] == {
        "required": {"nodeSelectorTerms": [{"matchExpressions": [{"key": LABEL, "operator": "Exists"}]}]}
    }
    assert pv["spec"]["claimRef"] == {"namespace": "ns", "name": CLAIM, "uid": f"uid-{CLAIM}"}
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"  # deleting the PV never touches the data
    assert pv["spec"]["storageClassName"] == names.NODE_LOCAL_STORAGE_CLASS
    assert "mountOptions" not in pv["spec"]  # ReadWriteOnce: a writable mount is the user's choice
    made = fake.claims[CLAIM]
    assert made["spec"]["volumeName"] == volume_name
    assert made["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    assert made["metadata"]["labels"][names.LABEL_SOURCE_HASH] == "abc"
    # The claim is reported; the node path and the node affinity stay (the original contract).
    assert (status.claim_name, status.persistent_volume_name) == (CLAIM, volume_name)
    assert status.volume_source == {"hostPath": {"path": PATH, "type": "Directory"}}
    assert status.node_affinity == node_affinity(LABEL)


def test_a_read_only_volume_is_mounted_ro_by_the_kubelet_whatever_the_pod_asks(bare: FakeCluster) -> None:
    fake = bare
    read_only = CONFIG.model_copy(update={"access_mode": "ReadOnlyMany"})
    provision(context(fake), read_only, REPLICA)
    (pv,) = fake.volumes.values()
    assert pv["spec"]["mountOptions"] == ["ro"]
    assert pv["spec"]["accessModes"] == ["ReadOnlyMany"]


def test_ready_replicas_are_not_usable_until_their_claim_is_bound(cluster: FakeCluster) -> None:
    cluster.claims[CLAIM]["status"] = {"phase": "Pending"}
    status = provision(context(cluster), CONFIG, REPLICA)
    assert status.phase == VolumePhase.PROVISIONING
    assert f"waiting for claim {CLAIM} to bind" in status.message
    cluster.claims[CLAIM]["status"] = {"phase": "Bound"}
    assert provision(context(cluster), CONFIG, REPLICA).phase == VolumePhase.READY


def test_a_changed_source_keeps_the_old_claim_while_a_pod_mounts_it_then_removes_it_and_its_pv(
    cluster: FakeCluster,
) -> None:
    old_volume, old_claim = _claims.object_names(OWNER, "d", "abc")
    moved = CONFIG.model_copy(update={"options": {**CONFIG.options, "sourceURL": "s3://other/"}})
    source = S3Source()
    cluster.pods.append(running_pod("a", through_claim=True))
    kept = source.cleanup(context(cluster), {"d": moved})
    assert any(old_claim in note for note in kept)
    assert old_claim in cluster.claims
    assert old_volume in cluster.volumes
    assert cluster.holders(KEY) == ["a"]  # nor is the data under it released
    cluster.pods.clear()
    source.cleanup(context(cluster), {"d": moved})
    assert old_claim not in cluster.claims
    assert old_volume not in cluster.volumes


def test_cleanup_of_one_type_never_deletes_the_pv_of_another_types_current_volume(cluster: FakeCluster) -> None:
    # An HTTP volume's PV just made, its claim not listed yet: the S3 type's cleanup leaves it.
    http = VolumeConfig.model_validate({"id": "m", "sourceType": "HTTP", "options": {"url": "https://h/m.bin"}})
    digest = HTTPSource().digest(http)
    pv = _nodelocal.build_persistent_volume(OWNER, http, digest, path="/p", label="l")
    cluster.volumes[pv["metadata"]["name"]] = pv
    S3Source().cleanup(context(cluster), {"d": CONFIG, "m": http})
    assert pv["metadata"]["name"] in cluster.volumes
    S3Source().cleanup(context(cluster), {"d": CONFIG})  # gone from the spec: its PV goes
    assert pv["metadata"]["name"] not in cluster.volumes


# --------------------------------------------------------------------------- credentials, copied for the agents

WITH_SECRET = Replica(digest="abc", options={}, credentials_secret="aws-creds")
COPY = _credentials.copy_name(OWNER, "d")
KVC_CREDENTIALS = names.DEFAULT_CREDENTIALS_NAMESPACE


def user_secret(key: str = "AKIA1") -> dict[str, Any]:
    return {"metadata": {"name": "aws-creds"}, "data": {"awsAccessKeyID": key, "awsSecretAccessKey": "c2VjcmV0"}}


def test_the_agents_are_told_to_read_a_copy_of_the_secret_in_kvc_s_namespace(bare: FakeCluster) -> None:
    fake = bare
    fake.put_secret("ns", user_secret())
    provision(context(fake), CONFIG, WITH_SECRET)
    (entry,) = fake.vnodes["a"]["spec"]["replicas"]
    assert entry["credentialsSecret"] == {
        "namespace": KVC_CREDENTIALS,
        "name": COPY,
        "source": {"namespace": "ns", "name": "aws-creds"},
    }
    copied = fake.secrets[KVC_CREDENTIALS, COPY]
    assert copied["data"] == user_secret()["data"]
    assert copied["metadata"]["labels"][names.LABEL_VOLUMEMANAGER_UID] == OWNER.uid
    assert copied["metadata"]["annotations"][_credentials.ANNOTATION_SOURCE] == "ns/aws-creds"


def test_a_missing_secret_is_not_copied_and_is_copied_once_it_exists(bare: FakeCluster) -> None:
    fake = bare
    provision(context(fake), CONFIG, WITH_SECRET)
    assert (KVC_CREDENTIALS, COPY) not in fake.secrets  # the agent reports the user's Secret missing
    fake.put_secret("ns", user_secret())
    provision(context(fake), CONFIG, WITH_SECRET)
    assert (KVC_CREDENTIALS, COPY) in fake.secrets


def test_the_copy_follows_the_secret_while_fetching_and_is_not_read_once_every_replica_is_ready(
    cluster: FakeCluster,
) -> None:
    cluster.report("a", KEY, phase="Failed")  # wrong keys
    cluster.put_secret("ns", user_secret("AKIAWRONG"))
    provision(context(cluster), CONFIG, WITH_SECRET)
    cluster.put_secret("ns", user_secret("AKIARIGHT"))  # the user fixes the Secret
    provision(context(cluster), CONFIG, WITH_SECRET)
    assert cluster.secrets[KVC_CREDENTIALS, COPY]["data"]["awsAccessKeyID"] == "AKIARIGHT"
    # The entry assigned before copies existed (the tenant's Secret) now names the copy.
    (entry,) = cluster.vnodes["a"]["spec"]["replicas"]
    assert entry["credentialsSecret"]["namespace"] == KVC_CREDENTIALS
    cluster.report("a", KEY)  # Ready: no more reads of the user's Secret
    cluster.secret_reads.clear()
    provision(context(cluster), CONFIG, WITH_SECRET)
    assert ("ns", "aws-creds") not in cluster.secret_reads


def test_copies_go_with_their_volume_and_with_the_volumemanager(bare: FakeCluster) -> None:
    fake = bare
    fake.put_secret("ns", user_secret())
    provision(context(fake), CONFIG, WITH_SECRET)
    source = S3Source()
    source.cleanup(context(fake), {"d": CONFIG})
    assert (KVC_CREDENTIALS, COPY) in fake.secrets
    HTTPSource().cleanup(context(fake), {})  # another type's cleanup leaves S3's copies alone
    assert (KVC_CREDENTIALS, COPY) in fake.secrets
    invalid: dict[str, VolumeConfig | None] = {"d": None}
    source.cleanup(context(fake), invalid)  # kept until the config is fixed
    assert (KVC_CREDENTIALS, COPY) in fake.secrets
    public = CONFIG.model_copy(update={"options": {"sourceURL": "s3://b/"}})
    source.cleanup(context(fake), {"d": public})  # no Secret named any more
    assert (KVC_CREDENTIALS, COPY) not in fake.secrets
    provision(context(fake), CONFIG, WITH_SECRET)
    source.cleanup(context(fake), {}, deleting=True)
    assert (KVC_CREDENTIALS, COPY) not in fake.secrets
    assert ("ns", "aws-creds") in fake.secrets  # the user's own Secret is never touched


def test_copy_names_are_valid_and_distinct() -> None:
    long = VolumeManagerRef(namespace="n" * 63, name="v" * 253, uid="u")
    assert len(_credentials.copy_name(long, "i" * 63)) <= 63
    alike = [VolumeManagerRef("a-b", "c", "u1"), VolumeManagerRef("a", "b-c", "u1"), VolumeManagerRef("a", "b-c", "u2")]
    assert len({_credentials.copy_name(owner, "d") for owner in alike}) == 3


# --------------------------------------------------------------------------- the admin's policy


def other_entry(name: str, namespace: str = "ns") -> dict[str, Any]:
    return {
        "name": name,
        "volumeManager": {"namespace": namespace, "name": "other", "uid": f"uid-{name}"},
        "volumeId": "x",
        "sourceType": "S3",
        "sourceHash": "h",
        "path": f"/var/lib/kvc/{namespace}/other/x-h",
    }


def with_policy(cluster: FakeCluster, **limits: Any) -> SourceContext:
    return SourceContext(
        owner=OWNER, core=cluster, custom=cluster, agent_grace_seconds=GRACE, policy=AdminPolicy(**limits)
    )


def test_a_full_node_takes_no_new_replica_and_the_volume_says_which_cap(bare: FakeCluster) -> None:
    bare.vnodes["a"]["spec"]["replicas"] = [other_entry("one", "elsewhere"), other_entry("two", "elsewhere")]
    status = provision(with_policy(bare, max_replicas_per_node=2), CONFIG, REPLICA)
    assert status.phase == VolumePhase.PENDING
    assert "other nodes are 1 full (--max-replicas-per-node=2)" in status.message
    assert bare.holders(KEY) == []
    # Below the cap it goes there.
    assert provision(with_policy(bare, max_replicas_per_node=3), CONFIG, REPLICA).phase == VolumePhase.PROVISIONING
    assert bare.holders(KEY) == ["a"]


def test_assigning_never_passes_the_node_cap_whatever_a_pass_saw(bare: FakeCluster) -> None:
    """Two passes at once may both choose the last free slot of a node: the write checks again."""
    bare.vnodes["a"]["spec"]["replicas"] = [other_entry("one")]
    ctx = with_policy(bare, max_replicas_per_node=1)
    _nodelocal.assign(ctx, "a", {**other_entry("two")})
    assert [r["name"] for r in bare.vnodes["a"]["spec"]["replicas"]] == ["one"]
    # An entry already there is still updated (e.g. where its credentials are now).
    _nodelocal.assign(ctx, "a", {**other_entry("one"), "sourceHash": "new"})
    assert bare.vnodes["a"]["spec"]["replicas"][0]["sourceHash"] == "new"


def test_a_volume_over_the_namespace_cap_is_failed_and_assigned_nowhere(bare: FakeCluster) -> None:
    bare.nodes["b"] = make_node("b")
    bare.vnodes["b"] = make_vnode("b", replicas=[other_entry("mine-1"), other_entry("theirs", "other-team")])
    bare.vnodes["a"]["spec"]["replicas"] = [other_entry("mine-2")]
    two = CONFIG.model_copy(update={"replicas": 2})
    status = provision(with_policy(bare, max_replicas_per_namespace=3), two, REPLICA)
    assert status.phase == VolumePhase.FAILED
    assert status.message == (
        "namespace ns has 2 replicas of other volumes on nodes: 2 more would exceed the cluster admin's cap of 3 "
        "(controller flag --max-replicas-per-namespace); lower replicas or delete volumes no longer needed"
    )
    assert bare.holders(KEY) == []
    assert bare.claims == {}
    # Other namespaces' replicas do not count; within the cap it is placed.
    assert provision(with_policy(bare, max_replicas_per_namespace=4), two, REPLICA).phase != VolumePhase.FAILED
    assert bare.holders(KEY) == ["a", "b"]
    # Once placed, its own replicas are not counted against it.
    assert provision(with_policy(bare, max_replicas_per_namespace=4), two, REPLICA).phase != VolumePhase.FAILED


def test_a_toleration_the_admin_did_not_allow_fails_the_volume_before_placement(bare: FakeCluster) -> None:
    everything = CONFIG.model_copy(update={"tolerations": [{"operator": "Exists"}]})
    status = S3Source().provision(with_policy(bare), everything)
    assert status.phase == VolumePhase.FAILED
    assert "--allowed-toleration" in status.message
    assert bare.vnodes["a"]["spec"]["replicas"] == []
    allowed = with_policy(bare, tolerations=(TolerationRule.parse("*"),))
    assert S3Source().provision(allowed, everything).phase == VolumePhase.PROVISIONING


LONGEST_SECRET = ".".join(["s" * 63] * 3 + ["s" * 61])  # 253 characters


def worst_case(padding: int) -> VolumeConfig:
    """An S3 volume with every setting that goes into a VolumeNode as long as the API allows,
    in the characters that take the most bytes as stored, ``padding`` of them in sourceURL."""
    return VolumeConfig.model_validate(
        {
            "id": "i" * 63,
            "sourceType": "S3",
            "replicas": 1,
            "capacity": "0." + "0" * 58 + "1Gi",
            "options": {
                "sourceURL": "s3://bucket/" + "<" * padding,
                "awsCredentialsSecretName": LONGEST_SECRET,
                "endpointURL": "https://s3.example.com/" + "&" * 100,
                "region": ">" * 64,
                "timeoutForDataDownload": "1h",
                "unpack": "tar.gz",
                "distributionStrategy": json.dumps({"<" * 100: 1}),
                "dataPath": "/data/" + "<" * 100,
            },
        }
    )


def test_the_worst_case_assignment_stays_within_max_entry_bytes(bare: FakeCluster) -> None:
    source = S3Source()
    low, high = 0, MAX_COPIED_OPTIONS_BYTES
    while low < high:  # the longest sourceURL the limit on copied settings accepts
        middle = (low + high + 1) // 2
        low, high = (middle, high) if not source.validate(worst_case(middle)) else (low, middle - 1)
    config = worst_case(low)
    assert "at most 8192 are allowed" in "; ".join(source.validate(worst_case(low + 1)))
    owner = VolumeManagerRef(namespace="n" * 63, name="v" * 253, uid="0" * 36)
    bare.volumemanagers = [owner.uid]
    ctx = SourceContext(owner=owner, core=bare, custom=bare, agent_grace_seconds=GRACE, allowed_data_roots=("/data",))
    assert source.provision(ctx, config).phase == VolumePhase.PROVISIONING
    [entry] = bare.vnodes["a"]["spec"]["replicas"]
    assert entry["credentialsSecret"]["source"]["name"] == LONGEST_SECRET
    # The budget goes to the options but for the node path dataPath chose.
    assert stored_bytes(entry["options"]) > MAX_COPIED_OPTIONS_BYTES - 1024
    assert stored_bytes(entry) <= MAX_ENTRY_BYTES


def test_each_replica_carries_its_capacity_to_the_agent_and_a_raised_one_reaches_nodes_already_assigned(
    bare: FakeCluster,
) -> None:
    provision(context(bare), CONFIG, REPLICA)
    (entry,) = bare.vnodes["a"]["spec"]["replicas"]
    assert entry["capacity"] == "100Gi"  # none given: the controller's --default-capacity
    raised = CONFIG.model_copy(update={"capacity": "200Gi"})
    provision(context(bare), raised, REPLICA)
    (entry,) = bare.vnodes["a"]["spec"]["replicas"]
    assert entry["capacity"] == "200Gi"
