"""`make demo` as a newcomer runs it: all of KVC comes up, the data arrives, the workloads land
on the nodes holding it, and `make demo-down` leaves no process behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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
def test_demo_brings_data_to_the_workloads_and_down_leaves_nothing(tmp_path: Path) -> None:
    demo_dir = (tmp_path / "demo").resolve()
    # Any free port: a `make demo` of the same user may hold the default one.
    started = _demo("up", "--dir", str(demo_dir), env={S3_PORT_ENV: "0"}, timeout=360)
    supervisor = json.loads((demo_dir / SUPERVISOR_FILE).read_text())["pid"] if demo_dir.exists() else None
    processes = descendants(supervisor) if supervisor else set()
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        out = started.stdout
        for node in NODES:
            assert any(line.startswith(node.name) and " Ready " in line for line in out.splitlines())
        assert "State:    Running" in out  # `kvc status` with its progress bars, until Running
        assert "[####################] 100%" in out
        assert "+ nodeAffinity  required: data.kvc.kubeflow.org/" in out
        assert "Summary" in out
        assert "demo completed in" in out
        assert f"export KUBECONFIG={demo_dir}/cluster/kubeconfig" in out
        assert f"Stop it:  python -m e2e.demo down --dir {demo_dir}" in out
        assert len(processes) >= 12  # control plane 5, S3, 4 agents, controller, webhook

        api = kubernetes.config.new_client_from_config(config_file=str(demo_dir / "cluster" / "kubeconfig"))
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
    finally:
        stopped = _demo("down", "--dir", str(demo_dir), timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not demo_dir.exists()
    assert supervisor is not None
    assert not pid_alive(supervisor)
    assert not [pid for pid in processes if pid_alive(pid)]
    assert "nothing to stop" in _demo("down", "--dir", str(demo_dir)).stdout
