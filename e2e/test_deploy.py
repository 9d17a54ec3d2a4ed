"""deploy/ as an admin installs it: kustomize renders it and the real API server acts on it."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from certs import pki
from e2e.cluster import Component, ControlPlane, free_port
from e2e.helpers import (
    VolumeManagers,
    apply_training_crds,
    apply_workload_crds,
    create_workload,
    job,
    jobset,
    leaderworkerset,
    restricted_pod,
    trainjob,
    wait_for,
)
from e2e.kvc import KvcAgent, KvcController
from e2e.s3server import S3Server, credentials_secret
from kvc.api import names

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def render(plane: ControlPlane, directory: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(plane.kubectl("kustomize", str(directory)).stdout) if doc]


def pod(name: str, annotations: dict[str, str]) -> dict[str, Any]:
    return restricted_pod(name, annotations)


def test_failure_policy_refuses_only_kvc_workloads_and_the_ignore_component_admits_them(
    control_plane: ControlPlane, api: Any, namespace: str, tmp_path: Path
) -> None:
    (default,) = render(control_plane, DEPLOY / "webhook")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize takes relative paths only.
                "resources": [os.path.relpath(DEPLOY / "webhook", overlay)],
                "components": [os.path.relpath(DEPLOY / "components" / "webhook-failure-ignore", overlay)],
            }
        )
    )
    (ignoring,) = render(control_plane, overlay)
    assert [hook["failurePolicy"] for hook in default["webhooks"]] == ["Fail", "Fail"]
    assert [hook["failurePolicy"] for hook in ignoring["webhooks"]] == ["Ignore", "Ignore"]

    # The rendered registration, aimed at a port where nothing listens (an outage), and at
    # this test's namespace only.
    ca = pki.new_ca("unreachable")
    for hook in default["webhooks"]:
        hook["clientConfig"] = {"url": "https://127.0.0.1:1/mutate", "caBundle": base64.b64encode(ca.cert_pem).decode()}
        hook["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
        hook["timeoutSeconds"] = 2
    default["metadata"]["name"] = f"kvc-outage-{namespace}"
    admission = client.AdmissionregistrationV1Api(api)
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    apply_training_crds(control_plane)
    apply_workload_crds(control_plane)
    admission.create_mutating_webhook_configuration(default)

    def outcome(annotations: dict[str, str]) -> str:
        try:
            created = core.create_namespaced_pod(namespace, pod("p", annotations), dry_run="All")
        except ApiException as exc:
            return str(json.loads(exc.body)["message"])
        return "admitted" + (" wired" if created.spec.volumes and len(created.spec.volumes) > 1 else "")

    def workload_outcome(body: dict[str, Any]) -> str:
        try:
            create_workload(custom, namespace, body, dry_run="All")
        except ApiException as exc:
            return str(json.loads(exc.body)["message"])
        return "admitted"

    def job_outcome(kind: str, annotations: dict[str, str], template_annotations: dict[str, str]) -> str:
        return workload_outcome(job(kind, "train", {"Worker": 2}, annotations, {"Worker": template_annotations}))

    try:
        refused = wait_for(
            lambda: (m := outcome({"kvc/volume": "cifar"})) != "admitted" and m, what="the outage to refuse KVC pods"
        )
        assert 'failed calling webhook "volumes.kvc.kubeflow.org"' in refused
        assert outcome({}) == "admitted"  # not sent to KVC at all (matchConditions)
        assert outcome({"team": "vision"}) == "admitted"
        assert "failed calling webhook" in outcome({"kvc/mount-path": "/data"})  # a kvc/* typo is not skipped
        # Training jobs likewise: only those asking for KVC data, on the job or on a replica's
        # template, are sent to the webhook and refused while it is down.
        for kind in ("TFJob", "PyTorchJob"):
            assert job_outcome(kind, {}, {}) == "admitted"
            assert job_outcome(kind, {"team": "vision"}, {"team": "vision"}) == "admitted"
            assert 'failed calling webhook "jobs.kvc.kubeflow.org"' in job_outcome(kind, {"kvc/volume": "cifar"}, {})
            assert 'failed calling webhook "jobs.kvc.kubeflow.org"' in job_outcome(kind, {}, {"kvc/volume": "cifar"})
        # And the workloads of the projects' own CRDs: a JobSet asks on itself or on a replicated
        # job's pod template, a LeaderWorkerSet on itself or its leader or worker template, a
        # TrainJob on itself.
        team = {"team": "vision"}
        asks = {"kvc/volume": "cifar"}
        for body in (
            jobset("train", {}, {"driver": 1, "workers": 2}),
            jobset("train", team, {"driver": 1, "workers": 2}, {"driver": team, "workers": team}),
            leaderworkerset("serve", {}),
            leaderworkerset("serve", team, leader_annotations=team, worker_annotations=team),
            trainjob("train", {}),
            trainjob("train", team),
        ):
            assert workload_outcome(body) == "admitted", body
        for body in (
            jobset("train", asks, {"driver": 1, "workers": 2}),
            jobset("train", {}, {"driver": 1, "workers": 2}, {"workers": asks}),
            leaderworkerset("serve", asks),
            leaderworkerset("serve", {}, leader_annotations=asks),
            leaderworkerset("serve", {}, worker_annotations={"kvc/volumes": "cifar"}),  # a typo is not skipped
            trainjob("train", asks),
        ):
            assert 'failed calling webhook "jobs.kvc.kubeflow.org"' in workload_outcome(body), body

        # Switch to what the component renders.
        admission.patch_mutating_webhook_configuration(
            default["metadata"]["name"],
            [
                {"op": "replace", "path": f"/webhooks/{i}/failurePolicy", "value": hook["failurePolicy"]}
                for i, hook in enumerate(ignoring["webhooks"])
            ],
        )
        wait_for(lambda: outcome({"kvc/volume": "cifar"}) == "admitted", what="Ignore to admit during the outage")
    finally:
        admission.delete_mutating_webhook_configuration(default["metadata"]["name"])


def test_the_webhook_network_policy_lets_in_only_the_api_server_cidr_an_admin_sets(
    control_plane: ControlPlane, default: list[dict[str, Any]], tmp_path: Path
) -> None:
    install_namespaces(control_plane, default)
    component = DEPLOY / "components" / "webhook-network-policy"

    def overlay(name: str, patches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        directory = tmp_path / name
        directory.mkdir()
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "components": [os.path.relpath(component, directory)],
            "patches": patches,
        }
        (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return render(control_plane, directory)

    cidr = [{"op": "replace", "path": "/spec/ingress/0/from/0/ipBlock/cidr", "value": "172.16.0.0/28"}]
    (policy,) = overlay(
        "set", [{"target": {"kind": "NetworkPolicy", "name": "kvc-webhook"}, "patch": json.dumps(cidr)}]
    )
    # It selects the webhook's pods, and lets in that CIDR on the webhook's port alone.
    webhook_pods = workloads(default)["webhook"]["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= webhook_pods.items()
    assert policy["spec"]["ingress"] == [
        {"from": [{"ipBlock": {"cidr": "172.16.0.0/28"}}], "ports": [{"port": 9443, "protocol": "TCP"}]}
    ]
    applied = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input_text=as_yaml([policy]))
    assert "(server dry run)" in applied.stdout
    # Unpatched, the API server refuses it and names the field: it never cuts the webhook off.
    (unset,) = overlay("unset", [])
    refused = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input_text=as_yaml([unset]), check=False)
    assert refused.returncode != 0
    assert "spec.ingress[0].from[0].ipBlock.cidr" in refused.stderr


# --------------------------------------------------------------------------- rendering

# Kustomizations an admin may apply, which must not disappear; kustomizations() finds any
# added under deploy/, and they are rendered too.
EXPECTED_KUSTOMIZATIONS = {
    "agent",
    "certmanager",
    "certs",
    "crd",
    "default",
    "manager",
    "policy",
    "rbac",
    "samples",
    "webhook",
    "webhook-server",
}
IMAGE = "ghcr.io/kubeflow/kvc:latest"
NODE_DATA_ROOT = "/var/lib/kvc"
RECOMMENDED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
)
CERT_MANAGER_GROUP = "cert-manager.io"


def kustomizations() -> list[Path]:
    """deploy/**/kustomization.yaml of kind Kustomization (Components render only in an overlay)."""
    found = []
    for path in sorted(DEPLOY.rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text()).get("kind", "Kustomization") == "Kustomization":
            found.append(path.parent)
    return found


def key(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def by_key(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {key(doc): doc for doc in docs}


def as_yaml(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs)


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """component label -> Deployment or DaemonSet."""
    found = {}
    for doc in docs:
        if doc["kind"] in ("Deployment", "DaemonSet"):
            found[doc["metadata"]["labels"]["app.kubernetes.io/component"]] = doc
    return found


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return dict(only)


def install_namespaces(plane: ControlPlane, docs: list[dict[str, Any]]) -> None:
    """KVC's Namespaces for real: a server-side dry run of the Namespace does not create it,
    and the namespaced objects of a dry run are refused in a namespace that does not exist."""
    plane.kubectl(
        "apply", "--server-side", "-f", "-", input_text=as_yaml([d for d in docs if d["kind"] == "Namespace"])
    )


@pytest.fixture(scope="module")
def default(control_plane: ControlPlane) -> list[dict[str, Any]]:
    return render(control_plane, DEPLOY / "default")


@pytest.mark.parametrize("directory", kustomizations(), ids=lambda path: str(path.relative_to(DEPLOY)))
def test_every_kustomization_renders(control_plane: ControlPlane, directory: Path) -> None:
    docs = render(control_plane, directory)
    assert docs
    for doc in docs:
        assert doc["apiVersion"]
        assert doc["kind"]
        assert doc["metadata"]["name"]


def test_the_expected_kustomizations_exist() -> None:
    assert {str(path.relative_to(DEPLOY)) for path in kustomizations()} >= EXPECTED_KUSTOMIZATIONS


def test_default_applies_to_the_api_server(
    control_plane: ControlPlane, kvc_crds: None, default: list[dict[str, Any]]
) -> None:
    install_namespaces(control_plane, default)
    applied = control_plane.kubectl("apply", "--server-side", "--dry-run=server", "-k", str(DEPLOY / "default"))
    assert applied.stdout.count("(server dry run)") == len(default), applied.stdout
    # kvc-system warns on violations of Pod Security `restricted` (the Namespace's `warn`
    # label): the API server found none in the controller's and webhook's templates.
    assert "PodSecurity" not in applied.stderr, applied.stderr


def test_default_installs_every_component_with_one_image(default: list[dict[str, Any]]) -> None:
    found = workloads(default)
    assert set(found) == {"controller", "agent", "webhook"}
    assert [found[c]["kind"] for c in ("controller", "webhook", "agent")] == ["Deployment", "Deployment", "DaemonSet"]
    for workload in found.values():
        assert container(workload)["image"] == IMAGE
    kinds = {doc["kind"] for doc in default}
    assert {"CustomResourceDefinition", "Namespace", "MutatingWebhookConfiguration", "Service"} <= kinds
    assert {"PodDisruptionBudget", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"} <= kinds


def test_every_object_is_in_a_namespace_of_its_own_install(default: list[dict[str, Any]]) -> None:
    namespaces = {doc["metadata"]["name"] for doc in default if doc["kind"] == "Namespace"}
    assert namespaces == {"kvc-system", "kvc-agent", "kvc-credentials"}
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    cluster_scoped |= {"MutatingWebhookConfiguration", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    for doc in default:
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"].get("namespace") in namespaces, key(doc)
    labels = {doc["metadata"]["name"]: doc["metadata"]["labels"] for doc in default if doc["kind"] == "Namespace"}
    # The agent's hostPath is refused by `baseline` and `restricted` alike: it has a
    # namespace of its own, and everything else runs under `restricted`.
    assert labels["kvc-system"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["kvc-agent"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert labels["kvc-credentials"]["pod-security.kubernetes.io/enforce"] == "restricted"  # no pods at all
    assert workloads(default)["agent"]["metadata"]["namespace"] == "kvc-agent"


def test_workloads_are_labelled_sized_and_bound_to_their_own_service_account(default: list[dict[str, Any]]) -> None:
    objects = by_key(default)
    bindings = [doc for doc in default if doc["kind"] == "ClusterRoleBinding"]
    for component, workload in workloads(default).items():
        template = workload["spec"]["template"]
        for labels in (workload["metadata"]["labels"], template["metadata"]["labels"]):
            assert all(labels.get(label) for label in RECOMMENDED_LABELS), (component, labels)
            assert labels["app.kubernetes.io/component"] == component
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= template["metadata"]["labels"].items()
        # JSON logs, for log collectors.
        assert {"name": "KVC_LOG_FORMAT", "value": "json"} in container(workload)["env"]
        resources = container(workload)["resources"]
        for kind in ("requests", "limits"):
            assert set(resources[kind]) == {"cpu", "memory"}, (component, resources)
        # Its own ServiceAccount, in its namespace, bound to the ClusterRole of its name.
        account = template["spec"]["serviceAccountName"]
        namespace = workload["metadata"]["namespace"]
        assert account == f"kvc-{component}"
        assert objects[f"ServiceAccount/{account}"]["metadata"]["namespace"] == namespace
        subject = {"kind": "ServiceAccount", "name": account, "namespace": namespace}
        (binding,) = [b for b in bindings if subject in b["subjects"]]
        assert binding["roleRef"]["name"] == account
        assert f"ClusterRole/{account}" in objects


def test_controller_and_webhook_run_restricted_with_probes(default: list[dict[str, Any]]) -> None:
    for component in ("controller", "webhook"):
        workload = workloads(default)[component]
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        main = container(workload)
        context = main["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert not pod.get("hostNetwork")
        assert not pod.get("hostPID")
        assert not pod.get("hostIPC")
        assert all("hostPath" not in volume for volume in pod.get("volumes", []))
        ports = {port["name"]: port["containerPort"] for port in main["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            assert main[probe]["httpGet"]["port"] in ports, (component, probe)

    controller = workloads(default)["controller"]
    main = container(controller)
    assert controller["spec"]["replicas"] == 1
    # kopf runs standalone (no peering): two controllers must never run at once.
    assert controller["spec"]["strategy"]["type"] == "Recreate"
    assert main["args"][:2] == ["run", "controller"]
    assert "--liveness-endpoint=http://0.0.0.0:8080/healthz" in main["args"]
    assert f"--node-data-root={NODE_DATA_ROOT}" in main["args"]
    # kopf's identity; without it kopf needs a user name for the UID.
    assert {"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in main["env"]
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {port["name"]: port["containerPort"] for port in main["ports"]} == {"health": 8080, "metrics": 9090}
    assert "--metrics-port=9090" in main["args"]


def test_webhook_runs_two_replicas_behind_a_pdb_and_the_registered_service(default: list[dict[str, Any]]) -> None:
    objects = by_key(default)
    webhook = workloads(default)["webhook"]
    template = webhook["spec"]["template"]
    pod_labels = template["metadata"]["labels"]
    main = container(webhook)
    assert webhook["spec"]["replicas"] == 2
    assert webhook["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (spread,) = template["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert spread["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert spread["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= pod_labels.items()

    budget = objects["PodDisruptionBudget/kvc-webhook"]
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for other in ("controller", "agent"):  # the budget covers the webhook's pods only
        other_labels = workloads(default)[other]["spec"]["template"]["metadata"]["labels"]
        assert not budget["spec"]["selector"]["matchLabels"].items() <= other_labels.items()

    # The registration calls the Service, which reaches the container's HTTPS port.
    service = objects["Service/kvc-webhook"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports[port["targetPort"]] == 9443
    assert "--port=9443" in main["args"]
    for hook in objects["MutatingWebhookConfiguration/kvc-webhook"]["webhooks"]:
        called = hook["clientConfig"]["service"]
        assert (called["name"], called["namespace"], called["port"]) == (
            service["metadata"]["name"],
            service["metadata"]["namespace"],
            port["port"],
        )
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert main[probe]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}

    # The certificate files are the Secret kvc-webhook-tls, mounted read-only.
    (volume,) = template["spec"]["volumes"]
    assert volume["secret"]["secretName"] == "kvc-webhook-tls"
    (mount,) = main["volumeMounts"]
    assert mount["name"] == volume["name"]
    assert mount["readOnly"] is True
    assert f"--cert-file={mount['mountPath']}/tls.crt" in main["args"]
    assert f"--key-file={mount['mountPath']}/tls.key" in main["args"]


def test_agent_gets_only_its_hostpath_and_no_privilege(default: list[dict[str, Any]]) -> None:
    agent = workloads(default)["agent"]
    pod = agent["spec"]["template"]["spec"]
    main = container(agent)
    assert pod["volumes"] == [{"name": "data", "hostPath": {"path": NODE_DATA_ROOT, "type": "DirectoryOrCreate"}}]
    assert main["volumeMounts"] == [{"name": "data", "mountPath": NODE_DATA_ROOT}]
    assert f"--data-root={NODE_DATA_ROOT}" in main["args"]
    assert main["args"][:2] == ["run", "agent"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in main["env"]
    context = main["securityContext"]
    assert context["privileged"] is False
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork")
    assert not pod.get("hostPID")
    assert not pod.get("hostIPC")
    assert {port["name"]: port["containerPort"] for port in main["ports"]} == {"metrics": 9090}
    assert "--metrics-port=9090" in main["args"]
    # The agent serves no health endpoint: its liveness is the heartbeat the controller watches.
    assert "livenessProbe" not in main
    assert "readinessProbe" not in main


def pod_from(workload: dict[str, Any], name: str) -> dict[str, Any]:
    spec = json.loads(json.dumps(workload["spec"]["template"]["spec"]))
    spec["serviceAccountName"] = "default"  # the test namespace's own: pods need an existing one
    return {"metadata": {"name": name, "labels": workload["spec"]["template"]["metadata"]["labels"]}, "spec": spec}


def test_pod_security_admits_controller_and_webhook_as_restricted_and_the_agent_only_for_its_hostpath(
    api: Any, namespace: str, default: list[dict[str, Any]]
) -> None:
    core = client.CoreV1Api(api)

    def refusal(manifest: dict[str, Any]) -> str:
        try:
            core.create_namespaced_pod(namespace, manifest, dry_run="All")
        except ApiException as exc:
            return str(json.loads(exc.body)["message"])
        return "admitted"

    # A hostPath breaks every level below privileged, so its refusal names the level in force.
    canary = {
        "metadata": {"name": "canary"},
        "spec": {
            "containers": [{"name": "c", "image": "busybox"}],
            "volumes": [{"name": "host", "hostPath": {"path": "/"}}],
        },
    }

    def admit(level: str, workload: dict[str, Any]) -> str:
        core.patch_namespace(namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": level}}})
        # Pod Security reads namespaces from the API server's cache: judge only once it has the new label.
        wait_for(
            lambda: f'violates PodSecurity "{level}:latest"' in refusal(canary),
            timeout=30,
            what=f"the namespace to enforce {level}",
        )
        return refusal(pod_from(workload, "probe"))

    found = workloads(default)
    assert admit("restricted", found["controller"]) == "admitted"
    assert admit("restricted", found["webhook"]) == "admitted"
    # The agent exceeds `baseline` by its hostPath alone, and `restricted` only by that and
    # by running as UID 0 (deploy/agent/daemonset.yaml says why).
    assert admit("baseline", found["agent"]).endswith(
        'violates PodSecurity "baseline:latest": hostPath volumes (volume "data")'
    )
    refused = admit("restricted", found["agent"])
    violations = refused.split('violates PodSecurity "restricted:latest": ', 1)[1]
    assert re.sub(r" \([^)]*\)", "", violations).split(", ") == [
        "restricted volume types",  # the hostPath
        "runAsNonRoot != true",
        "runAsUser=0",
    ]


def test_certmanager_overlay_issues_the_serving_certificate_and_injects_its_ca(
    control_plane: ControlPlane, kvc_crds: None, default: list[dict[str, Any]]
) -> None:
    rendered = render(control_plane, DEPLOY / "certmanager")
    issued = [doc for doc in rendered if doc["apiVersion"].startswith(f"{CERT_MANAGER_GROUP}/")]
    rest = [doc for doc in rendered if doc not in issued]
    objects = by_key(issued)

    selfsigned = objects["Issuer/kvc-selfsigned"]
    assert selfsigned["spec"] == {"selfSigned": {}}
    ca = objects["Certificate/kvc-webhook-ca"]
    assert ca["spec"]["isCA"] is True
    assert ca["spec"]["issuerRef"] == {"kind": "Issuer", "name": "kvc-selfsigned"}
    ca_issuer = objects["Issuer/kvc-ca"]
    assert ca_issuer["spec"]["ca"]["secretName"] == ca["spec"]["secretName"]
    # Not `kvc certs`' own CA Secret, whose format differs.
    assert ca["spec"]["secretName"] != "kvc-webhook-ca"

    serving = objects["Certificate/kvc-webhook-serving"]["spec"]
    assert serving["issuerRef"] == {"kind": "Issuer", "name": "kvc-ca"}
    assert serving["privateKey"]["algorithm"] == "ECDSA"
    assert serving["privateKey"]["size"] == 256
    service = by_key(default)["Service/kvc-webhook"]["metadata"]
    assert serving["dnsNames"] == [
        f"{service['name']}.{service['namespace']}.svc",
        f"{service['name']}.{service['namespace']}.svc.cluster.local",
    ]
    webhook = workloads(default)["webhook"]
    (volume,) = webhook["spec"]["template"]["spec"]["volumes"]
    assert serving["secretName"] == volume["secret"]["secretName"]
    for doc in issued:
        assert doc["metadata"]["namespace"] == webhook["metadata"]["namespace"]

    # Everything else is deploy/default, with the cainjector's annotation on the registration
    # and without the `kvc certs rotate` CronJob and its identity (two writers would fight).
    unannotated = copy.deepcopy(by_key(rest))
    annotations = unannotated["MutatingWebhookConfiguration/kvc-webhook"]["metadata"].pop("annotations")
    assert annotations == {"cert-manager.io/inject-ca-from": "kvc-system/kvc-webhook-serving"}
    rotation = {
        "CronJob/kvc-certs-rotate",
        *(
            f"{kind}/kvc-certs"
            for kind in ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
        ),
    }
    assert rotation <= set(by_key(default))
    assert unannotated == {key: doc for key, doc in by_key(default).items() if key not in rotation}

    # cert-manager's kinds are unknown here; the rest is applied (dry run) as rendered.
    install_namespaces(control_plane, default)
    applied = control_plane.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input_text=as_yaml(rest))
    assert applied.stdout.count("(server dry run)") == len(rest)


# --------------------------------------------------------------------------- RBAC, for real

RBAC_NODE = "kvc-node-1"  # labelled kvc.test/zone=zone-0 by the control_plane fixture
AGENT_NAMESPACE = "kvc-agent"
# What a component logs when the API server refuses it something (kopf and ours).
REFUSED = re.compile(r"forbidden|not enough permissions|watch .*ended", re.IGNORECASE)


def service_account_kubeconfig(plane: ControlPlane, namespace: str, account: str, bound_pod: str = "") -> Path:
    """A kubeconfig that authenticates as the ServiceAccount, with a token from the TokenRequest
    API; bound to a pod (as the kubelet's are) when ``bound_pod`` is given."""
    core = plane.core_v1()
    spec: dict[str, Any] = {"expirationSeconds": 3600}
    if bound_pod:
        uid = core.read_namespaced_pod(bound_pod, namespace).metadata.uid
        spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": bound_pod, "uid": uid}
    token = core.create_namespaced_service_account_token(account, namespace, {"spec": spec}).status.token
    return plane.token_kubeconfig(f"{namespace}-{account}-{bound_pod or 'unbound'}", token)


def agent_pod(plane: ControlPlane, node: str) -> str:
    """A pod of the agent's ServiceAccount on ``node`` (as the DaemonSet would run), for its token."""
    name = f"kvc-agent-{node}"
    pod = {
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "serviceAccountName": "kvc-agent",
            "containers": [{"name": "agent", "image": "kvc"}],
        },
    }
    try:
        plane.core_v1().create_namespaced_pod(AGENT_NAMESPACE, pod)
    except ApiException as exc:
        if exc.status != 409:
            raise
    return name


def install_rbac(plane: ControlPlane, default: list[dict[str, Any]]) -> dict[str, Path]:
    """deploy/rbac and deploy/policy applied for real; a kubeconfig per component (the agent's
    token bound to a pod on RBAC_NODE)."""
    install_namespaces(plane, default)
    plane.kubectl("apply", "--server-side", "-k", str(DEPLOY / "rbac"))
    plane.kubectl("apply", "--server-side", "-k", str(DEPLOY / "policy"))
    kubeconfigs = {}
    for component, workload in workloads(default).items():
        namespace = workload["metadata"]["namespace"]
        account = workload["spec"]["template"]["spec"]["serviceAccountName"]
        bound = agent_pod(plane, RBAC_NODE) if component == "agent" else ""
        kubeconfigs[component] = service_account_kubeconfig(plane, namespace, account, bound)
    return kubeconfigs


def spawn_as(process: KvcController | KvcAgent, kubeconfig: Path, args: list[str]) -> Component:
    process.component = process.plane.spawn(
        process.name,
        [sys.executable, "-m", "kvc", "run", *args],
        env={"KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1", **process.env},
    )
    return process.component


class ControllerAs(KvcController):
    """The controller with a ServiceAccount's identity instead of the harness' admin."""

    def __init__(self, plane: ControlPlane, kubeconfig: Path) -> None:
        super().__init__(plane)
        self.name = "kvc-controller-rbac"
        self.kubeconfig = kubeconfig

    def _spawn(self, args: list[str]) -> Component:
        return spawn_as(self, self.kubeconfig, args)


class AgentAs(KvcAgent):
    """A node's agent with a ServiceAccount's identity instead of the harness' admin."""

    def __init__(self, plane: ControlPlane, node: str, kubeconfig: Path) -> None:
        super().__init__(plane, node)
        self.name = f"kvc-agent-{node}-rbac"
        self.kubeconfig = kubeconfig

    def _spawn(self, args: list[str]) -> Component:
        return spawn_as(self, self.kubeconfig, args)


def start_webhook_as(plane: ControlPlane, kubeconfig: Path, directory: Path) -> tuple[Component, str, ssl.SSLContext]:
    """The webhook on loopback with a certificate of its own; returns it, its URL and a client context."""
    ca = pki.new_ca("kvc-rbac-webhook-ca")
    serving = pki.new_serving_cert(ca, ["localhost"], ["127.0.0.1"])
    cert, private_key = directory / "tls.crt", directory / "tls.key"
    cert.write_bytes(serving.cert_pem)
    private_key.write_bytes(serving.key_pem)
    port = free_port()
    component = plane.spawn(
        "kvc-webhook-rbac",
        [
            *(sys.executable, "-m", "kvc", "run", "webhook", "--host=127.0.0.1", f"--port={port}"),
            *(f"--cert-file={cert}", f"--key-file={private_key}"),
        ],
        env={"KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"},
    )
    url = f"https://127.0.0.1:{port}"
    # /readyz: the first list of VolumeManagers succeeded.
    plane.wait_healthy(f"{url}/readyz", component, "kvc-webhook-rbac")
    return component, url, ssl.create_default_context(cadata=ca.cert_pem.decode())


def indexed_volumemanagers(url: str, context: ssl.SSLContext) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5, context=context) as response:  # noqa: S310
        metrics = response.read().decode()
    (line,) = [line for line in metrics.splitlines() if line.startswith("kvc_webhook_indexed_volumemanagers ")]
    return float(line.split()[1])


def heartbeat_of(leases: Any, holder: str) -> Any:
    """The controller's Lease in kvc-system while ``holder`` holds it, else None."""
    try:
        found = leases.read_namespaced_lease(names.CONTROLLER_LEASE, names.KVC_NAMESPACE)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return found if found.spec.holder_identity == holder else None


def test_each_component_works_with_only_its_own_rbac(
    control_plane: ControlPlane,
    api: Any,
    kvc_crds: None,
    namespace: str,
    s3: S3Server,
    default: list[dict[str, Any]],
    controller_process: KvcController,
    agent_processes: dict[str, KvcAgent],
    tmp_path: Path,
) -> None:
    """deploy/rbac applied for real; the controller, one agent and the webhook authenticate as
    their ServiceAccounts (tokens, as in a pod) through every API call of a VolumeManager's
    life: S3 replicas on a node, NFS PV+PVC, an existing claim, events, a gated pod
    released, deletion; the controller's heartbeat Lease created and renewed. Nothing may be refused."""
    kubeconfigs = install_rbac(control_plane, default)
    core = client.CoreV1Api(api)
    # The data: objects in a bucket, its credentials Secret, and a claim bound to a PV of our own.
    bucket = f"rbac-{namespace}"
    s3_client = s3.client()
    s3_client.create_bucket(Bucket=bucket)
    for index in range(3):
        s3_client.put_object(Bucket=bucket, Key=f"set/part-{index}.bin", Body=os.urandom(1024 + index))
    core.create_namespaced_secret(namespace, credentials_secret("aws-creds"))
    storage_class = f"manual-{namespace}"
    core.create_persistent_volume(
        {
            "metadata": {"name": f"pv-{namespace}"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": storage_class,
                "hostPath": {"path": "/tmp/kvc-rbac"},
            },
        }
    )
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "existing"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": storage_class,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )

    # The session's own controller and this node's agent make way for the restricted ones.
    controller_process.stop()
    session_agent = agent_processes[RBAC_NODE]
    session_agent.stop()
    controller = ControllerAs(control_plane, kubeconfigs["controller"])
    # Its heartbeat Lease as in a pod (POD_NAME from the downward API), renewed every second so
    # that the test sees updates as well as the create.
    controller.env["POD_NAME"] = "kvc-controller-rbac-test"
    controller.extra_args.append("--lease-duration=3")
    leases = client.CoordinationV1Api(api)
    try:
        leases.delete_namespaced_lease(names.CONTROLLER_LEASE, names.KVC_NAMESPACE)  # made by an earlier test
    except ApiException as exc:
        if exc.status != 404:
            raise
    agent = AgentAs(control_plane, RBAC_NODE, kubeconfigs["agent"])
    webhook: Component | None = None
    vms = VolumeManagers(api, namespace)
    try:
        controller.start()
        first_beat = wait_for(
            lambda: heartbeat_of(leases, "kvc-controller-rbac-test"), what="the controller to create its Lease"
        )
        agent.start()
        agent.wait_reporting()
        webhook, url, context = start_webhook_as(control_plane, kubeconfigs["webhook"], tmp_path)
        before = indexed_volumemanagers(url, context)

        created = vms.create(
            "data",
            [
                {
                    "id": "cifar",
                    "sourceType": "S3",
                    "replicas": 1,
                    "accessMode": "ReadOnlyMany",
                    "capacity": "10Mi",
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {"matchExpressions": [{"key": "kvc.test/zone", "operator": "In", "values": ["zone-0"]}]}
                            ]
                        }
                    },
                    "options": {
                        "sourceURL": f"s3://{bucket}/set/",
                        "endpointURL": s3.endpoint_url,
                        "awsCredentialsSecretName": "aws-creds",
                    },
                },
                {
                    "id": "shared",
                    "sourceType": "NFS",
                    "accessMode": "ReadWriteMany",
                    "capacity": "1Gi",
                    "options": {"server": "nfs.example.com", "path": "/exports/shared"},
                },
                {"id": "scratch", "sourceType": "PVC", "options": {"claimName": "existing"}},
            ],
        )
        # The webhook's watch (not only its first list) sees the new VolumeManager.
        wait_for(lambda: indexed_volumemanagers(url, context) == before + 1, what="the webhook to index it")

        vm = vms.wait_state("data", "Running", timeout=120)
        phases = {volume["id"]: volume["phase"] for volume in vm["status"]["volumes"]}
        assert phases == {"cifar": "Ready", "shared": "Ready", "scratch": "Ready"}
        cifar = vms.volume("data", "cifar")
        (term,) = cifar["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        (expression,) = term["matchExpressions"]
        data_label = expression["key"]
        assert data_label in core.read_node(RBAC_NODE).metadata.labels
        assert vms.events("data"), "the controller posted no event"

        # A pod gated while its data was on its way is released by the controller.
        gated = restricted_pod("gated", {"kvc/volume": "cifar"}, schedulingGates=[{"name": names.SCHEDULING_GATE}])
        gated["metadata"]["labels"] = {names.LABEL_GATED: "true"}
        core.create_namespaced_pod(namespace, gated)
        released = wait_for(
            lambda: (p := core.read_namespaced_pod("gated", namespace)).spec.scheduling_gates is None and p,
            what="the gated pod to be released",
        )
        assert released.spec.affinity.node_affinity is not None

        # Deletion: labels off, replicas released, the NFS PV and PVC deleted, finalizer gone.
        vms.delete("data")
        wait_for(lambda: not vms.exists("data"), timeout=90, what="the VolumeManager to be deleted")
        assert not vms.volumes_of(created["metadata"]["uid"])
        copies = core.list_namespaced_secret(
            names.DEFAULT_CREDENTIALS_NAMESPACE,
            label_selector=f"{names.LABEL_VOLUMEMANAGER_UID}={created['metadata']['uid']}",
        )
        assert not copies.items
        assert data_label not in (core.read_node(RBAC_NODE).metadata.labels or {})

        # Renewed all along (get + update of that one Lease), with no transition: one process.
        renewed = heartbeat_of(leases, "kvc-controller-rbac-test")
        assert renewed is not None
        assert renewed.spec.renew_time > first_beat.spec.renew_time
        assert renewed.spec.acquire_time == first_beat.spec.acquire_time
        assert renewed.spec.lease_transitions == first_beat.spec.lease_transitions == 0
    finally:
        controller.stop()
        agent.stop()
        if webhook is not None:
            webhook.stop()
        core.delete_persistent_volume(f"pv-{namespace}")
        session_agent.start()
        controller_process.start()

    for name in (controller.name, agent.name, "kvc-webhook-rbac"):
        log = (control_plane.logs_dir / f"{name}.log").read_text(errors="replace")
        refused = [line for line in log.splitlines() if REFUSED.search(line)]
        assert not refused, f"{name} was refused something:\n" + "\n".join(refused[:20])


def test_the_agent_reads_no_secret_but_the_copies_in_the_credentials_namespace(
    control_plane: ControlPlane, api: Any, namespace: str, default: list[dict[str, Any]]
) -> None:
    """With the agent's real ServiceAccount token (bound to a pod on a node, as the kubelet's),
    against the API server: a tenant's Secret and kvc-system's are out of reach."""
    kubeconfigs = install_rbac(control_plane, default)
    agent = client.CoreV1Api(kubernetes.config.new_client_from_config(config_file=str(kubeconfigs["agent"])))
    core = client.CoreV1Api(api)
    planted = {
        namespace: "aws-creds",  # a tenant's own credentials
        "kvc-system": "kvc-webhook-ca-probe",  # beside the webhook's CA key
        names.DEFAULT_CREDENTIALS_NAMESPACE: f"copy-{namespace}",  # a copy the controller made
    }
    for where, name in planted.items():
        core.create_namespaced_secret(where, {"metadata": {"name": name}, "stringData": {"key": "s3cr3t"}})
    try:

        def read(where: str, name: str) -> int:
            try:
                agent.read_namespaced_secret(name, where)
            except ApiException as exc:
                return int(exc.status)
            return 200

        assert read(namespace, "aws-creds") == 403
        assert read("kvc-system", "kvc-webhook-ca-probe") == 403
        assert read(names.DEFAULT_CREDENTIALS_NAMESPACE, f"copy-{namespace}") == 200
        for listing in (
            lambda: agent.list_namespaced_secret(names.DEFAULT_CREDENTIALS_NAMESPACE),
            lambda: agent.list_namespaced_secret(namespace),
            agent.list_secret_for_all_namespaces,
        ):
            with pytest.raises(ApiException) as refused:
                listing()
            assert refused.value.status == 403
        can = kubectl_as(control_plane, kubeconfigs["agent"], "auth", "can-i", "get", "secrets", "-n", "kvc-system")
        assert can.strip() == "no" or can.startswith("refused")
    finally:
        for where, name in planted.items():
            core.delete_namespaced_secret(name, where)


def kubectl_as(plane: ControlPlane, kubeconfig: Path, *args: str, input_text: str | None = None) -> str:
    """What kubectl prints (stderr on failure) when run with another identity."""
    result = plane.kubectl(*args, check=False, input_text=input_text, kubeconfig=kubeconfig)
    return result.stdout if result.returncode == 0 else f"refused: {result.stderr.strip()}"


def report_as(kubeconfig: Path, node: str, status: dict[str, Any]) -> str:
    """Patch a VolumeNode's status with another identity: "ok" or the API server's message."""
    custom = client.CustomObjectsApi(kubernetes.config.new_client_from_config(config_file=str(kubeconfig)))
    try:
        custom.patch_cluster_custom_object_status(names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL, node, status)
    except ApiException as exc:
        return str(json.loads(exc.body)["message"])
    return "ok"


def test_the_agent_writes_only_its_own_node_and_the_webhook_writes_nothing(
    control_plane: ControlPlane,
    kvc_crds: None,
    namespace: str,
    default: list[dict[str, Any]],
    agents: dict[str, KvcAgent],  # their VolumeNodes must exist for the status patches below
) -> None:
    kubeconfigs = install_rbac(control_plane, default)
    agent, webhook = kubeconfigs["agent"], kubeconfigs["webhook"]
    other_node = "kvc-node-2"
    volumemanager = json.dumps(
        {
            "apiVersion": "kvc.kubeflow.org/v1",
            "kind": "VolumeManager",
            "metadata": {"name": "sneaky", "namespace": namespace},
            "spec": {"volumeConfigs": [{"id": "x", "sourceType": "PVC", "options": {"claimName": "c"}}]},
        }
    )
    # A current heartbeat: the controller must not think the node's real agent is gone.
    heartbeat = {"status": {"heartbeatTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    for identity in (agent, webhook):
        assert "volumemanagers.kvc.kubeflow.org is forbidden" in kubectl_as(
            control_plane, identity, "create", "-f", "-", input_text=volumemanager
        )
        assert "is forbidden" in kubectl_as(control_plane, identity, "create", "configmap", "x", "-n", namespace)
    # The agent reports on its own node (as Agent._report does), and the API server refuses any
    # other node's report.
    assert report_as(agent, RBAC_NODE, heartbeat) == "ok"
    other = report_as(agent, other_node, heartbeat)
    assert f"the KVC agent may write only the VolumeNode of its own node ({RBAC_NODE}), not {other_node}" in other
    # A token that is not bound to a pod on a node may write no VolumeNode at all.
    unbound = service_account_kubeconfig(control_plane, AGENT_NAMESPACE, "kvc-agent")
    assert "unknown: its token is not bound to a pod on a node" in report_as(unbound, RBAC_NODE, heartbeat)
    # The webhook may read VolumeManagers and nothing else.
    allowed = kubectl_as(control_plane, webhook, "auth", "can-i", "--list")
    rules = [line.split()[0] for line in allowed.splitlines()[1:] if "[" in line]
    assert "volumemanagers.kvc.kubeflow.org" in rules
    for line in allowed.splitlines():
        if line.startswith("volumemanagers.kvc.kubeflow.org"):
            assert line.rstrip().endswith("[list watch]"), line
    for verb in ("create", "update", "patch", "delete"):
        for resource in ("volumemanagers.kvc.kubeflow.org", "pods", "secrets", "volumenodes.kvc.kubeflow.org"):
            answer = kubectl_as(control_plane, webhook, "auth", "can-i", verb, resource, "-A")
            assert answer.startswith("refused") or answer.strip() == "no", (verb, resource, answer)


def kvc_certs_as(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvc", "certs", *args, *(["--propagation-wait", "0s"] if args[0] != "show" else [])],
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_the_rotation_cronjob_identity_rotates_and_reads_no_other_secret(
    control_plane: ControlPlane, api: Any, default: list[dict[str, Any]]
) -> None:
    install_namespaces(control_plane, default)
    control_plane.kubectl("apply", "--server-side", "-k", str(DEPLOY / "certs"))
    control_plane.kubectl("apply", "--server-side", "-k", str(DEPLOY / "webhook"))
    core = client.CoreV1Api(api)
    core.create_namespaced_secret("kvc-system", {"metadata": {"name": "unrelated"}, "stringData": {"k": "v"}})
    try:
        installed = kvc_certs_as(control_plane.kubeconfig, "install")  # the admin's first install
        assert installed.returncode == 0, installed.stderr
        (cronjob,) = [doc for doc in default if doc["kind"] == "CronJob"]
        spec = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert spec["containers"][0]["args"] == ["certs", "rotate"]
        rotator = service_account_kubeconfig(control_plane, "kvc-system", spec["serviceAccountName"])
        renewed = kvc_certs_as(rotator, "rotate", "--force")
        assert renewed.returncode == 0, renewed.stderr
        assert "new serving certificate: asked for (--force)" in renewed.stdout
        rolled = kvc_certs_as(rotator, "rotate", "--ca")
        assert rolled.returncode == 0, rolled.stderr
        assert "new CA: asked for (--ca)" in rolled.stdout
        assert "caBundle of kvc-webhook: matches the Secret" in kvc_certs_as(rotator, "show").stdout
        assert kubectl_as(control_plane, rotator, "get", "secret", "unrelated", "-n", "kvc-system").startswith(
            "refused"
        )
        assert kubectl_as(control_plane, rotator, "get", "secrets", "-n", "kvc-system").startswith("refused")
    finally:
        client.AdmissionregistrationV1Api(api).delete_mutating_webhook_configuration("kvc-webhook")
        for name in ("unrelated", "kvc-webhook-tls", "kvc-webhook-ca"):
            core.delete_namespaced_secret(name, "kvc-system")
