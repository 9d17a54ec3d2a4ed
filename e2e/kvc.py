"""KVC's own processes in e2e tests: the controller (later the webhook and agents), run
from this source tree against the local control plane, as local processes."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import kubernetes
import yaml
from kubernetes.client.rest import ApiException

from certs import pki
from e2e.cluster import WEBHOOK_CLIENT_NAME, Component, ControlPlane, free_port
from e2e.helpers import wait_for
from kvc import defaults
from kvc.api import names
from kvc.testing.corpus import ALLOWED_DATA_ROOT, ALLOWED_NFS_SERVERS

WEBHOOK_MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "webhook" / "mutatingwebhookconfiguration.yaml"
AGENT_GRACE_SECONDS = 10.0


class KvcProcess:
    """A KVC component run as a local process; can be killed (SIGKILL) and started again:
    ``start()`` anew (new flags where a subclass picks them), or ``restart()`` as it last ran."""

    def __init__(self, plane: ControlPlane, name: str) -> None:
        self.plane = plane
        self.name = name
        self.component: Component | None = None
        self.metrics_port = free_port()
        self.env: dict[str, str] = {}
        # `kvc -v`: debug logging (tests that check what debug logs may print).
        self.verbose = False
        self._run_args: list[str] | None = None  # `kvc run ...` of the last start, for restart()

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        if self.component is not None:
            self.component.kill()
            self.plane.processes.pop(self.name, None)
            self.component = None

    def stop(self) -> None:
        if self.component is not None:
            self.component.stop()
            self.plane.processes.pop(self.name, None)
            self.component = None

    @property
    def running(self) -> bool:
        return self.component is not None and self.component.popen.poll() is None

    @property
    def pid(self) -> int | None:
        """The process's id (of the last one, after it exited); None before a start."""
        return None if self.component is None else self.component.pid

    @property
    def exit_code(self) -> int | None:
        """How the process ended (-N: killed by signal N); None while it runs, or before a start."""
        return None if self.component is None else self.component.popen.poll()

    @property
    def probe_url(self) -> str:
        """What answers 200 once the process serves: its metrics (subclasses with a health endpoint use it)."""
        return self.metrics_url

    def healthy(self, timeout: float = 1.0) -> bool:
        """Whether it runs and ``probe_url`` answers 200 now: one try, as one kubelet probe."""
        if not self.running:
            return False
        context = ssl.create_default_context()
        # A process of ours on loopback: the probe asks whether it answers, not who it is.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(self.probe_url, timeout=timeout, context=context) as response:  # noqa: S310
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def restart(self) -> Component:
        """Start it again with the flags of its last start (same ports, certificates, node), as the
        kubelet restarts a container; unlike ``start()``, returns at once, without waiting for
        it to be healthy (``healthy()`` says when it is)."""
        if self._run_args is None:
            raise RuntimeError(f"{self.name} was never started: nothing to restart")
        return self._spawn(self._run_args)

    def _spawn(self, args: list[str]) -> Component:
        self._run_args = list(args)
        self.component = self.plane.spawn(
            self.name,
            [sys.executable, "-m", "kvc", *(["-v"] if self.verbose else []), "run", *args],
            env={"KUBECONFIG": str(self.plane.kubeconfig), "PYTHONUNBUFFERED": "1", **self.env},
        )
        return self.component


class KvcController(KvcProcess):
    """`kvc run controller` against the control plane.

    ``agent_grace``: agents here heartbeat every 2 s, so by default a dead one is noticed
    quickly; a benchmark without agents passes a grace that outlasts it.
    """

    def __init__(
        self,
        plane: ControlPlane,
        agent_grace: float = AGENT_GRACE_SECONDS,
        timeout: float = 60,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(plane, "kvc-controller")
        self.agent_grace = agent_grace
        self.timeout = timeout
        # More flags, e.g. an admin's policy a test needs (--max-replicas-per-node=2).
        self.extra_args = list(extra_args)
        # JSON lines, as a log collector would read them (the agents log text).
        self.env["KVC_LOG_FORMAT"] = "json"
        self.liveness_url = ""  # chosen by start(); kept by restart()

    @property
    def probe_url(self) -> str:
        return self.liveness_url or self.metrics_url

    def start(self) -> KvcController:
        self.liveness_url = f"http://127.0.0.1:{free_port()}/healthz"
        component = self._spawn(
            [
                "controller",
                f"--liveness-endpoint={self.liveness_url}",
                f"--metrics-port={self.metrics_port}",
                f"--agent-grace={self.agent_grace}",
                f"--allowed-data-root={ALLOWED_DATA_ROOT}",
                *(f"--allowed-nfs-server={server}" for server in ALLOWED_NFS_SERVERS),
                *self.extra_args,
            ]
        )
        self.plane.wait_healthy(self.liveness_url, component, self.name, timeout=self.timeout)
        return self


CRD_DIR = Path(__file__).resolve().parent.parent / "deploy" / "crd"
KVC_CRDS = ("crd/volumemanagers.kvc.kubeflow.org", "crd/volumenodes.kvc.kubeflow.org")


NAMESPACES = CRD_DIR.parent / "default" / "namespaces.yaml"


def apply_crds(plane: ControlPlane, *manifests: Path, names_: tuple[str, ...] = ()) -> None:
    """KVC's CRDs from deploy/crd (and any other CRD ``manifests``), applied as an admin would,
    until the API server serves them (``names_``: the other CRDs to wait for); and KVC's
    credentials namespace from deploy/default, where the controller copies the Secrets that
    replicas need."""
    plane.kubectl("apply", "--server-side", "-k", str(CRD_DIR))
    (credentials,) = [
        doc
        for doc in yaml.safe_load_all(NAMESPACES.read_text())
        if doc["metadata"]["name"] == names.DEFAULT_CREDENTIALS_NAMESPACE
    ]
    plane.kubectl("apply", "--server-side", "-f", "-", input_text=yaml.safe_dump(credentials))
    for manifest in manifests:
        plane.kubectl("apply", "--server-side", "-f", str(manifest))
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", *KVC_CRDS, *names_)


NODE_DATA_ROOT = defaults.NODE_DATA_ROOT


class KvcAgent(KvcProcess):
    """`kvc run agent` for one simulated node, with a data root of its own."""

    def __init__(self, plane: ControlPlane, node: str, heartbeat: float = 2.0) -> None:
        super().__init__(plane, f"kvc-agent-{node}")
        self.node = node
        self.heartbeat = heartbeat
        self.data_root = plane.workdir / "nodes" / node

    def start(self) -> KvcAgent:
        self.data_root.mkdir(parents=True, exist_ok=True)
        self._spawn(
            [
                "agent",
                f"--node={self.node}",
                f"--metrics-port={self.metrics_port}",
                f"--data-root={self.data_root}",
                f"--node-data-root={NODE_DATA_ROOT}",
                f"--extra-root={ALLOWED_DATA_ROOT}={self.data_root / 'extra'}",
                f"--heartbeat={self.heartbeat}",
                "--verify-interval=5",
                "--deep-verify-interval=10",
            ]
        )
        return self

    def wait_reporting(self, timeout: float = 30) -> None:
        """Until this agent's VolumeNode carries a fresh heartbeat (placement needs one)."""
        custom = kubernetes.client.CustomObjectsApi(self.plane.api_client())
        started = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=self.heartbeat * 2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.component is not None:
                self.component.check_alive()
            try:
                vnode = custom.get_cluster_custom_object(names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL, self.node)
            except ApiException:
                vnode = {}
            beat = (vnode.get("status") or {}).get("heartbeatTime")
            if beat and dt.datetime.strptime(beat, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC) >= started:
                return
            time.sleep(0.2)
        raise TimeoutError(f"agent of {self.node} did not report within {timeout}s")

    def local(self, node_path: str) -> Path:
        """Where this node keeps the data of a node path."""
        if node_path.startswith(ALLOWED_DATA_ROOT + "/"):
            return self.data_root / "extra" / Path(node_path).relative_to(ALLOWED_DATA_ROOT)
        return self.data_root / Path(node_path).relative_to(NODE_DATA_ROOT)


class KvcWebhook(KvcProcess):
    """`kvc run webhook` on loopback with a certificate for 127.0.0.1, and its registration."""

    def __init__(self, plane: ControlPlane, name: str = "kvc-webhook") -> None:
        super().__init__(plane, name)
        self.port = free_port()
        self.ca = pki.new_ca("kvc-e2e-webhook-ca")
        directory = plane.workdir / name
        directory.mkdir(exist_ok=True)
        self.cert_file, self.key_file = directory / "tls.crt", directory / "tls.key"
        serving = pki.new_serving_cert(self.ca, ["localhost"], ["127.0.0.1"])
        self.cert_file.write_bytes(serving.cert_pem)
        self.key_file.write_bytes(serving.key_pem)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def probe_url(self) -> str:
        return f"{self.url}/readyz"

    def start(self) -> KvcWebhook:
        component = self._spawn(
            [
                "webhook",
                "--host=127.0.0.1",
                f"--port={self.port}",
                f"--cert-file={self.cert_file}",
                f"--key-file={self.key_file}",
                # Only kube-apiserver's certificate gets admission answers.
                f"--client-ca-file={self.plane.webhook_client_ca}",
                f"--client-name={WEBHOOK_CLIENT_NAME}",
            ]
        )
        self.plane.wait_healthy(self.probe_url, component, self.name, timeout=60, client_certificate=False)
        return self

    def registration(self) -> dict[str, Any]:
        """deploy/webhook's configuration, pointed at this process instead of the Service."""
        manifest = yaml.safe_load((WEBHOOK_MANIFEST).read_text())
        for hook in manifest["webhooks"]:
            hook["clientConfig"] = {
                "url": f"{self.url}/mutate",
                "caBundle": base64.b64encode(self.ca.cert_pem).decode(),
            }
        return dict(manifest)

    def register(self, api: Any) -> str:
        """Register with the API server and wait until it calls this webhook; returns the configuration's name."""
        registration = self.registration()
        kubernetes.client.AdmissionregistrationV1Api(api).create_mutating_webhook_configuration(registration)
        core = kubernetes.client.CoreV1Api(api)
        probe = {
            "metadata": {"name": "probe", "annotations": {"kvc/volume": "probe"}},
            "spec": {"containers": [{"name": "main", "image": "busybox:1.36"}]},
        }

        def active() -> bool:
            # A request the webhook denies proves the API server now calls it.
            try:
                core.create_namespaced_pod("default", probe, dry_run="All")
            except ApiException as exc:
                return "KVC: volume probe not found" in str(exc.body)
            return False

        wait_for(active, what="the webhook registration to take effect")
        return str(registration["metadata"]["name"])

    @contextlib.contextmanager
    def registered(self, api: Any) -> Iterator[KvcWebhook]:
        """Registered with the API server, and called by it, until the block ends."""
        name = self.register(api)
        try:
            yield self
        finally:
            kubernetes.client.AdmissionregistrationV1Api(api).delete_mutating_webhook_configuration(name)
