"""Smoke tests proving the local control plane is real: schema validation by the API
server, scheduling by kube-scheduler, kwok-run pods, PV/PVC binding by the controller
manager, RBAC on ServiceAccount tokens, and an admission webhook called over TLS."""

from __future__ import annotations

import base64
import json
import signal
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from certs import pki
from e2e.cluster import ControlPlane, NodeSpec, pid_alive, reap_stale_workdirs
from e2e.helpers import restricted_pod, wait_for
from e2e.s3server import S3Server


def pod_manifest(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        **restricted_pod(name, **spec),
    }


# --------------------------------------------------------------------------- CRD schema

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.smoke.kvc.test"},
    "spec": {
        "group": "smoke.kvc.test",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1, "maximum": 10},
                                    "color": {"type": "string", "enum": ["red", "blue"]},
                                },
                                "x-kubernetes-validations": [
                                    {"rule": "self.size % 2 == 0", "message": "size must be even"}
                                ],
                            }
                        },
                    }
                },
            }
        ],
    },
}


@pytest.fixture(scope="module")
def widget_crd(api: Any) -> Iterator[None]:
    extensions = client.ApiextensionsV1Api(api)
    extensions.create_custom_resource_definition(WIDGET_CRD)

    def established() -> bool:
        crd = extensions.read_custom_resource_definition(WIDGET_CRD["metadata"]["name"])  # type: ignore[index]
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    wait_for(established, what="CRD Established")
    yield
    extensions.delete_custom_resource_definition(WIDGET_CRD["metadata"]["name"])  # type: ignore[index]


def _create_widget(api: Any, namespace: str, spec: dict[str, Any]) -> Any:
    body = {"apiVersion": "smoke.kvc.test/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": spec}
    return client.CustomObjectsApi(api).create_namespaced_custom_object(
        "smoke.kvc.test", "v1", namespace, "widgets", body
    )


@pytest.mark.usefixtures("widget_crd")
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"size": 100}, "spec.size: Invalid value: 100: spec.size in body should be less than or equal to 10"),
        ({"size": 2, "color": "green"}, 'spec.color: Unsupported value: "green"'),
        ({"color": "red"}, "spec.size: Required value"),
        ({"size": 3}, "size must be even"),
    ],
)
def test_crd_schema_rejects_invalid_object_with_its_message(
    api: Any, namespace: str, spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ApiException) as excinfo:
        _create_widget(api, namespace, spec)
    assert excinfo.value.status == 422
    assert message in json.loads(excinfo.value.body)["message"]


@pytest.mark.usefixtures("widget_crd")
def test_crd_accepts_valid_object_and_prunes_unknown_fields(api: Any, namespace: str) -> None:
    created = _create_widget(api, namespace, {"size": 4, "color": "blue", "unknown": "dropped"})
    assert created["spec"] == {"size": 4, "color": "blue"}


# --------------------------------------------------------------------------- scheduling


def test_scheduler_binds_pod_to_the_only_matching_node_and_kwok_runs_it(
    control_plane: ControlPlane, api: Any, namespace: str
) -> None:
    core = client.CoreV1Api(api)
    nodes = [n.metadata.name for n in core.list_node().items]
    assert len(nodes) >= 3
    target = sorted(nodes)[1]
    label = f"kvc.test/only-{uuid.uuid4().hex[:6]}"
    core.patch_node(target, {"metadata": {"labels": {label: "yes"}}})
    try:
        affinity = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [{"key": label, "operator": "In", "values": ["yes"]}]}]
                }
            }
        }
        core.create_namespaced_pod(namespace, pod_manifest("pinned", affinity=affinity))
        pod = wait_for(
            lambda: (p := core.read_namespaced_pod("pinned", namespace)).status.phase == "Running" and p,
            what="pod Running",
        )
        assert pod.spec.node_name == target
        scheduled = [c for c in pod.status.conditions if c.type == "PodScheduled"]
        assert scheduled
        assert scheduled[0].status == "True"
        events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=pinned").items
        assert any(e.reason == "Scheduled" and target in e.message for e in events), [e.message for e in events]
    finally:
        core.patch_node(target, {"metadata": {"labels": {label: None}}})


def test_pod_with_unsatisfiable_affinity_stays_pending(api: Any, namespace: str) -> None:
    core = client.CoreV1Api(api)
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "kvc.test/nowhere", "operator": "Exists"}]}]
            }
        }
    }
    core.create_namespaced_pod(namespace, pod_manifest("stranded", affinity=affinity))

    def unschedulable() -> bool:
        pod = core.read_namespaced_pod("stranded", namespace)
        return any(c.type == "PodScheduled" and c.reason == "Unschedulable" for c in pod.status.conditions or [])

    wait_for(unschedulable, what="PodScheduled=False/Unschedulable")
    assert core.read_namespaced_pod("stranded", namespace).spec.node_name is None


# --------------------------------------------------------------------------- PV / PVC


def test_controller_manager_binds_pv_and_pvc(api: Any, namespace: str) -> None:
    core = client.CoreV1Api(api)
    storage_class = f"kvc-smoke-{namespace}"
    pv_name = f"pv-{namespace}"
    core.create_persistent_volume(
        {
            "metadata": {"name": pv_name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": storage_class,
                "nfs": {"server": "nfs.example.invalid", "path": "/exports/data"},
            },
        }
    )
    try:
        core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "metadata": {"name": "claim"},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": storage_class,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )
        wait_for(
            lambda: core.read_namespaced_persistent_volume_claim("claim", namespace).status.phase == "Bound",
            what="PVC Bound",
        )
        pv = core.read_persistent_volume(pv_name)
        assert pv.status.phase == "Bound"
        assert pv.spec.claim_ref.namespace == namespace
        assert pv.spec.claim_ref.name == "claim"
    finally:
        core.delete_persistent_volume(pv_name)


# --------------------------------------------------------------------------- RBAC


def _token_client(control_plane: ControlPlane, token: str) -> Any:
    configuration = client.Configuration()
    configuration.host = control_plane.server
    configuration.ssl_ca_cert = str(control_plane.workdir / "pki" / "ca.crt")
    configuration.api_key = {"authorization": f"Bearer {token}"}
    return client.CoreV1Api(client.ApiClient(configuration))


def test_serviceaccount_token_is_denied_without_rbac_and_allowed_with_a_role(
    control_plane: ControlPlane, api: Any, namespace: str
) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    token = core.create_namespaced_service_account_token(
        "reader", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token
    as_reader = _token_client(control_plane, token)

    with pytest.raises(ApiException) as excinfo:
        as_reader.list_namespaced_secret(namespace)
    assert excinfo.value.status == 403
    assert f"system:serviceaccount:{namespace}:reader" in excinfo.value.body

    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "secret-reader"},
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reader-reads-secrets"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "secret-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )

    def allowed() -> bool:
        try:
            as_reader.list_namespaced_secret(namespace)
        except ApiException as exc:
            if exc.status == 403:
                return False
            raise
        return True

    wait_for(allowed, what="RoleBinding to take effect")
    # The Role grants only `list` on secrets in this namespace: nothing more.
    with pytest.raises(ApiException) as excinfo:
        as_reader.list_namespaced_config_map(namespace)
    assert excinfo.value.status == 403


# --------------------------------------------------------------------------- admission webhook


class _MutatingHandler(BaseHTTPRequestHandler):
    requests_seen: list[dict[str, Any]]

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests_seen.append(body)
        patch = [{"op": "add", "path": "/metadata/labels", "value": {"kvc.test/mutated": "by-webhook"}}]
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {
                "uid": body["request"]["uid"],
                "allowed": True,
                "patchType": "JSONPatch",
                "patch": base64.b64encode(json.dumps(patch).encode()).decode(),
            },
        }
        data = json.dumps(review).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def tls_webhook_server(tmp_path: Path) -> Iterator[tuple[str, bytes, list[dict[str, Any]]]]:
    ca = pki.new_ca("smoke-webhook-ca")
    serving = pki.new_serving_cert(ca, ["localhost"], ["127.0.0.1"])
    (tmp_path / "tls.crt").write_bytes(serving.cert_pem)
    (tmp_path / "tls.key").write_bytes(serving.key_pem)
    seen: list[dict[str, Any]] = []
    handler = type("Handler", (_MutatingHandler,), {"requests_seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}/mutate", ca.cert_pem, seen
    server.shutdown()
    server.server_close()


def test_api_server_calls_mutating_webhook_over_tls_and_stores_its_patch(
    api: Any, namespace: str, tls_webhook_server: tuple[str, bytes, list[dict[str, Any]]]
) -> None:
    url, ca_pem, seen = tls_webhook_server
    admission = client.AdmissionregistrationV1Api(api)
    core = client.CoreV1Api(api)
    name = f"smoke-{namespace}"
    admission.create_mutating_webhook_configuration(
        {
            "metadata": {"name": name},
            "webhooks": [
                {
                    "name": "smoke.kvc.test",
                    "clientConfig": {"url": url, "caBundle": base64.b64encode(ca_pem).decode()},
                    "rules": [
                        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}
                    ],
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "failurePolicy": "Fail",
                    "timeoutSeconds": 5,
                }
            ],
        }
    )
    try:
        # The API server picks up new webhook configurations asynchronously; a dry run
        # (allowed for sideEffects=None) shows when it does, without creating anything.
        wait_for(
            lambda: (
                core.create_namespaced_pod(namespace, pod_manifest("probe"), dry_run="All").metadata.labels or {}
            ).get("kvc.test/mutated"),
            what="webhook configuration to be active",
        )
        seen.clear()
        core.create_namespaced_pod(namespace, pod_manifest("mutated"))
        stored = core.read_namespaced_pod("mutated", namespace)
        assert stored.metadata.labels == {"kvc.test/mutated": "by-webhook"}
        assert len(seen) == 1
        request = seen[0]["request"]
        assert request["operation"] == "CREATE"
        assert request["namespace"] == namespace
        assert request["object"]["metadata"]["name"] == "mutated"
        assert request["dryRun"] is False
        # A pod in another namespace is outside the namespaceSelector: not sent to the webhook.
        other = client.CoreV1Api(api).create_namespaced_pod(
            "default", pod_manifest(f"untouched-{uuid.uuid4().hex[:6]}"), dry_run="All"
        )
        assert "kvc.test/mutated" not in (other.metadata.labels or {})
        assert len(seen) == 1
    finally:
        admission.delete_mutating_webhook_configuration(name)


def test_failing_webhook_with_fail_policy_rejects_the_pod(api: Any, namespace: str) -> None:
    admission = client.AdmissionregistrationV1Api(api)
    core = client.CoreV1Api(api)
    name = f"dead-{namespace}"
    ca = pki.new_ca("nobody")
    admission.create_mutating_webhook_configuration(
        {
            "metadata": {"name": name},
            "webhooks": [
                {
                    "name": "dead.kvc.test",
                    # Nothing listens there: the API server must not silently admit the pod.
                    "clientConfig": {
                        "url": "https://127.0.0.1:1/mutate",
                        "caBundle": base64.b64encode(ca.cert_pem).decode(),
                    },
                    "rules": [
                        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}
                    ],
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "failurePolicy": "Fail",
                    "timeoutSeconds": 2,
                }
            ],
        }
    )
    try:

        def rejected() -> str | None:
            try:
                core.create_namespaced_pod(namespace, pod_manifest("refused"), dry_run="All")
            except ApiException as exc:
                return str(json.loads(exc.body)["message"])
            return None

        message = wait_for(rejected, what="the dead webhook to reject pods")
        assert 'failed calling webhook "dead.kvc.test"' in message
        assert "connection refused" in message
    finally:
        admission.delete_mutating_webhook_configuration(name)


# --------------------------------------------------------------------------- S3 and harness hygiene


def test_s3_server_stores_and_serves_objects(s3: S3Server) -> None:
    s3_client = s3.client()
    bucket = f"smoke-{uuid.uuid4().hex[:8]}"
    s3_client.create_bucket(Bucket=bucket)
    s3_client.put_object(Bucket=bucket, Key="dir/hello.txt", Body=b"hello kvc")
    assert s3_client.get_object(Bucket=bucket, Key="dir/hello.txt")["Body"].read() == b"hello kvc"
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="dir/")
    assert [item["Key"] for item in listed["Contents"]] == ["dir/hello.txt"]


def test_kubectl_talks_to_the_control_plane(control_plane: ControlPlane) -> None:
    out = control_plane.kubectl("get", "nodes", "-o", "name").stdout.split()
    assert {"node/kvc-node-1", "node/kvc-node-2", "node/kvc-node-3"} <= set(out)
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.")


_KILLED_OWNER = """
import json, sys, time
from e2e.cluster import ControlPlane
plane = ControlPlane().start()
print(json.dumps({"workdir": str(plane.workdir), "pids": [p.pid for p in plane.processes.values()]}), flush=True)
time.sleep(600)
"""


@pytest.mark.usefixtures("control_plane")  # runs beside the session's control plane
def test_components_die_with_a_killed_owner_and_the_next_start_reaps_its_directory() -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", _KILLED_OWNER],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert owner.stdout is not None
        state = json.loads(owner.stdout.readline())
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    workdir = Path(state["workdir"])
    assert len(state["pids"]) == 5
    wait_for(
        lambda: not any(pid_alive(pid) for pid in state["pids"]), timeout=15, what="components to die with their owner"
    )
    assert workdir.exists()  # a SIGKILLed owner cannot clean up after itself ...
    assert workdir in reap_stale_workdirs(workdir.parent)  # ... so the next harness does
    assert not workdir.exists()


def test_second_control_plane_runs_beside_the_first_and_stop_leaves_nothing(control_plane: ControlPlane) -> None:
    second = ControlPlane().start()
    try:
        assert set(second.ports.values()).isdisjoint(control_plane.ports.values())
        assert second.core_v1().list_namespace().items  # answers on its own port
        pids = [process.pid for process in second.processes.values()]
        workdir = second.workdir
    finally:
        second.stop()
    assert not any(pid_alive(pid) for pid in pids)
    assert not workdir.exists()
    control_plane.check_alive()  # the first one was not disturbed


def test_simulated_nodes_carry_their_labels_taints_and_capacity(control_plane: ControlPlane, namespace: str) -> None:
    name = f"kvc-gpu-{uuid.uuid4().hex[:5]}"
    taint = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    control_plane.add_nodes([NodeSpec(name, labels={"accelerator": "a100"}, taints=[taint], cpu="4", pods="20")])
    core = control_plane.core_v1()
    try:
        node = core.read_node(name)
        assert node.metadata.labels["accelerator"] == "a100"
        assert [(t.key, t.value, t.effect) for t in node.spec.taints] == [("nvidia.com/gpu", "present", "NoSchedule")]
        assert node.status.allocatable["cpu"] == "4"
        assert node.status.allocatable["pods"] == "20"
        selector = {"accelerator": "a100"}
        core.create_namespaced_pod(namespace, pod_manifest("intolerant", nodeSelector=selector))
        tolerated = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        core.create_namespaced_pod(namespace, pod_manifest("tolerant", nodeSelector=selector, tolerations=tolerated))
        running = wait_for(
            lambda: (p := core.read_namespaced_pod("tolerant", namespace)).status.phase == "Running" and p,
            what="tolerating pod Running",
        )
        assert running.spec.node_name == name
        assert core.read_namespaced_pod("intolerant", namespace).spec.node_name is None  # the taint keeps it off
    finally:
        core.delete_node(name)
