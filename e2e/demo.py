"""`make demo` / `make demo-down`: a local KVC cluster a newcomer can explore.

``up`` starts a supervisor process in the background and returns once its cluster is
ready.  The supervisor owns every demo process (they die with it) and stops them all
when ``down`` sends it SIGTERM, so nothing outlives the demo.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from e2e.cluster import ControlPlane, ControlPlaneError, NodeSpec, pid_alive, tail, terminate_group
from e2e.testenv import build

DEMO_DIR = Path(".demo")
SUPERVISOR_FILE = "supervisor.json"
NODES = [
    NodeSpec("kvc-demo-node-1", labels={"topology.kubernetes.io/zone": "zone-a"}),
    NodeSpec("kvc-demo-node-2", labels={"topology.kubernetes.io/zone": "zone-a"}),
    NodeSpec("kvc-demo-node-3", labels={"topology.kubernetes.io/zone": "zone-b"}),
]
STARTUP_TIMEOUT = 180


def _say(message: str = "") -> None:
    print(message, flush=True)


def _supervisor(demo_dir: Path) -> dict[str, object] | None:
    """The running demo's supervisor record, or None when no demo runs."""
    try:
        record: dict[str, object] = json.loads((demo_dir / SUPERVISOR_FILE).read_text())
    except (OSError, ValueError):
        return None
    pid = record.get("pid")
    return record if isinstance(pid, int) and pid_alive(pid) else None


def up(demo_dir: Path = DEMO_DIR) -> int:
    demo_dir = demo_dir.resolve()
    if _supervisor(demo_dir):
        _say(f"demo: a demo is already running ({demo_dir}); run `make demo-down` first")
        return 1
    shutil.rmtree(demo_dir, ignore_errors=True)  # what a killed demo left behind
    if build.missing_binaries():
        _say("demo: control plane not built yet: building it now (a cold build takes ~15 minutes) ...")
        build.build(build.load_versions())
    demo_dir.mkdir(parents=True)
    log_path = demo_dir / "supervisor.log"
    started = time.monotonic()
    _say("==> starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok")
    with log_path.open("wb") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "e2e.demo", "_serve", "--dir", str(demo_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives this command and the terminal's Ctrl-C
        )
    record = None
    while record is None:
        if supervisor.poll() is not None:
            _say(f"demo: error: the demo failed to start:\n{tail(log_path)}")
            shutil.rmtree(demo_dir, ignore_errors=True)
            return 1
        if time.monotonic() - started > STARTUP_TIMEOUT:
            terminate_group(supervisor.pid)
            _say(f"demo: error: not ready after {STARTUP_TIMEOUT}s:\n{tail(log_path)}")
            return 1
        time.sleep(0.2)
        record = _supervisor(demo_dir)
    kubeconfig = str(record["kubeconfig"])
    bin_dir = Path(str(record["bin_dir"]))
    _say(f"==> registered {len(NODES)} simulated nodes; ready in {time.monotonic() - started:.1f}s\n")
    _say("$ kubectl get nodes -o wide")
    nodes = subprocess.run(
        [str(bin_dir / "kubectl"), f"--kubeconfig={kubeconfig}", "get", "nodes", "-o", "wide"],
        capture_output=True,
        text=True,
        check=False,
    )
    _say(nodes.stdout or nodes.stderr)
    _say("Explore it:")
    _say(f"  export KUBECONFIG={kubeconfig}")
    _say(f"  export PATH={bin_dir}:$PATH   # kubectl {build.load_versions().kubernetes}")
    _say("  kubectl get nodes,pods -A")
    _say(f"Logs: {demo_dir}/cluster/logs")
    _say("Stop it:  make demo-down")
    return 0


def serve(demo_dir: Path) -> int:
    """The supervisor: run the demo cluster until SIGTERM, then stop everything."""
    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    plane = ControlPlane(workdir=demo_dir / "cluster")
    try:
        plane.start()
        plane.add_nodes(NODES)
        record = {"pid": os.getpid(), "kubeconfig": str(plane.kubeconfig), "bin_dir": str(plane.bin_dir)}
        (demo_dir / SUPERVISOR_FILE).write_text(json.dumps(record))
        while not stopping:
            plane.check_alive()
            time.sleep(0.5)
    finally:
        plane.stop()
        shutil.rmtree(demo_dir, ignore_errors=True)
    return 0


def down(demo_dir: Path = DEMO_DIR) -> int:
    demo_dir = demo_dir.resolve()
    record = _supervisor(demo_dir)
    if record is None:
        existed = demo_dir.exists()
        shutil.rmtree(demo_dir, ignore_errors=True)
        _say("demo: removed a stopped demo's files" if existed else "demo: nothing to stop (no demo is running)")
        return 0
    pid = int(str(record["pid"]))
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):  # its components die with it (PR_SET_PDEATHSIG)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(demo_dir, ignore_errors=True)
    _say(f"demo: stopped the control plane and removed {demo_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.demo", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "_serve"])
    parser.add_argument("--dir", type=Path, default=DEMO_DIR, help="where the demo keeps its state and logs")
    args = parser.parse_args(argv)
    try:
        if args.command == "_serve":
            return serve(args.dir)
        return up(args.dir) if args.command == "up" else down(args.dir)
    except (ControlPlaneError, build.TestenvError) as exc:
        _say(f"demo: error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
