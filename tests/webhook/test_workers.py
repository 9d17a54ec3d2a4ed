"""`kvc run webhook --workers 2` as a process, against a stand-in API server on loopback."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from certs import pki
from kvc.api import names
from webhook import workers

ROOT = Path(__file__).resolve().parents[2]
LIST_PATH = f"/apis/{names.GROUP}/{names.VERSION}/{names.VOLUMEMANAGER_PLURAL}"
SOURCE = {"hostPath": {"path": "/var/lib/kvc/team-a/datasets/cifar-1", "type": "Directory"}}
VOLUMEMANAGER = {
    "apiVersion": names.API_VERSION,
    "kind": "VolumeManager",
    "metadata": {"name": "datasets", "namespace": "team-a"},
    "spec": {"volumeConfigs": [{"id": "cifar", "sourceType": "S3"}]},
    "status": {"volumes": [{"id": "cifar", "phase": "Ready", "message": "ok", "volumeSource": SOURCE}]},
}


class FakeAPIServer(ThreadingHTTPServer):
    """Lists one VolumeManager; holds every list after the first until ``release`` is set,
    and keeps watches open without events."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lists = 0
        self.release = threading.Event()
        self.closing = threading.Event()
        self._count = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: FakeAPIServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if not self.path.startswith(LIST_PATH):
            self.send_error(404)
            return
        if "watch=true" in self.path.lower():
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.flush()
            self.server.closing.wait(60)
            return
        with self.server._count:
            self.server.lists += 1
            first = self.server.lists == 1
        if not first:
            self.server.release.wait(60)
        body = json.dumps({"items": [VOLUMEMANAGER], "metadata": {"resourceVersion": "7"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def api_server() -> Iterator[FakeAPIServer]:
    server = FakeAPIServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.closing.set()
    server.shutdown()
    server.server_close()


class Webhook:
    """The `kvc run webhook` process, its certificate authority and its log."""

    def __init__(self, tmp_path: Path, api_server: FakeAPIServer, workers: int) -> None:
        ca = pki.new_ca("webhook-workers-test")
        serving = pki.new_serving_cert(ca, ["localhost"], ["127.0.0.1"])
        cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
        cert_file.write_bytes(serving.cert_pem)
        key_file.write_bytes(serving.key_pem)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{api_server.server_port}"}}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "c",
                }
            )
        )
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.context = ssl.create_default_context(cadata=ca.cert_pem.decode())
        self.log = tmp_path / "webhook.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "KVC_", "PROMETHEUS_"))}
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "kvc", "run", "webhook", "--host=127.0.0.1", f"--port={self.port}"),
                *(f"--cert-file={cert_file}", f"--key-file={key_file}", f"--workers={workers}"),
            ],
            cwd=ROOT,
            env={**env, "KUBECONFIG": str(kubeconfig), "PYTHONPATH": str(ROOT)},
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """One request on a new connection (so the kernel picks a worker each time)."""
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw,
            self.context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
            tls.sendall(head.encode() + b"Content-Type: application/json\r\n\r\n" + body)
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
        status_line, _, rest = answer.partition(b"\r\n")
        return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]

    def worker_pids(self) -> set[int]:
        return {int(pid) for pid in re.findall(r"webhook serving on \S+ \(pid (\d+)\)", self.log.read_text())}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def start_webhook(tmp_path: Path, api_server: FakeAPIServer) -> Iterator[Callable[[int], Webhook]]:
    started: list[Webhook] = []

    def start(count: int) -> Webhook:
        started.append(Webhook(tmp_path, api_server, count))
        return started[-1]

    yield start
    for webhook in started:
        webhook.stop()


def wait_for(condition: Callable[[], bool], what: str, webhook: Webhook, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except OSError:
            pass
        if webhook.process.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s\n{webhook.log.read_text()}")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def review(uid: int) -> bytes:
    pod = {"kind": "Pod", "metadata": {"annotations": {"kvc/volume": "cifar"}}, "spec": {"containers": [{"name": "c"}]}}
    request = {"uid": f"uid-{uid}", "operation": "CREATE", "namespace": "team-a", "object": pod}
    return json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}).encode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_two_workers_share_the_port_readiness_and_metrics(
    start_webhook: Callable[[int], Webhook], api_server: FakeAPIServer
) -> None:
    webhook = start_webhook(2)
    wait_for(lambda: len(webhook.worker_pids()) == 2 and api_server.lists == 2, "both workers listening", webhook)
    # One worker has its index, the other's list is held: whichever answers, not ready.
    answers = {webhook.request("GET", "/readyz") for _ in range(8)}
    assert answers == {(503, b"VolumeManager index not synced yet")}
    assert webhook.request("GET", "/healthz")[0] == 200

    api_server.release.set()
    wait_for(lambda: webhook.request("GET", "/readyz") == (200, b"ok"), "ready once both have synced", webhook)
    for uid in range(20):
        status, body = webhook.request("POST", "/mutate", review(uid))
        assert status == 200
        assert json.loads(body)["response"]["patchType"] == "JSONPatch"
    # Every scrape sums the workers' counters, whichever worker answers it.
    for _ in range(4):
        status, text = webhook.request("GET", "/metrics")
        found = samples(text.decode())
        assert found[("kvc_webhook_admissions_total", (("result", "patched"),))] == 20
        assert found[("kvc_webhook_admission_seconds_count", ())] == 20
        assert found[("kvc_webhook_indexed_volumemanagers", ())] == 1

    pids = webhook.worker_pids()
    webhook.stop()
    assert webhook.process.returncode == 0
    assert not any(alive(pid) for pid in pids)
    assert "Traceback" not in webhook.log.read_text()


def connections_per_worker(webhook: Webhook) -> list[int]:
    """Established TCP connections on the webhook's port held by each worker (Linux /proc)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == webhook.port and fields[3] == "01":  # ESTABLISHED
            inodes.add(f"socket:[{fields[9]}]")
    return [
        sum(1 for fd in Path(f"/proc/{pid}/fd").iterdir() if os.readlink(fd) in inodes)
        for pid in sorted(webhook.worker_pids())
    ]


def test_keep_alive_connections_are_dealt_to_the_workers_in_turn(
    start_webhook: Callable[[int], Webhook], api_server: FakeAPIServer
) -> None:
    api_server.release.set()
    webhook = start_webhook(2)
    wait_for(lambda: webhook.request("GET", "/readyz") == (200, b"ok"), "ready", webhook)
    open_connections = []
    for _ in range(6):
        connection = http.client.HTTPSConnection("127.0.0.1", webhook.port, context=webhook.context, timeout=10)
        connection.request("GET", "/healthz")
        assert connection.getresponse().read() == b"ok"
        open_connections.append(connection)
    try:
        assert connections_per_worker(webhook) == [3, 3]
    finally:
        for connection in open_connections:
            connection.close()


def test_a_worker_that_dies_stops_the_others_and_the_supervisor_fails(
    start_webhook: Callable[[int], Webhook], api_server: FakeAPIServer
) -> None:
    api_server.release.set()
    webhook = start_webhook(2)
    wait_for(lambda: webhook.request("GET", "/readyz") == (200, b"ok"), "ready", webhook)
    first, second = sorted(webhook.worker_pids())
    os.kill(first, signal.SIGKILL)
    assert webhook.process.wait(30) == 1
    assert not alive(second)
    assert "exited with code -9; stopped the others so that the container restarts" in webhook.log.read_text()


def test_one_worker_serves_from_the_process_itself(
    start_webhook: Callable[[int], Webhook], api_server: FakeAPIServer
) -> None:
    api_server.release.set()
    webhook = start_webhook(1)
    wait_for(lambda: webhook.request("GET", "/readyz") == (200, b"ok"), "ready", webhook)
    assert webhook.worker_pids() == {webhook.process.pid}
    text = webhook.request("GET", "/metrics")[1].decode()
    assert "process_cpu_seconds_total" in text  # single-process metrics keep the process collector
    webhook.stop()
    assert webhook.process.returncode == 0


@pytest.mark.parametrize(
    ("v2", "v1_quota", "affinity", "expected"),
    [
        ("max 100000\n", None, 8, 8),
        ("150000 100000\n", None, 8, 2),  # 1.5 CPUs: two workers, each takes what it gets
        ("50000 100000\n", None, 8, 1),
        ("400000 100000\n", None, 2, 2),  # never more than the CPUs it may run on
        (None, "200000", 8, 2),
        (None, "-1", 3, 3),
        (None, None, 3, 3),
    ],
)
def test_the_cpus_come_from_the_affinity_and_the_container_limit(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    v2: str | None,
    v1_quota: str | None,
    affinity: int,
    expected: int,
) -> None:
    v2_max, quota, period = tmp_path / "cpu.max", tmp_path / "cpu.cfs_quota_us", tmp_path / "cpu.cfs_period_us"
    if v2 is not None:
        v2_max.write_text(v2)
    if v1_quota is not None:
        quota.write_text(v1_quota)
        period.write_text("100000")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    assert workers._available_cpus(v2_max, quota, period) == expected


def test_the_default_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "_available_cpus", lambda: 64)
    assert workers.default_workers() == workers.MAX_DEFAULT_WORKERS
    monkeypatch.setattr(workers, "_available_cpus", lambda: 1)
    assert workers.default_workers() == 1


def test_metrics_directories_of_dead_supervisors_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live, other = (
        tmp_path / f"kvc-webhook-metrics-{dead.pid}-x1",
        tmp_path / f"kvc-webhook-metrics-{os.getpid()}-x2",
        tmp_path / "something-else",
    )
    for directory in (stale, live, other):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"0")
    workers._remove_stale_metrics(tmp_path)
    assert not stale.exists()
    assert live.exists()
    assert other.exists()
