"""What an operator sees: Prometheus metrics of the controller and agents, JSON logs."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from e2e.helpers import VolumeManagers
from e2e.kvc import KvcAgent, KvcController
from e2e.s3server import S3Server, credentials_secret


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
        [
            {
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
        ],
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
