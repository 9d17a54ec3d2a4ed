"""Workloads admitted before their data can serve them: created with (or just before) their
VolumeManager, as one `kubectl apply -f` of a file holding both or a GitOps sync does, and
workloads asking for volumes placed on different nodes. None is lost, none lands without its
data, and other controllers' scheduling gates stay theirs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import statistics
import threading
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from e2e.helpers import VolumeManagers, restricted_pod, s3_config, wait_for
from e2e.kvc import KvcAgent, KvcController, KvcWebhook
from e2e.s3server import S3Server
from kvc.sources.registry import load_registry
from kvc.wiring.mutation import GATE
from webhook.index import ReadThrough, VolumeIndex, namespace_lister
from webhook.server import make_app, new_event_loop

PODS = 200
QUOTA_GATE = "example.com/quota"  # another controller's gate (Kueue adds its own the same way)
QUOTA_GATED = 20
CREATORS = 16  # concurrent clients, as a GitOps tool or `kubectl apply` of a large file


@pytest.fixture
def vms(
    api: Any, namespace: str, controller: KvcController, agents: dict[str, KvcAgent], webhook: KvcWebhook
) -> VolumeManagers:
    return VolumeManagers(api, namespace)


def volumemanager(s3: S3Server, bucket: str, replicas: int) -> list[dict[str, Any]]:
    return [s3_config(s3, bucket, replicas=replicas, volume_id="shards")]


def create_pods(
    api: Any, namespace: str, count: int, ref: str, prefix: str = "worker", quota_gated: int = 0
) -> dict[str, str]:
    """Create ``count`` pods asking for ``ref`` from several clients at once (the first
    ``quota_gated`` also held by another controller's gate, as Kueue does): name -> "admitted"
    or the API server's refusal message."""
    core = client.CoreV1Api(api)

    def create(i: int) -> tuple[str, str]:
        name = f"{prefix}-{i}"
        gates = [{"name": QUOTA_GATE}] if i < quota_gated else []
        try:
            core.create_namespaced_pod(namespace, restricted_pod(name, {"kvc/volume": ref}, schedulingGates=gates))
        except ApiException as exc:
            return name, str(exc.body)
        return name, "admitted"

    with concurrent.futures.ThreadPoolExecutor(CREATORS) as pool:
        return dict(pool.map(create, range(count)))


def test_a_volumemanager_and_200_pods_created_in_the_same_second_are_all_admitted_and_scheduled_on_data_nodes(
    vms: VolumeManagers, s3: S3Server, s3_data: str, api: Any, agents: dict[str, KvcAgent]
) -> None:
    core = client.CoreV1Api(api)
    scheduled_at: dict[str, float] = {}
    stop = threading.Event()

    def note_scheduled(pods: list[Any]) -> int:
        for pod in pods:
            if pod.spec.node_name:
                scheduled_at.setdefault(pod.metadata.name, time.monotonic())
        return len(scheduled_at)

    def watch_pods() -> None:  # when each pod was scheduled, to the watch's precision
        while not stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(core.list_namespaced_pod, vms.namespace, timeout_seconds=30):
                    note_scheduled([event["object"]])
                    if stop.is_set():
                        stream.stop()
            except Exception:  # a watch the API server ended early: the list in scheduled() still counts
                time.sleep(0.2)

    def scheduled(count: int) -> bool:
        return note_scheduled(core.list_namespaced_pod(vms.namespace).items) >= count

    def wait_scheduled(count: int, timeout: float) -> None:
        try:
            wait_for(lambda: scheduled(count), timeout=timeout, what=f"{count} pods scheduled", interval=1)
        except AssertionError as exc:
            waiting = [p for p in core.list_namespaced_pod(vms.namespace).items if not p.spec.node_name]
            example = waiting[0]
            raise AssertionError(
                f"{exc}: {len(waiting)} unscheduled, e.g. {example.metadata.name}: gates "
                f"{[g.name for g in example.spec.scheduling_gates or []]}, conditions "
                f"{[(c.type, c.reason, c.message) for c in example.status.conditions or []]}"
            ) from None

    watcher = threading.Thread(target=watch_pods, daemon=True)
    watcher.start()
    started = time.monotonic()
    vms.create("shards", volumemanager(s3, s3_data, replicas=len(agents)))
    results = create_pods(api, vms.namespace, PODS, "shards", quota_gated=QUOTA_GATED)
    created_in = time.monotonic() - started
    refused = {name: message for name, message in results.items() if message != "admitted"}
    assert not refused, f"{len(refused)} of {PODS} pods refused, e.g. {next(iter(refused.values()))}"
    assert created_in < 20  # the same burst, not a trickle that let the controller catch up

    pods = core.list_namespaced_pod(vms.namespace).items
    assert len(pods) == PODS
    # Created before their data: wired through the volume's claim and held at our gate.
    early = [
        p for p in pods if p.spec.scheduling_gates and {"name": GATE} in [g.to_dict() for g in p.spec.scheduling_gates]
    ]
    assert early, "no pod was created before the data was Ready: the test did not race the controller"
    claims = {
        tuple(v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim)
        for pod in pods
    }

    ready = vms.wait_state("shards", "Running", timeout=120)
    ready_at = time.monotonic()
    assert claims == {(ready["status"]["volumes"][0]["claimName"],)}
    holders = {n["name"] for n in ready["status"]["volumes"][0]["nodes"] if n.get("phase") == "Ready"}
    ours_only = PODS - QUOTA_GATED
    try:
        wait_scheduled(ours_only, timeout=120)
        after_ready = sorted(max(0.0, at - ready_at) for at in scheduled_at.values())
        # KVC released its own gate from the quota-held pods and left the other controller's.
        quota_held = [f"worker-{i}" for i in range(QUOTA_GATED)]
        for name in quota_held:
            pod = core.read_namespaced_pod(name, vms.namespace)
            assert [g.name for g in pod.spec.scheduling_gates or []] == [QUOTA_GATE], name
            assert pod.spec.node_name is None
            assert pod.spec.affinity is not None  # the data's node affinity is there already
        for name in quota_held:  # the quota is granted
            core.patch_namespaced_pod(name, vms.namespace, {"spec": {"schedulingGates": None}})
        wait_scheduled(PODS, timeout=60)
    finally:
        stop.set()
    placed = {p.metadata.name: p.spec.node_name for p in core.list_namespaced_pod(vms.namespace).items}
    assert set(placed.values()) <= holders, f"pods outside the data nodes {sorted(holders)}"
    assert not [p for p in core.list_namespaced_pod(vms.namespace).items if p.spec.scheduling_gates]
    print(
        f"\n{PODS} pods created in {created_in:.1f}s with their VolumeManager, {len(early)} gated; "
        f"the {len(after_ready)} held by KVC alone scheduled after Ready: "
        f"p50 {statistics.median(after_ready):.2f}s, max {after_ready[-1]:.2f}s"
    )


def test_pods_created_a_second_before_their_volumemanager_are_refused_only_while_it_does_not_exist(
    vms: VolumeManagers, s3: S3Server, s3_data: str, api: Any
) -> None:
    before = create_pods(api, vms.namespace, 20, "shards", prefix="early")
    for message in before.values():
        assert f"volume shards not found in namespace {vms.namespace}" in message, message
        assert "volumes there: none" in message
    time.sleep(1)
    vms.create("shards", volumemanager(s3, s3_data, replicas=1))
    after = create_pods(api, vms.namespace, 20, "shards", prefix="later")
    assert set(after.values()) == {"admitted"}, after
    (unknown,) = create_pods(api, vms.namespace, 1, "shards-typo", prefix="typo").values()
    assert "volume shards-typo not found" in unknown
    assert "volumes there: shards/shards" in unknown


def admission_review(namespace: str, ref: str) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "early-1",
            "operation": "CREATE",
            "namespace": namespace,
            "object": {"apiVersion": "v1", "kind": "Pod", **restricted_pod("early", {"kvc/volume": ref})},
        },
    }


def test_a_volumemanager_the_index_has_not_seen_yet_is_found_on_the_api_server(
    api: Any, namespace: str, kvc_crds: None, s3: S3Server
) -> None:
    """The webhook's index follows a watch, which can lag behind a create (a busy API server,
    a watch being re-established): admission then asks the API server before refusing."""
    lagging = VolumeIndex(registry=load_registry())
    lagging.replace_all([])  # listed before the VolumeManager existed; its watch delivers nothing
    VolumeManagers(api, namespace).create("shards", volumemanager(s3, "any-bucket", replicas=1))

    async def decide(read_through: ReadThrough | None, ref: str) -> dict[str, Any]:
        app = make_app(lagging, read_through=read_through)
        async with TestClient(TestServer(app)) as http:
            answer = await (await http.post("/mutate", json=admission_review(namespace, ref))).json()
            response: dict[str, Any] = answer["response"]
            return response

    def admission(read_through: ReadThrough | None, ref: str = "shards") -> dict[str, Any]:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(decide(read_through, ref))

    assert "volume shards not found" in admission(None)["status"]["message"]  # what a lagging index alone did
    read_through = ReadThrough(namespace_lister(api), lagging)
    assert admission(read_through)["allowed"] is True
    unknown = admission(read_through, "shards-typo")
    assert "volume shards-typo not found" in unknown["status"]["message"]
    assert "volumes there: shards/shards" in unknown["status"]["message"]


def zone_volume(s3: S3Server, bucket: str, volume_id: str, affinity: dict[str, Any]) -> dict[str, Any]:
    return {**s3_config(s3, bucket, replicas=1, volume_id=volume_id), "nodeAffinity": affinity}


def in_zone(zone: str, required: bool) -> dict[str, Any]:
    term = {"matchExpressions": [{"key": "kvc.test/zone", "operator": "In", "values": [zone]}]}
    if required:
        return {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}
    return {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "preference": term}]}


def test_volumes_placed_apart_are_brought_together_for_the_pod_that_needs_both(
    vms: VolumeManagers, s3: S3Server, s3_data: str, api: Any
) -> None:
    # images may only live on kvc-node-2 (zone-1); model prefers kvc-node-1 but may move. Both
    # nodes hold one of the two: kvc-node-1 comes first by name, but images may not go there.
    vms.create(
        "apart",
        [
            zone_volume(s3, s3_data, "images", in_zone("zone-1", required=True)),
            zone_volume(s3, s3_data, "model", in_zone("zone-0", required=False)),
        ],
    )
    status = vms.wait_state("apart", "Running", timeout=120)["status"]
    where = {v["id"]: [n["name"] for n in v["nodes"]] for v in status["volumes"]}
    assert where == {"images": ["kvc-node-2"], "model": ["kvc-node-1"]}
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(vms.namespace, restricted_pod("both", {"kvc/volume": "images,model"}))
    pod = core.read_namespaced_pod("both", vms.namespace)
    assert [g.name for g in pod.spec.scheduling_gates] == [GATE]  # no node could take it yet

    def told(text: str) -> str | None:
        # What `kubectl describe pod both` lists: Events whose involvedObject is the Pod.
        events = core.list_namespaced_event(
            vms.namespace, field_selector="involvedObject.kind=Pod,involvedObject.name=both,reason=DataApart"
        ).items
        return next((str(e.message) for e in events if text in str(e.message)), None)

    message = wait_for(lambda: told("model on kvc-node-2"), timeout=60, what="the pod told where its data meets")
    assert message.startswith("no node holds all of its volumes (images on kvc-node-2; model on kvc-node-1)")
    assert "placing a replica of model on kvc-node-2" in message

    scheduled = wait_for(
        lambda: (p := core.read_namespaced_pod("both", vms.namespace)).spec.node_name and p,
        timeout=120,
        what="the pod scheduled",
    )
    assert scheduled.spec.node_name == "kvc-node-2"
    assert not scheduled.spec.scheduling_gates
    # The move keeps the volume's replica count: once the pod is placed, model leaves kvc-node-1
    # (nothing reads it there) and stays where the pod reads it.
    wait_for(
        lambda: [n["name"] for n in vms.volume("apart", "model")["nodes"]] == ["kvc-node-2"],
        timeout=90,
        what="model held by kvc-node-2 alone",
    )
