"""The admission webhook called by the real API server over TLS, with kube-scheduler
placing the wired pods."""

from __future__ import annotations

import json
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from e2e.cluster import ControlPlane, NodeSpec
from e2e.helpers import (
    VolumeManagers,
    apply_training_crds,
    job,
    operator_pods,
    restricted_container,
    restricted_pod,
    s3_config,
    wait_for,
    wait_running,
    webhook_knows,
)
from e2e.kvc import KvcAgent, KvcController, KvcWebhook
from e2e.s3server import S3Server
from kvc.testing import strategies as pod_strategies
from kvc.wiring.mutation import GATE, INJECTED, MutationError, wire_pod


def annotated_pod(name: str, annotations: dict[str, str]) -> dict[str, Any]:
    return restricted_pod(name, annotations)


@pytest.fixture
def vms(
    api: Any, namespace: str, controller: KvcController, agents: dict[str, KvcAgent], webhook: KvcWebhook
) -> VolumeManagers:
    return VolumeManagers(api, namespace)


def test_annotated_pods_are_wired_and_scheduled_onto_the_data_nodes(
    vms: VolumeManagers, s3: S3Server, s3_data: str, api: Any
) -> None:
    vms.create("datasets", [s3_config(s3, s3_data)])
    volume = vms.wait_state("datasets", "Running", timeout=120)["status"]["volumes"][0]
    holders = {n["name"] for n in volume["nodes"]}
    core = client.CoreV1Api(api)
    # The namespace enforces `restricted`: a tenant's own hostPath, even to its own data, is refused...
    own = restricted_pod("own-path", volumes=[{"name": "data", "hostPath": volume["volumeSource"]["hostPath"]}])
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(vms.namespace, own)
    assert refused.value.status == 403
    message = json.loads(refused.value.body)["message"]
    assert 'violates PodSecurity "restricted:latest"' in message
    assert 'restricted volume types (volume "data" uses restricted volume type "hostPath")' in message
    # ...while KVC's wiring is admitted, and the pods are scheduled onto the data nodes.
    for i in range(6):
        core.create_namespaced_pod(vms.namespace, annotated_pod(f"trainer-{i}", {"kvc/volume": "cifar"}))

    for i in range(6):
        pod = wait_running(core, vms.namespace, f"trainer-{i}")
        assert pod.spec.node_name in holders
        (mount,) = pod.spec.containers[0].volume_mounts[-1:]
        assert mount.mount_path == "/var/datasets/cifar"
        assert mount.read_only is True
        kvc_volume = next(v for v in pod.spec.volumes if v.name == mount.name)
        # Through the volume's claim, read-only, in a namespace that enforces `restricted`.
        assert kvc_volume.host_path is None
        assert kvc_volume.persistent_volume_claim.claim_name == volume["claimName"]
        assert kvc_volume.persistent_volume_claim.read_only is True
        assert json.loads(pod.metadata.annotations[INJECTED]) == [mount.name]


def test_an_ephemeral_container_cannot_write_the_data_its_pod_reads(
    vms: VolumeManagers, s3: S3Server, s3_data: str, api: Any
) -> None:
    """`kubectl debug` on a wired pod, asking for a writable mount of its read-only data."""
    vms.create("datasets", [s3_config(s3, s3_data)])
    vms.wait_state("datasets", "Running", timeout=120)
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(vms.namespace, annotated_pod("reader", {"kvc/volume": "cifar"}))
    wait_running(core, vms.namespace, "reader")
    debugger = restricted_container(
        "debugger",
        volumeMounts=[{"name": "kvc-datasets-cifar", "mountPath": "/debug", "readOnly": False}],
    )
    patched = core.patch_namespaced_pod_ephemeralcontainers(
        "reader", vms.namespace, {"spec": {"ephemeralContainers": [debugger]}}
    )
    (added,) = patched.spec.ephemeral_containers
    assert [(m.mount_path, m.read_only) for m in added.volume_mounts] == [("/debug", True)]
    assert core.read_namespaced_pod("reader", vms.namespace).spec.ephemeral_containers[0].volume_mounts[0].read_only


def test_only_the_api_server_learns_from_the_webhook(
    vms: VolumeManagers, s3: S3Server, s3_data: str, webhook: KvcWebhook, api: Any, tmp_path: Path
) -> None:
    """A pod of another namespace that reaches the webhook's port and sends it an AdmissionReview
    naming this namespace learns nothing; the API server, presenting its client certificate, is
    answered (every admission in these tests goes that way)."""
    vms.create("datasets", [s3_config(s3, s3_data)])
    volume = vms.wait_state("datasets", "Running", timeout=120)["status"]["volumes"][0]
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "probe",
            "operation": "CREATE",
            "namespace": vms.namespace,
            "object": {"kind": "Pod", **annotated_pod("probe", {"kvc/volume": "nope"})},
        },
    }
    body = json.dumps(review).encode()
    context = ssl.create_default_context(cadata=webhook.ca.cert_pem.decode())
    request = urllib.request.Request(f"{webhook.url}/mutate", data=body, method="POST")  # noqa: S310
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, context=context, timeout=5)  # noqa: S310
    assert refused.value.code == 403
    answer = refused.value.read().decode()
    for secret in (vms.namespace, "datasets", "cifar", volume["volumeSource"]["hostPath"]["path"]):
        assert secret not in answer
    # The same review from the API server's side of the connection is answered, and lists
    # the namespace's volumes: what the certificate protects.
    cert, key = webhook.plane.webhook_client_cert
    context.load_cert_chain(cert, key)
    with urllib.request.urlopen(request, context=context, timeout=5) as response:  # noqa: S310
        answered = json.loads(response.read())["response"]
    assert "datasets/cifar" in answered["status"]["message"]


def test_a_plain_pod_is_admitted_unchanged(vms: VolumeManagers, api: Any) -> None:
    core = client.CoreV1Api(api)
    created = core.create_namespaced_pod(vms.namespace, annotated_pod("plain", {}))
    assert INJECTED not in (created.metadata.annotations or {})
    assert all(not v.name.startswith("kvc-") for v in created.spec.volumes or [])


def test_an_nfs_volume_arrives_as_a_pvc_mount(vms: VolumeManagers, api: Any) -> None:
    vms.create(
        "shared",
        [
            {
                "id": "scratch",
                "sourceType": "NFS",
                "accessMode": "ReadWriteMany",
                "options": {"server": "nfs.example.com", "path": "/x"},
            }
        ],
    )
    volume = vms.wait_state("shared", "Running")["status"]["volumes"][0]
    core = client.CoreV1Api(api)
    created = core.create_namespaced_pod(
        vms.namespace,
        annotated_pod("writer", {"kvc/volume": "scratch", "kvc/read-only": "false", "kvc/mount-path": "/scratch"}),
    )
    claim = next(v for v in created.spec.volumes if v.persistent_volume_claim is not None)
    assert claim.persistent_volume_claim.claim_name == volume["claimName"]
    assert created.spec.containers[0].volume_mounts[-1].mount_path == "/scratch"
    assert not created.spec.containers[0].volume_mounts[-1].read_only  # false is omitted by the API
    assert created.spec.affinity is None


def test_a_pod_for_data_still_downloading_is_gated(vms: VolumeManagers, s3: S3Server, s3_data: str, api: Any) -> None:
    vms.create("slow", [s3_config(s3, s3_data, replicas=9)])  # more replicas than nodes: never all Ready
    wait_for(lambda: vms.volume("slow", "cifar").get("volumeSource"), what="the volume to be reported")
    if vms.volume("slow", "cifar")["phase"] in ("Ready", "Degraded"):
        pytest.skip("the data became usable before the pod could be created")
    core = client.CoreV1Api(api)
    created = core.create_namespaced_pod(vms.namespace, annotated_pod("waiting", {"kvc/volume": "slow/cifar"}))
    assert [g.name for g in created.spec.scheduling_gates] == [GATE]


def test_a_pod_created_with_its_volumemanager_is_wired_to_the_claim_and_released_onto_the_data(
    vms: VolumeManagers, s3: S3Server, s3_data: str, webhook: KvcWebhook, api: Any, controller: KvcController
) -> None:
    """No waiting for the controller (stopped here): the claim's name follows from the spec."""
    core = client.CoreV1Api(api)
    controller.stop()
    try:
        vms.create("now", [s3_config(s3, s3_data)])
        wait_for(lambda: webhook_knows(core, vms.namespace, "now/cifar"), what="the webhook to index it")
        created = core.create_namespaced_pod(vms.namespace, annotated_pod("eager", {"kvc/volume": "now/cifar"}))
        assert [g.name for g in created.spec.scheduling_gates] == [GATE]
        assert "status" not in vms.get("now")  # nothing reported: the controller is down
    finally:
        controller.start()
    (claim,) = [v.persistent_volume_claim for v in created.spec.volumes if v.persistent_volume_claim]
    volume = vms.wait_state("now", "Running", timeout=120)["status"]["volumes"][0]
    assert claim.claim_name == volume["claimName"]  # the controller made the claim the webhook named
    running = wait_running(core, vms.namespace, "eager")
    assert running.spec.node_name in {n["name"] for n in volume["nodes"]}


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({"kvc/volume": "nope"}, "KVC: volume nope not found in namespace"),
        ({"kvc/volume": "cifar", "kvc/read-only": "maybe"}, 'KVC: kvc/read-only must be "true" or "false"'),
        ({"kvc/volume": "Bad_Id"}, "KVC: kvc/volume: 'Bad_Id' is not a volume id"),
    ],
)
def test_denials_reach_kubectl_with_their_message(
    vms: VolumeManagers, control_plane: ControlPlane, annotations: dict[str, str], message: str
) -> None:
    manifest = {"apiVersion": "v1", "kind": "Pod", **annotated_pod("denied", annotations)}
    result = control_plane.kubectl(
        "apply", "-n", vms.namespace, "-f", "-", input_text=json.dumps(manifest), check=False
    )
    assert result.returncode != 0
    assert 'admission webhook "volumes.kvc.kubeflow.org" denied the request' in result.stderr
    assert message in result.stderr


def test_a_gated_pod_is_released_onto_a_data_node_when_its_data_turns_ready(
    vms: VolumeManagers, s3: S3Server, s3_data: str, api: Any
) -> None:
    core = client.CoreV1Api(api)
    label = f"kvc.test/gate-{vms.namespace}"
    only_there = {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": label, "operator": "Exists"}]}]
        }
    }
    vms.create("later", [{**s3_config(s3, s3_data, replicas=1), "nodeAffinity": only_there}])
    wait_for(lambda: vms.volume("later", "cifar").get("phase") == "Pending", what="Pending: no eligible node yet")
    created = core.create_namespaced_pod(vms.namespace, annotated_pod("patient", {"kvc/volume": "cifar"}))
    assert [g.name for g in created.spec.scheduling_gates] == [GATE]
    target = sorted(n.metadata.name for n in core.list_node().items if n.metadata.name.startswith("kvc-node-"))[0]
    core.patch_node(target, {"metadata": {"labels": {label: "yes"}}})
    try:
        pod = wait_running(core, vms.namespace, "patient", timeout=120)
        assert pod.spec.node_name == target
        assert not pod.spec.scheduling_gates
        expressions = (
            pod.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution.node_selector_terms[
                0
            ].match_expressions
        )
        assert any(e.key.startswith("data.kvc.kubeflow.org/") for e in expressions)
    finally:
        core.patch_node(target, {"metadata": {"labels": {label: None}}})


def test_each_denial_reaches_kubectl_with_what_to_fix(
    vms: VolumeManagers, control_plane: ControlPlane, api: Any
) -> None:
    nfs = {"sourceType": "NFS", "accessMode": "ReadWriteMany", "options": {"server": "nfs.example.com", "path": "/x"}}
    vms.create("team-a", [{"id": "scratch", **nfs}, {"id": "broken", **nfs, "accessMode": "ReadWriteOnce"}])
    vms.create("team-b", [{"id": "scratch", **nfs}])
    nowhere = {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "kvc.test/no-such-label", "operator": "Exists"}]}]
        }
    }
    vms.create(
        "later",
        [
            {
                "id": "cifar",
                "sourceType": "S3",
                "accessMode": "ReadOnlyMany",
                "nodeAffinity": nowhere,
                "options": {
                    "sourceURL": "s3://nowhere/cifar/",
                    "endpointURL": "http://127.0.0.1:9",
                    "awsCredentialsSecretName": "aws-creds",  # never read: no node is eligible
                },
            }
        ],
    )
    core = client.CoreV1Api(api)
    other = f"{vms.namespace}-other"
    core.create_namespace({"metadata": {"name": other, "labels": {"kvc.test/e2e": "true"}}})
    try:
        VolumeManagers(api, other).create("elsewhere", [{"id": "private", **nfs}])
        broken = wait_for(
            lambda: vms.volume("team-a", "broken").get("phase") == "Failed" and vms.volume("team-a", "broken"),
            what="broken to fail",
        )
        wait_for(lambda: vms.volume("later", "cifar").get("volumeSource"), what="later/cifar to be reported")
        wait_for(lambda: vms.volume("team-b", "scratch").get("volumeSource"), what="team-b/scratch to be reported")
        wait_for(lambda: vms.volume("team-a", "scratch").get("volumeSource"), what="team-a/scratch to be reported")
        ns = vms.namespace
        own_mount = {
            "containers": [
                restricted_container(volumeMounts=[{"name": "cache", "mountPath": "/var/datasets/scratch"}])
            ],
            "volumes": [{"name": "cache", "emptyDir": {}}],
        }
        cases: list[tuple[dict[str, str], dict[str, Any], str]] = [
            (
                {"kvc/volume": "scratch"},
                {},
                f"volume scratch is in several VolumeManagers of {ns}: write team-a/scratch or team-b/scratch",
            ),
            ({"kvc/volume": "team-a/broken"}, {}, f"volume team-a/broken is Failed: {broken['message']}"),
            (
                {"kvc/volume": "private"},
                {},
                f"volume private not found in namespace {ns}; volumes there: "
                "later/cifar, team-a/broken, team-a/scratch, team-b/scratch",
            ),
            (
                {"kvc/volume": f"{other}/elsewhere/private"},
                {},
                f"kvc/volume: '{other}/elsewhere/private' has more than one '/': write <id> or "
                "<volumemanager>/<id> (volumes are found in the workload's own namespace only)",
            ),
            (
                {"kvc/volume": "later/cifar"},
                {"nodeName": "kvc-node-1"},
                "the pod sets spec.nodeName, so it cannot wait for later/cifar to be provisioned",
            ),
            (
                {"kvc/volume": "team-a/scratch"},
                own_mount,
                "container main already mounts cache at /var/datasets/scratch: choose another path with "
                "kvc/mount-path.scratch",
            ),
            (
                {"kvc/volume": "later/cifar", "kvc/read-only": "false"},
                {},
                'volume later/cifar is ReadOnlyMany: kvc/read-only "false" is not allowed',
            ),
            (
                {"kvc/volume": "team-a/scratch", "kvc/containers": "ghost"},
                {},
                "kvc/containers names ghost, which the pod does not have (main)",
            ),
            ({"kvc/volume": "team-a/scratch", "kvc/mount-paht": "/x"}, {}, "unknown annotation kvc/mount-paht"),
        ]
        wrong = []
        for annotations, spec, message in cases:
            manifest = {"apiVersion": "v1", "kind": "Pod", **annotated_pod("denied", annotations)}
            manifest["spec"].update(spec)
            result = control_plane.kubectl("create", "-n", ns, "-f", "-", input_text=json.dumps(manifest), check=False)
            expected = f'admission webhook "volumes.kvc.kubeflow.org" denied the request: KVC: {message}'
            if result.returncode == 0 or expected not in result.stderr:
                wrong.append(f"{annotations} {spec}: {result.stderr.strip() or 'admitted'}")
        assert not wrong, "\n".join(wrong)
        # The same volume, asked for from its own namespace, is admitted.
        core.create_namespaced_pod(other, annotated_pod("owner", {"kvc/volume": "private"}))
    finally:
        core.delete_namespace(other)


@pytest.mark.pod_security("privileged")  # the strategy's pods have hostPath volumes of their own
def test_wired_pods_of_every_shape_are_valid_for_the_api_server(webhook: KvcWebhook, api: Any, namespace: str) -> None:
    """The property-test strategy's wired pods, created (dry run) through the real API server."""
    core = client.CoreV1Api(api)
    checked: list[int] = []

    @settings(
        max_examples=40, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(pod_strategies.cases())
    def valid(case: pod_strategies.Case) -> None:
        try:
            wired = wire_pod(case.pod, case.request, case.volumes)
        except MutationError:
            return
        core.create_namespaced_pod(namespace, wired, dry_run="All")
        checked.append(1)

    valid()
    assert len(checked) >= 20  # most generated cases are wirable


def test_a_volume_turning_ready_is_used_by_the_next_admission_within_a_second(
    vms: VolumeManagers, s3: S3Server, s3_data: str, api: Any
) -> None:
    ids = [f"v{i}" for i in range(4)]
    vms.create("fresh", [s3_config(s3, s3_data, replicas=1, volume_id=v) for v in ids])
    seen_ready: dict[str, float] = {}
    stop = threading.Event()

    def watch_status() -> None:
        stream = watch.Watch()
        for event in stream.stream(
            vms.custom.list_namespaced_custom_object,
            "kvc.kubeflow.org",
            "v1",
            vms.namespace,
            "volumemanagers",
            timeout_seconds=120,
        ):
            for volume in (event["object"].get("status") or {}).get("volumes", []):
                if volume.get("phase") in ("Ready", "Degraded") and volume.get("nodeAffinity"):
                    seen_ready.setdefault(volume["id"], time.monotonic())
            if stop.is_set() or len(seen_ready) == len(ids):
                stream.stop()

    watcher = threading.Thread(target=watch_status, daemon=True)
    watcher.start()
    core = client.CoreV1Api(api)
    lag: dict[str, float] = {}
    deadline = time.monotonic() + 120
    try:
        while len(lag) < len(ids) and time.monotonic() < deadline:
            for volume_id in ids:
                if volume_id in lag:
                    continue
                try:
                    pod = core.create_namespaced_pod(
                        vms.namespace, annotated_pod("probe", {"kvc/volume": f"fresh/{volume_id}"}), dry_run="All"
                    )
                except ApiException as exc:
                    if "has no volume source yet" in str(exc.body):
                        continue  # not reported by the controller yet
                    raise
                if pod.spec.affinity is not None and not pod.spec.scheduling_gates:
                    lag[volume_id] = time.monotonic() - seen_ready.get(volume_id, time.monotonic())
            time.sleep(0.02)
    finally:
        stop.set()
    assert set(lag) == set(ids), f"not wired in time: {sorted(set(ids) - set(lag))}"
    print(
        f"\nReady status seen by a watcher -> wired by the next admission: "
        f"max {max(lag.values()) * 1000:.0f} ms over {len(lag)} volumes"
    )
    assert max(lag.values()) < 1.0


@pytest.fixture(scope="module")
def training_crds(control_plane: ControlPlane, kvc_crds: None) -> None:
    apply_training_crds(control_plane)


def test_training_jobs_are_wired_and_their_pods_land_on_the_data_nodes(
    vms: VolumeManagers, s3: S3Server, s3_data: str, api: Any, training_crds: None
) -> None:
    vms.create("datasets", [s3_config(s3, s3_data)])
    volume = vms.wait_state("datasets", "Running", timeout=120)["status"]["volumes"][0]
    holders = {n["name"] for n in volume["nodes"]}
    custom = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)
    ns = vms.namespace
    custom.create_namespaced_custom_object(
        "kubeflow.org",
        "v1",
        ns,
        "tfjobs",
        job("TFJob", "resnet", {"Chief": 1, "Worker": 2}, {"kvc/volume": "cifar", "kvc/mount-path": "/data"}),
    )
    custom.create_namespaced_custom_object(
        "kubeflow.org",
        "v1",
        ns,
        "pytorchjobs",
        job(
            "PyTorchJob",
            "bert",
            {"Master": 1, "Worker": 2},
            {},
            template_annotations={"Worker": {"kvc/volume": "datasets/cifar"}},
        ),
    )

    tfjob = custom.get_namespaced_custom_object("kubeflow.org", "v1", ns, "tfjobs", "resnet")
    for role in ("Chief", "Worker"):
        template = tfjob["spec"]["tfReplicaSpecs"][role]["template"]
        assert template["metadata"]["annotations"]["kvc/volume"] == "cifar"
        assert template["metadata"]["annotations"]["kvc/mount-path"] == "/data"
        assert json.loads(template["metadata"]["annotations"][INJECTED]) == ["kvc-datasets-cifar"]
        assert template["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == "/data"
    pytorchjob = custom.get_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", "bert")
    master = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert "volumeMounts" not in master["spec"]["containers"][0]  # only the Worker template asked

    created = [core.create_namespaced_pod(ns, p) for p in [*operator_pods(tfjob), *operator_pods(pytorchjob)]]
    assert len(created) == 6
    for pod in created:
        wired = pod.metadata.name != "bert-master-0"
        kvc_volumes = [v for v in pod.spec.volumes if v.name == "kvc-datasets-cifar"]
        assert len(kvc_volumes) == (1 if wired else 0)  # the second pass added nothing
        if wired:
            assert len(pod.spec.containers[0].volume_mounts) == 2  # the data and the service account token
    for pod in created:
        running = wait_running(core, ns, pod.metadata.name)
        if running.metadata.name != "bert-master-0":
            assert running.spec.node_name in holders


@pytest.fixture(scope="module")
def two_more_nodes(control_plane: ControlPlane, kvc_crds: None) -> Iterator[list[str]]:
    """kvc-node-4 and kvc-node-5 with their agents: five nodes for the placement tests below."""
    extra = [NodeSpec(f"kvc-node-{i}", labels={"kvc.test/zone": f"zone-{i - 1}"}) for i in (4, 5)]
    control_plane.add_nodes(extra)
    started = [KvcAgent(control_plane, spec.name).start() for spec in extra]
    for agent in started:
        agent.wait_reporting()
    yield [spec.name for spec in extra]
    core = control_plane.core_v1()
    for agent in started:
        agent.stop()
        core.delete_node(agent.node)


def test_twenty_pods_land_on_the_two_data_nodes_of_five(
    two_more_nodes: list[str], vms: VolumeManagers, s3: S3Server, s3_data: str, api: Any
) -> None:
    core = client.CoreV1Api(api)
    assert len([n for n in core.list_node().items if n.metadata.name.startswith("kvc-node-")]) == 5
    vms.create("datasets", [s3_config(s3, s3_data, replicas=2)])
    volume = vms.wait_state("datasets", "Running", timeout=120)["status"]["volumes"][0]
    holders = {n["name"] for n in volume["nodes"]}
    assert len(holders) == 2
    for i in range(20):
        core.create_namespaced_pod(vms.namespace, annotated_pod(f"worker-{i}", {"kvc/volume": "cifar"}))

    def bound() -> list[Any] | None:
        pods = core.list_namespaced_pod(vms.namespace).items
        return pods if len(pods) == 20 and all(p.spec.node_name for p in pods) else None

    pods = wait_for(bound, timeout=120, what="20 pods bound")
    placed = {p.metadata.name: p.spec.node_name for p in pods}
    assert set(placed.values()) <= holders, placed


def test_a_pod_needing_two_volumes_lands_on_the_one_node_holding_both(
    two_more_nodes: list[str], vms: VolumeManagers, s3: S3Server, s3_data: str, api: Any
) -> None:
    def zones(*names: str) -> dict[str, Any]:
        return {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "kvc.test/zone", "operator": "In", "values": list(names)}]}
                ]
            }
        }

    vms.create(
        "pair",
        [
            {**s3_config(s3, s3_data, replicas=2, volume_id="cifar"), "nodeAffinity": zones("zone-0", "zone-1")},
            {**s3_config(s3, s3_data, replicas=2, volume_id="coco"), "nodeAffinity": zones("zone-1", "zone-3")},
        ],
    )
    status = vms.wait_state("pair", "Running", timeout=120)["status"]
    holders = [{n["name"] for n in v["nodes"]} for v in status["volumes"]]
    assert holders[0] & holders[1] == {"kvc-node-2"}
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(vms.namespace, annotated_pod("both", {"kvc/volume": "cifar,coco"}))
    pod = wait_running(core, vms.namespace, "both")
    assert pod.spec.node_name == "kvc-node-2"
    assert {m.mount_path for m in pod.spec.containers[0].volume_mounts} >= {"/var/datasets/cifar", "/var/datasets/coco"}


def test_a_source_change_keeps_job_pods_and_gated_pods_on_the_data_they_were_wired_with(
    vms: VolumeManagers,
    s3: S3Server,
    s3_data: str,
    api: Any,
    training_crds: None,
    agents: dict[str, KvcAgent],
) -> None:
    """A TFJob and a bare pod wired (and gated) for a source that changes before its data is
    Ready: they still run, on that data, and so do the job's pods created after the change."""
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    ns = vms.namespace
    for prefix in ("cifar", "cifar-v2"):
        s3.client().put_object(Bucket=s3_data, Key=f"{prefix}/only-in-{prefix}.txt", Body=prefix.encode())
    # Agents stopped: the earlier source's replicas are assigned (their heartbeats are fresh)
    # but nothing is fetched, so the pods below are gated on it when the source changes.
    for agent in agents.values():
        agent.stop()
    try:
        vms.create("changing", [s3_config(s3, s3_data)])
        earlier = wait_for(lambda: vms.volume("changing", "cifar").get("claimName"), what="the earlier claim")
        custom.create_namespaced_custom_object(
            "kubeflow.org", "v1", ns, "tfjobs", job("TFJob", "resnet", {"Worker": 2}, {"kvc/volume": "cifar"})
        )
        early = core.create_namespaced_pod(ns, annotated_pod("early", {"kvc/volume": "cifar"}))
        assert [g.name for g in early.spec.scheduling_gates] == [GATE]
        changed = s3_config(s3, s3_data)
        changed["options"]["sourceURL"] = f"s3://{s3_data}/cifar-v2/"
        vms.set_volumes("changing", [changed])
        wait_for(lambda: vms.volume("changing", "cifar").get("claimName") not in (None, earlier), what="a new claim")
    finally:
        for agent in agents.values():
            agent.start()
    volume = vms.wait_state("changing", "Running", timeout=120)["status"]["volumes"][0]
    assert volume["claimName"] != earlier
    tfjob = custom.get_namespaced_custom_object("kubeflow.org", "v1", ns, "tfjobs", "resnet")
    # The operator makes the job's pods after the change, from the templates wired before it.
    workers = [core.create_namespaced_pod(ns, pod) for pod in operator_pods(tfjob)]
    later = core.create_namespaced_pod(ns, annotated_pod("later", {"kvc/volume": "cifar"}))
    for name in ["early", *(w.metadata.name for w in workers)]:
        pod = wait_running(core, ns, name, timeout=120)
        (claim,) = [v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim]
        assert claim == earlier, f"{name} was moved off the data it was wired with"
        node = core.read_node(pod.spec.node_name)
        data = [k for k in node.metadata.labels if k.startswith("data.kvc.kubeflow.org/")]
        assert data, f"{name} runs on {pod.spec.node_name}, which holds no data"
    new_pod = wait_running(core, ns, "later", timeout=120)
    assert [v.persistent_volume_claim.claim_name for v in new_pod.spec.volumes if v.persistent_volume_claim] == [
        volume["claimName"]
    ]
    assert later.spec.scheduling_gates is None  # the new data is Ready: wired and placed at once
    # The earlier data is reported as kept, and goes once the job and its pods are gone.
    wait_for(
        lambda: "tfjob/resnet" in vms.get("changing")["status"].get("message", ""),
        what="the status to say the job keeps the earlier data",
    )
    custom.delete_namespaced_custom_object("kubeflow.org", "v1", ns, "tfjobs", "resnet")
    for name in ["early", *(w.metadata.name for w in workers)]:
        core.delete_namespaced_pod(name, ns, grace_period_seconds=0)

    def earlier_claim_gone() -> bool:
        return earlier not in [c.metadata.name for c in core.list_namespaced_persistent_volume_claim(ns).items]

    wait_for(earlier_claim_gone, timeout=90, what="the earlier claim removed once nothing refers to it")
