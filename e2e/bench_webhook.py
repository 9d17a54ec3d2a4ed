"""Admission benchmark: `kvc run webhook` with 1,000 VolumeManagers indexed, under load.

A local control plane holds 1,000 VolumeManagers (one namespace, each with a Ready S3
volume) and the webhook process indexes them from its watch, as in production. bombardier
(built from its Go module) sends AdmissionReviews over HTTPS keep-alive connections:

- floor: a bare aiohttp HTTPS server on the same stack (event loop, orjson, processes)
  answering allowed:true (what the stack can give);
- plain: a pod without KVC annotations (the webhook's fast path);
- annotated: a pod asking for one of the 1,000 volumes (resolved, wired, JSON Patch).

Each is run for a fixed time after a warm-up; the table gives throughput, p50 and p99
latency, and the ratio to the floor, with the targets of the benchmark plan.

    python -m e2e.bench_webhook [--seconds 10] [--connections 4 16] [--managers 1000] [--workers N] [--rounds 1]

The webhook runs ``--workers`` processes (default: as `kvc run webhook` chooses), and the
floor as many processes on one port, so that the ratio compares like with like.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import requests
from aiohttp import web

from e2e import benchtools
from e2e.cluster import ControlPlane, free_port
from e2e.kvc import KvcWebhook
from kvc.api import names
from webhook.server import new_event_loop
from webhook.workers import default_workers

NAMESPACE = "bench"
TARGETS = {"plain": (4000.0, None), "annotated": (2000.0, 5.0)}  # req/s at least, p99 ms at most


def pod_review(annotations: dict[str, str]) -> dict[str, Any]:
    """An AdmissionReview as the API server sends it for a typical training pod."""
    container = {
        "name": "trainer",
        "image": "registry.example.com/ml/trainer:2.4.1",
        "command": ["python", "-m", "train"],
        "args": ["--epochs=90", "--batch-size=256", "--data=/var/datasets"],
        "env": [{"name": f"VAR_{i}", "value": f"value-{i}"} for i in range(8)],
        "resources": {"limits": {"cpu": "8", "memory": "32Gi"}, "requests": {"cpu": "8", "memory": "32Gi"}},
        "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "trainer-0",
            "namespace": NAMESPACE,
            "labels": {"app": "trainer", "team": "vision"},
            "annotations": annotations,
        },
        "spec": {
            "containers": [container],
            "volumes": [
                {"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}}
            ],
            "restartPolicy": "Never",
            "serviceAccountName": "default",
            "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"}],
        },
    }
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "4b5a2f7e-0000-4000-8000-000000000000",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": NAMESPACE,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:training:operator"},
            "object": pod,
            "dryRun": False,
        },
    }


def seed(plane: ControlPlane, count: int) -> float:
    """``count`` VolumeManagers, each with a Ready S3 volume in its status; returns seconds."""
    plane.kubectl("apply", "--server-side", "-k", str(Path(__file__).resolve().parent.parent / "deploy" / "crd"))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/volumemanagers.kvc.kubeflow.org")
    plane.core_v1().create_namespace({"metadata": {"name": NAMESPACE}})
    from kubernetes import client  # noqa: PLC0415 - only the seeding needs the typed client

    custom = client.CustomObjectsApi(plane.api_client())
    group, version, plural = names.GROUP, names.VERSION, names.VOLUMEMANAGER_PLURAL

    def create(i: int) -> None:
        name = f"vm-{i:04d}"
        custom.create_namespaced_custom_object(
            group,
            version,
            NAMESPACE,
            plural,
            {
                "apiVersion": f"{group}/{version}",
                "kind": "VolumeManager",
                "metadata": {"name": name},
                "spec": {
                    "volumeConfigs": [
                        {
                            "id": f"data-{i:04d}",
                            "sourceType": "S3",
                            "replicas": 2,
                            "options": {"sourceURL": f"s3://bucket/{name}/", "awsCredentialsSecretName": "creds"},
                        }
                    ]
                },
            },
        )
        label = f"data.kvc.kubeflow.org/{NAMESPACE}-{name}-0123456789"
        status = {
            "state": "Running",
            "volumes": [
                {
                    "id": f"data-{i:04d}",
                    "sourceType": "S3",
                    "phase": "Ready",
                    "message": "2/2 replicas ready",
                    "volumeSource": {"hostPath": {"path": f"/var/lib/kvc/{NAMESPACE}/{name}", "type": "Directory"}},
                    # As the controller reports node-local data: workloads are wired to the claim.
                    "claimName": f"{name}-data-{i:04d}-0123456789",
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [{"matchExpressions": [{"key": label, "operator": "Exists"}]}]
                        }
                    },
                }
            ],
        }
        custom.patch_namespaced_custom_object_status(group, version, NAMESPACE, plural, name, {"status": status})

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(create, range(count)))
    return time.perf_counter() - started


# --------------------------------------------------------------------------- the floor


def serve_floor(port: int, cert: Path, key: Path, client_ca: Path, ready_dir: Path) -> None:
    """A bare HTTPS server of the same stack (aiohttp on the webhook's event loop, orjson,
    SO_REUSEPORT beside its siblings, client certificates checked against the same CA):
    parse the review, answer allowed:true."""

    async def allow(request: web.Request) -> web.Response:
        review = orjson.loads(await request.read())
        uid = review["request"]["uid"]
        answer = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {"uid": uid, "allowed": True},
        }
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    app = web.Application(client_max_size=3 * 1024 * 1024)
    app.router.add_post("/mutate", allow)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_verify_locations(cafile=client_ca)

    async def listening(app: web.Application) -> None:
        (ready_dir / str(os.getpid())).touch()

    app.on_startup.append(listening)
    web.run_app(
        app,
        host="127.0.0.1",
        port=port,
        ssl_context=context,
        access_log=None,
        print=None,
        reuse_port=True,
        loop=new_event_loop(),
    )


def _wait_up(url: str, ready_dir: Path, processes: int, timeout: float = 30) -> None:
    """Until every floor process has started (each leaves a file) and the port answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.post(url, data=b"{}", verify=False, timeout=1)  # noqa: S501 - loopback, self-signed
            if len(list(ready_dir.iterdir())) >= processes:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer from {processes} processes within {timeout}s")


# --------------------------------------------------------------------------- load


def load(url: str, body: Path, seconds: float, connections: int, client: tuple[Path, Path]) -> dict[str, float]:
    """bombardier against ``url``, with the API server's ``client`` certificate: requests/s,
    p50 and p99 in ms, and non-2xx count."""
    tool = benchtools.binary("bombardier")
    base = [str(tool), "-k", "-m", "POST", "-H", "Content-Type: application/json", "-f", str(body)]
    base += ["--cert", str(client[0]), "--key", str(client[1])]
    base += ["-c", str(connections), "-l", "-o", "json", "-p", "result"]
    subprocess.run([*base, "-d", "2s", url], check=True, capture_output=True)  # warm-up
    out = subprocess.run([*base, "-d", f"{seconds}s", url], check=True, capture_output=True, text=True).stdout
    result = json.loads(out)["result"]
    percentiles = result["latency"]["percentiles"]
    failed = sum(result.get(k, 0) for k in ("req1xx", "req3xx", "req4xx", "req5xx", "others"))
    return {
        "rps": float(result["rps"]["mean"]),
        "p50": float(percentiles["50"]) / 1000,
        "p99": float(percentiles["99"]) / 1000,
        "failed": float(failed),
        "requests": float(sum(result.get(k, 0) for k in ("req2xx",)) + failed),
    }


def check_answers(url: str, plain: Path, annotated: Path, client: tuple[Path, Path]) -> None:
    """The webhook really wires the annotated pod (through its claim) and passes the plain
    one (before timing)."""

    def answer(body: Path) -> dict[str, Any]:
        pair = (str(client[0]), str(client[1]))
        posted = requests.post(url, data=body.read_bytes(), verify=False, timeout=5, cert=pair)  # noqa: S501
        response: dict[str, Any] = posted.json()["response"]
        return response

    plain_answer, wired = answer(plain), answer(annotated)
    if not plain_answer["allowed"] or "patch" in plain_answer:
        raise RuntimeError(f"plain pod not passed through: {plain_answer}")
    if not wired["allowed"] or "persistentVolumeClaim" not in base64.b64decode(wired.get("patch", "")).decode():
        raise RuntimeError(f"annotated pod not wired through its claim: {wired}")


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def _spawn_floor(plane: ControlPlane, cert: Path, key: Path, processes: int, scratch: Path) -> tuple[str, list[Any]]:
    """``processes`` floor servers sharing one port, as the webhook's workers do."""
    port = free_port()
    ready_dir = scratch / "floor-ready"
    ready_dir.mkdir()
    argv = [sys.executable, "-m", "e2e.bench_webhook", "--floor-server", str(port), str(cert), str(key)]
    argv += [str(plane.webhook_client_ca), str(ready_dir)]
    floors = [plane.spawn(f"bench-floor-{i}", argv, env={"PYTHONPATH": os.getcwd()}) for i in range(processes)]
    url = f"https://127.0.0.1:{port}/mutate"
    _wait_up(url, ready_dir, processes)
    return url, floors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--managers", type=int, default=1000)
    parser.add_argument(
        "--workers", type=int, default=default_workers(), help="webhook worker processes, and as many floor servers"
    )
    parser.add_argument("--rounds", type=int, default=1, help="measure every row this many times; print medians")
    parser.add_argument(
        "--floor-server", nargs=5, metavar=("PORT", "CERT", "KEY", "CLIENT_CA", "READY_DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.floor_server:
        port, cert, key, client_ca, ready_dir = args.floor_server
        serve_floor(int(port), Path(cert), Path(key), Path(client_ca), Path(ready_dir))
        return 0

    import urllib3  # noqa: PLC0415

    urllib3.disable_warnings()
    benchtools.binary("bombardier")  # built before anything is timed
    with ControlPlane() as plane, tempfile.TemporaryDirectory(prefix="kvc-bench-") as scratch:
        seeded = seed(plane, args.managers)
        webhook = KvcWebhook(plane)
        webhook.env["KVC_WEBHOOK_WORKERS"] = str(args.workers)
        webhook.start()
        deadline = time.monotonic() + 60
        metrics = ""
        while time.monotonic() < deadline:
            # With several workers the gauge is the smallest index among them: all have it.
            metrics = requests.get(f"{webhook.url}/metrics", verify=False, timeout=5).text  # noqa: S501
            if f"kvc_webhook_indexed_volumemanagers {float(args.managers)}" in metrics:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"the webhook did not index {args.managers} VolumeManagers")
        floor_url, floors = _spawn_floor(plane, webhook.cert_file, webhook.key_file, args.workers, Path(scratch))
        bodies = Path(scratch)
        plain, annotated = bodies / "plain.json", bodies / "annotated.json"
        plain.write_text(json.dumps(pod_review({"team": "vision"})))
        annotated.write_text(json.dumps(pod_review({"kvc/volume": f"data-{args.managers // 2:04d}"})))
        client = plane.webhook_client_cert
        check_answers(f"{webhook.url}/mutate", plain, annotated, client)

        targets = [
            ("floor (bare aiohttp, allowed:true)", floor_url, plain),
            ("plain pod", f"{webhook.url}/mutate", plain),
            ("annotated pod", f"{webhook.url}/mutate", annotated),
        ]
        measured: dict[tuple[int, str], list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for connections in args.connections:
                for label, url, body in targets:
                    row = load(url, body, args.seconds, connections, client)
                    measured.setdefault((connections, label), []).append(row)
        for floor in floors:
            floor.stop()
        webhook.stop()

    print(
        f"\nWebhook admission over HTTPS keep-alive, {args.workers} worker process(es) (and as many floor "
        f"servers), {args.seconds:.0f} s per row"
        + (f", median of {args.rounds} rounds" if args.rounds > 1 else "")
        + f", {args.managers} VolumeManagers indexed (created with status in {seeded:.1f} s), "
        f"{os.cpu_count()} CPUs shared by server and load generator"
    )
    for connections in args.connections:
        print(f"\nbombardier, {connections} connections")
        print(f"{'request':<36} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'vs floor':>9} {'errors':>7}  target")
        floor_rps = _median(measured[(connections, targets[0][0])])["rps"]
        for label, _url, _body in targets:
            row = _median(measured[(connections, label)])
            target = ""
            key = label.split()[0]
            if key in TARGETS:
                minimum, p99 = TARGETS[key]
                met = row["rps"] >= minimum and (p99 is None or row["p99"] <= p99)
                wanted = f">= {minimum:.0f} req/s" + (f", p99 <= {p99:.0f} ms" if p99 else "")
                target = f"{wanted}: {'met' if met else 'NOT met'}"
            print(
                f"{label:<36} {row['rps']:>8.0f} {row['p50']:>7.2f} {row['p99']:>7.2f} "
                f"{row['rps'] / floor_rps:>8.2f}x {row['failed']:>7.0f}  {target}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
