"""Workloads created with, or just before, their VolumeManager: one `kubectl apply -f` of a
file holding both, or a GitOps sync, must lose none of them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from e2e.cluster import ControlPlane
from e2e.helpers import VolumeManagers, restricted_pod, wait_for
from e2e.kvc import KvcAgent, KvcController, KvcWebhook
from e2e.s3server import S3Server, credentials_secret
from kvc.sources.registry import load_registry
from webhook.index import ReadThrough, VolumeIndex, namespace_lister
from webhook.mutation import GATE
from webhook.server import make_app, new_event_loop

PODS = 200
CREATORS = 16  # concurrent clients, as a GitOps tool or `kubectl apply` of a large file


@pytest.fixture(scope="module")
def webhook(control_plane: ControlPlane, api: Any, kvc_crds: None) -> Iterator[KvcWebhook]:
    running = KvcWebhook(control_plane, name="kvc-webhook-early").start()
    with running.registered(api):
        yield running
    running.stop()


@pytest.fixture
def vms(
    api: Any, namespace: str, controller: KvcController, agents: dict[str, KvcAgent], webhook: KvcWebhook
) -> VolumeManagers:
    return VolumeManagers(api, namespace)


@pytest.fixture
def bucket(s3: S3Server, api: Any, namespace: str) -> str:
    name = f"early-{namespace}"
    s3.client().create_bucket(Bucket=name)
    for i in range(10):
        s3.client().put_object(Bucket=name, Key=f"data/{i}.bin", Body=bytes([i]) * 4096)
    client.CoreV1Api(api).create_namespaced_secret(namespace, credentials_secret("aws-creds"))
    return name


def volumemanager(s3: S3Server, bucket: str, replicas: int) -> list[dict[str, Any]]:
    return [
        {
            "id": "shards",
            "sourceType": "S3",
            "replicas": replicas,
            "accessMode": "ReadOnlyMany",
            "options": {
                "sourceURL": f"s3://{bucket}/data/",
                "endpointURL": s3.endpoint_url,
                "awsCredentialsSecretName": "aws-creds",
            },
        }
    ]


def create_pods(api: Any, namespace: str, count: int, ref: str, prefix: str = "worker") -> dict[str, str]:
    """Create ``count`` pods asking for ``ref`` from several clients at once: name -> "admitted"
    or the API server's refusal message."""
    core = client.CoreV1Api(api)

    def create(i: int) -> tuple[str, str]:
        name = f"{prefix}-{i}"
        try:
            core.create_namespaced_pod(namespace, restricted_pod(name, {"kvc/volume": ref}))
        except ApiException as exc:
            return name, str(exc.body)
        return name, "admitted"

    with concurrent.futures.ThreadPoolExecutor(CREATORS) as pool:
        return dict(pool.map(create, range(count)))


def test_a_volumemanager_and_200_pods_created_in_the_same_second_are_all_admitted_and_scheduled_on_data_nodes(
    vms: VolumeManagers, s3: S3Server, bucket: str, api: Any, agents: dict[str, KvcAgent]
) -> None:
    core = client.CoreV1Api(api)
    scheduled_at: dict[str, float] = {}
    stop = threading.Event()

    def watch_pods() -> None:
        stream = watch.Watch()
        for event in stream.stream(core.list_namespaced_pod, vms.namespace, timeout_seconds=300):
            pod = event["object"]
            if pod.spec.node_name:
                scheduled_at.setdefault(pod.metadata.name, time.monotonic())
            if stop.is_set():
                stream.stop()

    watcher = threading.Thread(target=watch_pods, daemon=True)
    watcher.start()
    started = time.monotonic()
    vms.create("shards", volumemanager(s3, bucket, replicas=len(agents)))
    results = create_pods(api, vms.namespace, PODS, "shards")
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
    try:
        wait_for(lambda: len(scheduled_at) == PODS, timeout=120, what=f"all {PODS} pods scheduled")
    finally:
        stop.set()
    placed = {p.metadata.name: p.spec.node_name for p in core.list_namespaced_pod(vms.namespace).items}
    assert set(placed.values()) <= holders, f"pods outside the data nodes {sorted(holders)}"
    assert not [p for p in core.list_namespaced_pod(vms.namespace).items if p.spec.scheduling_gates]
    after_ready = sorted(max(0.0, scheduled_at[name] - ready_at) for name in placed)
    print(
        f"\n{PODS} pods created in {created_in:.1f}s with their VolumeManager, "
        f"{len(early)} gated; scheduled after Ready: p50 {statistics.median(after_ready):.2f}s, "
        f"max {after_ready[-1]:.2f}s"
    )


def test_pods_created_a_second_before_their_volumemanager_are_refused_only_while_it_does_not_exist(
    vms: VolumeManagers, s3: S3Server, bucket: str, api: Any
) -> None:
    before = create_pods(api, vms.namespace, 20, "shards", prefix="early")
    for message in before.values():
        assert f"volume shards not found in namespace {vms.namespace}" in message, message
        assert "volumes there: none" in message
    time.sleep(1)
    vms.create("shards", volumemanager(s3, bucket, replicas=1))
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
    registry = load_registry()
    lagging = VolumeIndex(registry=registry)
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
    read_through = ReadThrough(namespace_lister(api), registry=registry)
    assert admission(read_through)["allowed"] is True
    unknown = admission(read_through, "shards-typo")
    assert "volume shards-typo not found" in unknown["status"]["message"]
    assert "volumes there: shards/shards" in unknown["status"]["message"]
