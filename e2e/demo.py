"""`make demo` / `make demo-down`: a local KVC cluster a newcomer can explore.

``up`` starts the cached control plane with simulated nodes, left running in the
background, and prints how to reach it; ``down`` stops it and removes its files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from e2e.cluster import STATE_FILE, ControlPlane, ControlPlaneError, NodeSpec, stop_detached
from e2e.testenv import build

DEMO_DIR = Path(".demo")
NODES = [
    NodeSpec("kvc-demo-node-1", labels={"topology.kubernetes.io/zone": "zone-a"}),
    NodeSpec("kvc-demo-node-2", labels={"topology.kubernetes.io/zone": "zone-a"}),
    NodeSpec("kvc-demo-node-3", labels={"topology.kubernetes.io/zone": "zone-b"}),
]


def _say(message: str = "") -> None:
    print(message, flush=True)


def up(demo_dir: Path = DEMO_DIR) -> int:
    demo_dir = demo_dir.resolve()
    if (demo_dir / STATE_FILE).exists():
        _say(f"demo: a demo is already running ({demo_dir}); run `make demo-down` first")
        return 1
    missing = build.missing_binaries()
    if missing:
        _say(f"demo: control plane not built ({', '.join(missing)} missing): building it now ...")
        build.build(build.load_versions())
    started = time.monotonic()
    _say("==> starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok")
    plane = ControlPlane(detached=True, workdir=demo_dir)
    plane.start()
    try:
        _say(f"==> registering {len(NODES)} simulated nodes")
        plane.add_nodes(NODES)
    except BaseException:
        plane.stop()
        raise
    _say(f"==> control plane ready in {time.monotonic() - started:.1f}s\n")
    _say("$ kubectl get nodes -o wide")
    _say(plane.kubectl("get", "nodes", "-o", "wide").stdout)
    _say("Explore it:")
    _say(f"  export KUBECONFIG={plane.kubeconfig}")
    _say(f"  export PATH={plane.bin_dir}:$PATH   # kubectl {build.load_versions().kubernetes}")
    _say("  kubectl get nodes,pods -A")
    _say(f"Component logs: {plane.logs_dir}")
    _say("Stop it:  make demo-down")
    return 0


def down(demo_dir: Path = DEMO_DIR) -> int:
    demo_dir = demo_dir.resolve()
    state_path = demo_dir / STATE_FILE
    if not state_path.exists():
        _say("demo: nothing to stop (no demo is running)")
        return 0
    pids = json.loads(state_path.read_text()).get("pids", {})
    stop_detached(demo_dir)
    _say(f"demo: stopped {', '.join(pids)} and removed {demo_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.demo", description=__doc__)
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=DEMO_DIR, help="where the demo keeps its state and logs")
    args = parser.parse_args(argv)
    try:
        return up(args.dir) if args.command == "up" else down(args.dir)
    except (ControlPlaneError, build.TestenvError) as exc:
        _say(f"demo: error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
