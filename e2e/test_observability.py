"""What an operator sees: Prometheus metrics of the controller and agents, JSON logs."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from e2e.cluster import ControlPlane
from e2e.helpers import VolumeManagers, restricted_pod
from e2e.kvc import KvcAgent, KvcController, KvcWebhook
from e2e.s3server import S3Server, credentials_secret
from kvc.testing.fileserver import FileServer


def s3_set(s3: S3Server, bucket: str) -> dict[str, Any]:
    """A volume of the objects under ``set/`` in ``bucket``, on two nodes, read with the Secret aws-creds."""
    return {
        "id": "set",
        "sourceType": "S3",
        "replicas": 2,
        "accessMode": "ReadOnlyMany",
        "options": {
            "sourceURL": f"s3://{bucket}/set/",
            "endpointURL": s3.endpoint_url,
            "awsCredentialsSecretName": "aws-creds",
        },
    }


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_fetches_bytes_and_reconciles_and_the_controller_logs_json(
    api: Any,
    namespace: str,
    s3: S3Server,
    controller: KvcController,
    agents: dict[str, KvcAgent],
) -> None:
    bucket = f"metrics-{namespace}"
    s3.client().create_bucket(Bucket=bucket)
    for i in range(3):
        s3.client().put_object(Bucket=bucket, Key=f"set/{i}.bin", Body=bytes([i]) * 100_000)
    client.CoreV1Api(api).create_namespaced_secret(namespace, credentials_secret("aws-creds"))
    before = {node: scrape(agent.metrics_url) for node, agent in agents.items()}
    vms = VolumeManagers(api, namespace)
    vms.create(
        "observed",
        [s3_set(s3, bucket)],
    )
    volume = vms.wait_state("observed", "Running", timeout=120)["status"]["volumes"][0]
    ok = ("kvc_agent_fetches_total", (("result", "ok"), ("source_type", "S3")))
    fetched = ("kvc_agent_bytes_fetched_total", (("source_type", "S3"),))
    for node in (n["name"] for n in volume["nodes"]):
        after = scrape(agents[node].metrics_url)
        assert after[ok] - before[node].get(ok, 0) >= 1
        assert after[fetched] - before[node].get(fetched, 0) >= 300_000
        assert after[("kvc_agent_replicas", (("phase", "Ready"),))] >= 1

    controller_metrics = scrape(controller.metrics_url)
    assert controller_metrics[("kvc_controller_reconciles_total", (("result", "ok"), ("trigger", "create")))] >= 1
    assert controller_metrics[("kvc_controller_volume_transitions_total", (("reason", "VolumeReady"),))] >= 1
    assert controller_metrics[("kvc_controller_reconcile_seconds_count", ())] >= 1

    assert controller.component is not None
    lines = controller.component.log_path.read_text().splitlines()[-50:]
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(entries) >= len(lines) // 2  # kopf may print a few plain lines before logging is set up
    assert {"time", "level", "logger", "message"} <= set(entries[-1])


# --------------------------------------------------------------------------- no credential in any log


def _kvc_certs(plane: ControlPlane, json_lines: bool, *args: str) -> str:
    """`kvc -v certs ...` at debug level; everything it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "kvc", "-v", "certs", *args],
        env={**os.environ, "KUBECONFIG": str(plane.kubeconfig), "KVC_LOG_FORMAT": "json" if json_lines else "text"},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


@contextlib.contextmanager
def _debug_logging(processes: list[KvcController | KvcWebhook | KvcAgent]) -> Iterator[None]:
    """Every process restarted with `-v`, half of them logging JSON lines; restored afterwards."""
    try:
        for index, process in enumerate(processes):
            process.stop()
            process.verbose = True
            process.env["KVC_LOG_FORMAT"] = "json" if index % 2 == 0 else "text"
            process.start()
        yield
    finally:
        for process in processes:
            process.stop()
            process.verbose = False
            process.env.pop("KVC_LOG_FORMAT", None)
            process.start()


def test_no_secret_reaches_any_log_at_debug_level_in_either_format(
    control_plane: ControlPlane,
    api: Any,
    namespace: str,
    s3: S3Server,
    controller: KvcController,
    agents: dict[str, KvcAgent],
    tmp_path: Path,
) -> None:
    """Every component at `-v`, in JSON and text, with an S3 key pair, an HTTP bearer token and
    a CA key in play: none of them, in any form, appears in any log."""
    secret_key = f"wJalrXUtnFEMI-{uuid.uuid4().hex}"
    token = f"hf_{uuid.uuid4().hex}"
    core = client.CoreV1Api(api)
    core.create_namespaced_secret(namespace, credentials_secret("aws-creds", secret_key=secret_key))
    core.create_namespaced_secret(namespace, {"metadata": {"name": "hub"}, "stringData": {"Authorization": token}})
    bucket = f"logs-{namespace}"
    s3.client().create_bucket(Bucket=bucket)
    s3.client().put_object(Bucket=bucket, Key="set/a.bin", Body=b"a" * 1000)
    (tmp_path / "model.bin").write_bytes(b"weights")
    webhook = KvcWebhook(control_plane, name="kvc-webhook-debug")
    processes: list[KvcController | KvcWebhook | KvcAgent] = [controller, webhook, *agents.values()]
    certs_output = ""
    with (
        FileServer(tmp_path, required_headers={"Authorization": token}).running() as server,
        _debug_logging(processes),
        webhook.registered(api),
    ):
        for agent in agents.values():
            agent.wait_reporting()
        vms = VolumeManagers(api, namespace)
        vms.create(
            "secretive",
            [
                s3_set(s3, bucket),
                {
                    "id": "model",
                    "sourceType": "HTTP",
                    "replicas": 2,
                    "accessMode": "ReadOnlyMany",
                    "options": {"url": f"{server.url}/model.bin", "headersSecretName": "hub"},
                },
            ],
        )
        vms.wait_state("secretive", "Running", timeout=120)
        core.create_namespaced_pod(namespace, restricted_pod("reader", {"kvc/volume": "set"}))
        assert any(r.get("Authorization") == token for r in server.requests)  # the token was in play
        for json_lines in (True, False):
            certs_output += _kvc_certs(control_plane, json_lines, "install", "-n", namespace, "--webhook-config", "")
        certs_output += _kvc_certs(control_plane, True, "rotate", "-n", namespace, "--webhook-config", "", "--ca")
        logs = {p.name: p.component.log_path.read_text(errors="replace") for p in processes if p.component}

    ca = core.read_namespaced_secret("kvc-webhook-ca", namespace).data
    ca_key = base64.b64decode(ca["ca.key"]).decode()
    serving = core.read_namespaced_secret("kvc-webhook-tls", namespace).data
    serving_key = base64.b64decode(serving["tls.key"]).decode()
    forbidden = {
        "the S3 secret key": secret_key,
        "the S3 secret key in base64": base64.b64encode(secret_key.encode()).decode(),
        "the bearer token": token,
        "the bearer token in base64": base64.b64encode(token.encode()).decode(),
        "a SigV4 Authorization header": "AWS4-HMAC-SHA256 Credential=",
        "the CA key": ca_key.splitlines()[1],
        "the CA key in base64": ca["ca.key"][:40],
        "the serving key": serving_key.splitlines()[1],
        "the serving key in base64": serving["tls.key"][:40],
        "a PEM private key": "PRIVATE KEY-----\n",
    }
    logs["kvc certs"] = certs_output
    for name, text in logs.items():
        assert "DEBUG" in text, f"{name} did not log at debug level"
        for what, value in forbidden.items():
            assert value not in text, f"{what} is in the log of {name}"
