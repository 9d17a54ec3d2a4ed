"""`make demo` as a newcomer runs it: all of KVC comes up, the data arrives, the workloads land
on the nodes holding it, a KVC process that dies comes back while the demo keeps serving, and
`make demo-down` leaves no process behind.

The demo comes up once for the module (``demo``); the test of `down` runs last and stops it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from e2e.cluster import pid_alive
from e2e.demo import (
    ALL_VOLUMEMANAGERS,
    DATASETS,
    IMAGES,
    MODEL,
    MODEL_FILE,
    MODELS,
    NAMESPACE,
    NODES,
    POD_NAME,
    S3_PORT_ENV,
    SUPERVISOR_FILE,
    TFJOB_NAME,
    sample_model_sha256,
    write_model_tarball,
)
from e2e.helpers import VolumeManagers, restricted_pod, wait_for, webhook_knows
from kvc.api import names

ROOT = Path(__file__).resolve().parent.parent


def _demo(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "e2e.demo", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def _holders(vm: dict[str, Any], volume_id: str) -> set[str]:
    volume = next(v for v in vm["status"]["volumes"] if v["id"] == volume_id)
    return {n["name"] for n in volume["nodes"] if n["phase"] == "Ready"}


@dataclasses.dataclass
class RunningDemo:
    directory: Path
    up: subprocess.CompletedProcess[str]
    supervisor: int | None
    processes: set[int]  # every process of the demo when `up` returned

    def assert_up(self) -> None:
        assert self.up.returncode == 0, self.up.stdout + self.up.stderr

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = json.loads((self.directory / SUPERVISOR_FILE).read_text())
        return record

    def component(self, name: str) -> dict[str, Any]:
        (row,) = [row for row in self.record()["components"] if row["name"] == name]
        return dict(row)

    def api(self) -> Any:
        return kubernetes.config.new_client_from_config(config_file=str(self.directory / "cluster" / "kubeconfig"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDemo]:
    """One demo for the module: coming up takes most of a test's time."""
    demo_dir = (tmp_path_factory.mktemp("demo") / "demo").resolve()
    # Any free port: a `make demo` of the same user may hold the default one.
    started = _demo("up", "--dir", str(demo_dir), env={S3_PORT_ENV: "0"}, timeout=360)
    record = demo_dir / SUPERVISOR_FILE  # none when `up` failed: the test shows its output
    supervisor = json.loads(record.read_text())["pid"] if record.exists() else None
    processes = descendants(supervisor) if supervisor else set()
    try:
        yield RunningDemo(demo_dir, started, supervisor, processes)
    finally:
        _demo("down", "--dir", str(demo_dir), timeout=120)  # when the test of `down` did not run


def controller_line(demo: RunningDemo) -> str:
    """The Controller line of `kvc status`, run as the demo's admin (its kubeconfig)."""
    result = subprocess.run(
        [sys.executable, "-m", "kvc", "status", DATASETS, "-n", NAMESPACE],
        env={**os.environ, "KUBECONFIG": str(demo.directory / "cluster" / "kubeconfig")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return next(line for line in result.stdout.splitlines() if line.startswith("Controller:"))


def status_rows(output: str) -> dict[str, dict[str, str]]:
    """`python -m e2e.demo status` read back: NAME -> {column: value} (cells hold single spaces only)."""
    header, *lines = [re.split(r" {3,}", line.strip()) for line in output.strip().splitlines()]
    return {cells[0]: dict(zip(header, cells, strict=True)) for cells in lines}


def test_the_sample_pins_the_model_the_demo_generates(tmp_path: Path) -> None:
    assert write_model_tarball(tmp_path / "model.tar") == sample_model_sha256()


def test_a_taken_s3_port_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _demo("up", "--dir", str(tmp_path / "demo"), env={S3_PORT_ENV: str(port)}, timeout=60)
    assert result.returncode == 1
    assert result.stdout.strip().splitlines() == [
        f"demo: error: port {port} (the demo's S3 server) is in use: stop what listens there, "
        f"or run with {S3_PORT_ENV}=<free port> (0 for any)"
    ]
    assert not (tmp_path / "demo").exists()


@pytest.mark.timeout(480)
def test_demo_brings_data_to_the_workloads(demo: RunningDemo) -> None:
    demo.assert_up()
    demo_dir, out, processes = demo.directory, demo.up.stdout, demo.processes
    for node in NODES:
        assert any(line.startswith(node.name) and " Ready " in line for line in out.splitlines())
    assert "State:    Running" in out  # `kvc status` with its progress bars, until Running
    assert "[####################] 100%" in out
    assert "+ nodeAffinity  required: data.kvc.kubeflow.org/" in out
    assert "Summary" in out
    assert "demo completed in" in out
    assert f"export KUBECONFIG={demo_dir}/cluster/kubeconfig" in out
    assert f"Stop it:  python -m e2e.demo down --dir {demo_dir}" in out
    assert f"python -m e2e.demo status --dir {demo_dir}   # the demo's processes" in out
    assert len(processes) >= 12  # control plane 5, S3, 4 agents, controller, webhook

    api = demo.api()
    custom = kubernetes.client.CustomObjectsApi(api)
    core = kubernetes.client.CoreV1Api(api)
    vms = {
        name: custom.get_namespaced_custom_object(
            names.GROUP, names.VERSION, NAMESPACE, names.VOLUMEMANAGER_PLURAL, name
        )
        for name in ALL_VOLUMEMANAGERS
    }
    assert {name: vm["status"]["state"] for name, vm in vms.items()} == dict.fromkeys(ALL_VOLUMEMANAGERS, "Running")
    images, model = _holders(vms[DATASETS], IMAGES), _holders(vms[MODELS], MODEL)
    assert len(images) == 2
    assert len(model) == len(NODES)

    pods = {p.metadata.name: p for p in core.list_namespaced_pod(NAMESPACE).items}
    assert pods[POD_NAME].spec.node_name in images
    job_pods = [p for name, p in pods.items() if name.startswith(f"{TFJOB_NAME}-")]
    assert len(job_pods) == 3
    # The demo's namespace enforces `restricted`: the S3 and HTTP data arrive through their claims.
    assert core.read_namespace(NAMESPACE).metadata.labels["pod-security.kubernetes.io/enforce"] == "restricted"
    claims = {v["claimName"] for vm in (vms[DATASETS], vms[MODELS]) for v in vm["status"]["volumes"]}
    for pod in [pods[POD_NAME], *job_pods]:
        assert pod.status.phase == "Running"
        assert pod.spec.node_name in images
        assert all(volume.host_path is None for volume in pod.spec.volumes)
        mounted = {v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim}
        assert mounted & claims
        assert f"pod/{pod.metadata.name} " in out
        assert pod.spec.node_name in out

    again = _demo("up", "--dir", str(demo_dir), timeout=60)
    assert again.returncode == 1
    assert "already running" in again.stdout

    status = _demo("status", "--dir", str(demo_dir), timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    rows = status_rows(status.stdout)
    kvc = ["kvc-controller", "kvc-webhook", *(f"kvc-agent-{node.name}" for node in NODES)]
    assert set(kvc) | {"etcd", "kube-apiserver", "kube-scheduler"} <= set(rows)
    for row in rows.values():
        assert (row["STATUS"], row["RESTARTS"], row["LAST EXIT"]) == ("Running", "0", "-"), row
        assert int(row["PID"]) in processes


HEALED_VOLUMEMANAGER, HEALED_VOLUME = "after-restart", "weights"


@pytest.mark.timeout(600)
def test_a_killed_controller_is_started_again_and_the_demo_keeps_serving(demo: RunningDemo) -> None:
    demo.assert_up()
    killed = demo.component("kvc-controller")
    assert killed["restarts"] == 0
    # `kvc status` shows the controller's heartbeat: this process, never restarted.
    before = wait_for(
        lambda: "restarted 0 times)" in (line := controller_line(demo)) and line,
        timeout=30,
        what="kvc status to show the controller's heartbeat",
    )
    assert before.startswith(f"Controller: running ({socket.gethostname()}-{killed['pid']}, renewed ")
    os.kill(killed["pid"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(killed["pid"]), timeout=10, what="the controller to die")

    # Data the dead controller never saw, asked for by a pod: only a controller that came back
    # places it, reports it Running and lets the pod (gated while its data is on its way) schedule.
    api = demo.api()
    core = kubernetes.client.CoreV1Api(api)
    vms = VolumeManagers(api, NAMESPACE)
    vms.create(
        HEALED_VOLUMEMANAGER,
        [
            {
                "id": HEALED_VOLUME,
                "sourceType": "HTTP",
                "replicas": 1,
                "accessMode": "ReadOnlyMany",
                "capacity": "64Mi",
                "options": {
                    "url": f"{demo.record()['http_endpoint']}/{MODEL_FILE}",
                    "sha256": sample_model_sha256(),
                    "unpack": "tar",
                },
            }
        ],
    )
    ref = f"{HEALED_VOLUMEMANAGER}/{HEALED_VOLUME}"
    wait_for(lambda: webhook_knows(core, NAMESPACE, ref), what="the webhook to index the new VolumeManager")
    created = core.create_namespaced_pod(NAMESPACE, restricted_pod("after-restart", {"kvc/volume": ref}))
    claim_names = {v.persistent_volume_claim.claim_name for v in created.spec.volumes if v.persistent_volume_claim}
    assert claim_names, "the webhook wired no claim into the pod"

    def restarted() -> dict[str, Any] | None:
        row = demo.component("kvc-controller")
        return row if row["restarts"] == 1 and row["state"] == "Running" else None

    back = wait_for(restarted, timeout=90, what="the supervisor to restart the controller")
    assert back["pid"] != killed["pid"]
    assert pid_alive(back["pid"])
    assert back["pid"] in descendants(demo.supervisor or 0)
    assert back["last_exit"]["signal"] == "SIGKILL"
    for row in demo.record()["components"]:  # only the dead one was restarted
        assert row["restarts"] == (1 if row["name"] == "kvc-controller" else 0), row

    status = _demo("status", "--dir", str(demo.directory), timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    controller = status_rows(status.stdout)["kvc-controller"]
    assert (controller["PID"], controller["STATUS"], controller["RESTARTS"]) == (str(back["pid"]), "Running", "1")
    assert controller["LAST EXIT"].startswith("SIGKILL (")
    log = (demo.directory / "supervisor.log").read_text()
    assert re.search(r"kvc-controller exited \(killed by SIGKILL\) after \d+s; restarting in 1s \(restart 1\)", log)
    assert f"kvc-controller running again (pid {back['pid']}, restart 1)" in log
    # KVC's own view: the new process took the heartbeat Lease over, counted as one restart.
    after = wait_for(
        lambda: "restarted 1 time)" in (line := controller_line(demo)) and line,
        timeout=30,
        what="kvc status to show the controller restarted once",
    )
    assert after.startswith(f"Controller: running ({socket.gethostname()}-{back['pid']}, renewed ")

    vm = vms.wait_state(HEALED_VOLUMEMANAGER, "Running", timeout=120)
    (volume,) = vm["status"]["volumes"]
    assert volume["claimName"] in claim_names  # the claim the webhook named is the one the controller made
    holders = {n["name"] for n in volume["nodes"] if n["phase"] == "Ready"}

    def running() -> Any:
        pod = core.read_namespaced_pod("after-restart", NAMESPACE)
        return pod if pod.status.phase == "Running" else None

    pod = wait_for(running, timeout=60, what="the pod to be released onto its data and run")
    assert pod.spec.node_name in holders
    assert not pod.spec.scheduling_gates


def test_down_stops_every_process_and_leaves_nothing(demo: RunningDemo) -> None:
    """Last in the module: it stops the demo the other tests share."""
    demo.assert_up()
    demo_dir = demo.directory
    assert demo.supervisor is not None
    processes = demo.processes | descendants(demo.supervisor)  # and whatever was restarted since
    stopped = _demo("down", "--dir", str(demo_dir), timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not demo_dir.exists()
    assert not pid_alive(demo.supervisor)
    assert not [pid for pid in processes if pid_alive(pid)]
    assert "nothing to stop" in _demo("down", "--dir", str(demo_dir)).stdout
    status = _demo("status", "--dir", str(demo_dir))
    assert (status.returncode, status.stdout) == (1, "demo: no demo is running\n")
