"""deploy/ as an admin installs it: kustomize renders it and the real API server acts on it."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from certs import pki
from e2e.cluster import ControlPlane
from e2e.helpers import wait_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def render(plane: ControlPlane, directory: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(plane.kubectl("kustomize", str(directory)).stdout) if doc]


def pod(name: str, annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [{"name": "main", "image": "busybox:1.36"}]},
    }


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
    admission.create_mutating_webhook_configuration(default)

    def outcome(annotations: dict[str, str]) -> str:
        try:
            created = core.create_namespaced_pod(namespace, pod("p", annotations), dry_run="All")
        except ApiException as exc:
            return str(json.loads(exc.body)["message"])
        return "admitted" + (" wired" if created.spec.volumes and len(created.spec.volumes) > 1 else "")

    try:
        refused = wait_for(
            lambda: (m := outcome({"kvc/volume": "cifar"})) != "admitted" and m, what="the outage to refuse KVC pods"
        )
        assert 'failed calling webhook "volumes.kvc.kubeflow.org"' in refused
        assert outcome({}) == "admitted"  # not sent to KVC at all (matchConditions)
        assert outcome({"team": "vision"}) == "admitted"
        assert "failed calling webhook" in outcome({"kvc/mount-path": "/data"})  # a kvc/* typo is not skipped

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
