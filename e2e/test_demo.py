"""`make demo` as a newcomer runs it: the cluster comes up, is reachable, and goes away."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from e2e.cluster import pid_alive
from e2e.demo import NODES, SUPERVISOR_FILE

ROOT = Path(__file__).resolve().parent.parent


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "e2e.demo", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def test_demo_up_shows_ready_nodes_and_down_leaves_nothing(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    started = _demo("up", "--dir", str(demo_dir))
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        for node in NODES:
            assert any(line.startswith(node.name) and " Ready " in line for line in started.stdout.splitlines())
        assert f"export KUBECONFIG={demo_dir.resolve()}/cluster/kubeconfig" in started.stdout
        assert "make demo-down" in started.stdout
        supervisor = json.loads((demo_dir / SUPERVISOR_FILE).read_text())["pid"]
        state = json.loads((demo_dir / "cluster" / "state.json").read_text())

        again = _demo("up", "--dir", str(demo_dir))
        assert again.returncode == 1
        assert "already running" in again.stdout
    finally:
        stopped = _demo("down", "--dir", str(demo_dir))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not demo_dir.exists()
    assert not pid_alive(supervisor)
    assert not any(pid_alive(pid) for pid in state["pids"].values())
    assert "nothing to stop" in _demo("down", "--dir", str(demo_dir)).stdout
