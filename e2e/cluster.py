"""A real, local Kubernetes control plane for e2e tests and the demo.

``ControlPlane`` starts etcd, kube-apiserver (TLS, client-certificate admin, RBAC,
admission webhooks on, ServiceAccount token signing), kube-controller-manager,
kube-scheduler and kwok from the binaries that ``make testenv`` caches, on free
loopback ports, in a private working directory.  Simulated nodes are Node objects that
kwok keeps Ready; their pods are bound by the real scheduler and marked Running by kwok.

Teardown stops every process and removes the working directory, also after a failed
start.  Children die with the harness process (``PR_SET_PDEATHSIG``), so even a
SIGKILLed harness leaves no process; the working directories of such harnesses are
removed by the next start.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import yaml

from certs import pki
from e2e.testenv import build

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
KWOK_STAGES = HERE / "kwok-stages.yaml"
SERVICE_CIDR = "10.0.0.0/24"
# The first address of the service range: the API server's own `kubernetes` Service.
KUBERNETES_SERVICE_IP = "10.0.0.1"
# The name in the client certificate kube-apiserver presents to admission webhooks.
WEBHOOK_CLIENT_NAME = "kube-apiserver-webhook-client"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
WORKDIR_PREFIX = "kvc-cp-"
_OWNER_FILE = "owner.pid"
STATE_FILE = "state.json"
PR_SET_PDEATHSIG = 1


class ControlPlaneError(RuntimeError):
    """The control plane could not start or a component died; the message carries log tails."""


@dataclass(frozen=True)
class NodeSpec:
    """A simulated node: its labels, taints and allocatable resources."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    internal_ip: str = ""
    taints: Sequence[Mapping[str, str]] = ()
    cpu: str = "32"
    memory: str = "128Gi"
    pods: str = "110"
    ephemeral_storage: str = "1Ti"

    def manifest(self) -> dict[str, Any]:
        resources = {
            "cpu": self.cpu,
            "memory": self.memory,
            "pods": self.pods,
            "ephemeral-storage": self.ephemeral_storage,
        }
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    **self.labels,
                },
                "annotations": {KWOK_NODE_ANNOTATION: "fake"},
            },
            "spec": {"taints": [dict(t) for t in self.taints]},
            "status": {
                "capacity": resources,
                "allocatable": resources,
                "addresses": [
                    {"type": "InternalIP", "address": self.internal_ip},
                    {"type": "Hostname", "address": self.name},
                ],
            },
        }


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """Run in the child before exec: SIGKILL it if the harness process dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """Whether a process runs; a zombie (exited, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def reap_stale_workdirs(root: Path | None = None) -> list[Path]:
    """Remove working directories left by harnesses that were SIGKILLed."""
    root = root or Path(tempfile.gettempdir())
    reaped = []
    for directory in root.glob(f"{WORKDIR_PREFIX}*"):
        owner = directory / _OWNER_FILE
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(pid):
            continue
        # Its components died with it (PR_SET_PDEATHSIG); only the files are left.
        shutil.rmtree(directory, ignore_errors=True)
        reaped.append(directory)
    return reaped


def terminate_group(pid: int, grace: float = 3) -> None:
    """SIGTERM a process group, then SIGKILL it if its leader is still running after ``grace``.

    Everything here runs on throw-away data, so a short grace is enough: it lets a component
    flush its log, not drain connections (kube-apiserver would wait a minute for that).
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class Component:
    """A process of the harness: logs to a file, dies with the harness, stopped as a group."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=None if env is None else {**os.environ, **env},
            # Own process group: a Ctrl-C in the terminal reaches the harness, which then
            # stops the components in order, instead of all of them at once.
            start_new_session=True,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl
        )
        self.stopped = False  # on purpose: its exit is not a failure

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None and not self.stopped:
            raise ControlPlaneError(f"{self.name} exited with code {code}:\n{tail(self.log_path)}")

    def stop(self) -> None:
        self.stopped = True
        if self.popen.poll() is None:
            terminate_group(self.popen.pid)
        self.popen.wait()  # reap it: no zombie left behind
        self._log.close()

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        self.stopped = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        self._log.close()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tail(path: Path, lines: int = 40) -> str:
    try:
        content = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"  (no log at {path})"
    return "\n".join(f"  | {line}" for line in content[-lines:])


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok on loopback."""

    def __init__(
        self,
        workdir: Path | None = None,
        bin_dir: Path | None = None,
        *,
        node_lease_seconds: int = 40,
    ) -> None:
        """``node_lease_seconds``: how long a simulated node's Lease lasts (kwok renews it) and
        how long kube-controller-manager waits for a heartbeat before it marks a node Unknown."""
        self.node_lease_seconds = node_lease_seconds
        self.bin_dir = bin_dir or build.bin_dir()
        self._given_workdir = workdir
        self.workdir = Path()
        self.ports: dict[str, int] = {}
        self.processes: dict[str, Component] = {}
        self.ca: pki.CertKeyPair | None = None
        self.server = ""
        self._nodes_added = 0

    # ------------------------------------------------------------------ paths
    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    def binary(self, name: str) -> str:
        path = self.bin_dir / name
        if not path.is_file():
            raise ControlPlaneError(f"{path} is missing: run `make testenv` to build the control plane")
        return str(path)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> ControlPlane:
        missing = build.missing_binaries()
        if missing and self.bin_dir == build.bin_dir():
            raise ControlPlaneError(
                f"control plane not built ({', '.join(missing)} missing in {self.bin_dir}): run `make testenv`"
            )
        reap_stale_workdirs()
        if self._given_workdir:
            self.workdir = self._given_workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        (self.workdir / _OWNER_FILE).write_text(str(os.getpid()))
        self.logs_dir.mkdir(exist_ok=True)
        try:
            self._write_pki()
            self._start_etcd()
            self._start_apiserver()
            self._start_controller_manager()
            self._start_scheduler()
            self._start_kwok()
            self._save_state()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, keep_logs_in: Path | None = None) -> None:
        """Stop components in reverse start order and remove the working directory."""
        for name in reversed(list(self.processes)):
            self.processes[name].stop()
        self.processes.clear()
        if keep_logs_in and self.logs_dir.is_dir():
            keep_logs_in.mkdir(parents=True, exist_ok=True)
            shutil.copytree(self.logs_dir, keep_logs_in, dirs_exist_ok=True)
        if self.workdir != Path() and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def check_alive(self) -> None:
        for process in self.processes.values():
            process.check_alive()

    def log_tails(self, lines: int = 30) -> str:
        parts = []
        for log in sorted(self.logs_dir.glob("*.log")):
            parts.append(f"--- {log.name} (last {lines} lines)\n{tail(log, lines)}")
        return "\n".join(parts)

    def _save_state(self) -> None:
        state = {
            "workdir": str(self.workdir),
            "kubeconfig": str(self.kubeconfig),
            "server": self.server,
            "ports": self.ports,
            "pids": {name: proc.pid for name, proc in self.processes.items()},
        }
        (self.workdir / STATE_FILE).write_text(json.dumps(state, indent=2))

    # ------------------------------------------------------------------ components
    def spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> Component:
        """Start a process that logs beside the components and is stopped with them."""
        previous = self.processes.pop(name, None)
        if previous is not None:
            previous.stop()
        process = Component(name, argv, self.logs_dir / f"{name}.log", env)
        self.processes[name] = process
        return process

    def _write_pki(self) -> None:
        pki_dir = self.workdir / "pki"
        pki_dir.mkdir()
        self.ca = pki.new_ca("kvc-testenv-ca")
        serving = pki.new_serving_cert(
            self.ca,
            [
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            ["127.0.0.1", KUBERNETES_SERVICE_IP],
        )
        admin = pki.new_client_cert(self.ca, "kvc-testenv-admin", ("system:masters",))
        front_proxy = pki.new_client_cert(self.ca, "front-proxy-client")
        # What kube-apiserver presents to admission webhooks (its AdmissionConfiguration), from
        # a CA of its own: KVC's webhook answers only certificates of that CA and that name.
        webhook_clients = pki.new_ca("kvc-testenv-webhook-client-ca")
        webhook_client = pki.new_client_cert(webhook_clients, WEBHOOK_CLIENT_NAME)
        sa_key, sa_pub = pki.new_signing_key()
        files = {
            "ca.crt": self.ca.cert_pem,
            "ca.key": self.ca.key_pem,
            "apiserver.crt": serving.cert_pem,
            "apiserver.key": serving.key_pem,
            "admin.crt": admin.cert_pem,
            "admin.key": admin.key_pem,
            "front-proxy.crt": front_proxy.cert_pem,
            "front-proxy.key": front_proxy.key_pem,
            "sa.key": sa_key,
            "sa.pub": sa_pub,
            "webhook-client-ca.crt": webhook_clients.cert_pem,
            "webhook-client.crt": webhook_client.cert_pem,
            "webhook-client.key": webhook_client.key_pem,
        }
        for filename, content in files.items():
            path = pki_dir / filename
            path.write_bytes(content)
            path.chmod(0o600)
        self._write_admission_config(webhook_client)

    def _write_admission_config(self, client: pki.CertKeyPair) -> None:
        """kube-apiserver's AdmissionConfiguration: the client certificate it presents to every
        admission webhook (the kubeconfig user ``*`` matches any webhook's host)."""
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "users": [
                {
                    "name": "*",
                    "user": {"client-certificate-data": _b64(client.cert_pem), "client-key-data": _b64(client.key_pem)},
                }
            ],
        }
        webhooks = {
            "apiVersion": "apiserver.config.k8s.io/v1",
            "kind": "WebhookAdmissionConfiguration",
            "kubeConfigFile": self._pki("webhook-client.kubeconfig"),
        }
        admission = {
            "apiVersion": "apiserver.config.k8s.io/v1",
            "kind": "AdmissionConfiguration",
            "plugins": [
                {"name": name, "configuration": webhooks}
                for name in ("MutatingAdmissionWebhook", "ValidatingAdmissionWebhook")
            ],
        }
        for filename, content in (("webhook-client.kubeconfig", kubeconfig), ("admission.yaml", admission)):
            path = Path(self._pki(filename))
            path.write_text(yaml.safe_dump(content))
            path.chmod(0o600)

    @property
    def webhook_client_ca(self) -> Path:
        """The CA of the certificate kube-apiserver presents to admission webhooks."""
        return Path(self._pki("webhook-client-ca.crt"))

    @property
    def webhook_client_cert(self) -> tuple[Path, Path]:
        """(certificate, key) kube-apiserver presents to admission webhooks: for a benchmark
        that speaks to the webhook as the API server does."""
        return Path(self._pki("webhook-client.crt")), Path(self._pki("webhook-client.key"))

    def _pki(self, filename: str) -> str:
        return str(self.workdir / "pki" / filename)

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.ports.update(etcd=client, etcd_peer=peer)
        process = self.spawn(
            "etcd",
            [
                self.binary("etcd"),
                "--name=kvc-testenv",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{client}",
                f"--advertise-client-urls=http://127.0.0.1:{client}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=kvc-testenv=http://127.0.0.1:{peer}",
                # Throw-away data: skipping fsync makes the API server several times faster.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self.wait_healthy(f"http://127.0.0.1:{client}/health", process, "etcd", accept=lambda body: '"true"' in body)

    def _start_apiserver(self) -> None:
        port = free_port()
        self.ports["apiserver"] = port
        self.server = f"https://127.0.0.1:{port}"
        process = self.spawn(
            "kube-apiserver",
            [
                self.binary("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                # The `kubernetes` Service cannot point at a loopback address, and nothing
                # here reaches the API server through it: skip maintaining its endpoints.
                "--endpoint-reconciler-type=none",
                f"--secure-port={port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={self._pki('apiserver.crt')}",
                f"--tls-private-key-file={self._pki('apiserver.key')}",
                f"--client-ca-file={self._pki('ca.crt')}",
                "--authorization-mode=RBAC",
                f"--admission-control-config-file={self._pki('admission.yaml')}",
                # Request-header (front proxy) authentication, as kubeadm configures it: the
                # controller-manager and scheduler read this CA to authenticate their clients.
                f"--requestheader-client-ca-file={self._pki('ca.crt')}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={self._pki('front-proxy.crt')}",
                f"--proxy-client-key-file={self._pki('front-proxy.key')}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={self._pki('sa.pub')}",
                f"--service-account-signing-key-file={self._pki('sa.key')}",
                "--profiling=false",
                "--v=1",
            ],
        )
        self.wait_healthy(f"{self.server}/readyz", process, "kube-apiserver", timeout=90)
        self._write_kubeconfig()

    def _write_kubeconfig_file(self, path: Path, user: str, credentials: Mapping[str, str]) -> Path:
        assert self.ca is not None
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kvc-testenv",
                    "cluster": {"server": self.server, "certificate-authority-data": _b64(self.ca.cert_pem)},
                }
            ],
            "users": [{"name": user, "user": dict(credentials)}],
            "contexts": [{"name": "kvc-testenv", "context": {"cluster": "kvc-testenv", "user": user}}],
            "current-context": "kvc-testenv",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def _write_kubeconfig(self) -> None:
        admin_crt = Path(self._pki("admin.crt")).read_bytes()
        admin_key = Path(self._pki("admin.key")).read_bytes()
        self._write_kubeconfig_file(
            self.kubeconfig,
            "kvc-testenv-admin",
            {"client-certificate-data": _b64(admin_crt), "client-key-data": _b64(admin_key)},
        )

    def token_kubeconfig(self, name: str, token: str) -> Path:
        """A kubeconfig that authenticates with a bearer token only (e.g. a ServiceAccount's)."""
        return self._write_kubeconfig_file(self.workdir / f"kubeconfig-{name}", name, {"token": token})

    def _component_args(self, port: int) -> list[str]:
        kubeconfig = str(self.kubeconfig)
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'component-certs'}",
            "--leader-elect=false",
            "--v=1",
        ]

    def _start_controller_manager(self) -> None:
        port = free_port()
        self.ports["kube-controller-manager"] = port
        process = self.spawn(
            "kube-controller-manager",
            [
                self.binary("kube-controller-manager"),
                *self._component_args(port),
                # Each controller acts as its own ServiceAccount, bound by the bootstrap RBAC
                # roles: the same permissions a production cluster gives them.
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self._pki('sa.key')}",
                f"--root-ca-file={self._pki('ca.crt')}",
                f"--cluster-signing-cert-file={self._pki('ca.crt')}",
                f"--cluster-signing-key-file={self._pki('ca.key')}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--controllers=*",
                # Simulated nodes do not run kubelets; react quickly when one stops heartbeating.
                f"--node-monitor-grace-period={self.node_lease_seconds}s",
                # Each new node needs its not-ready taint removed (the controller benchmark
                # registers thousands): at the default 20 requests/s that alone takes minutes.
                "--kube-api-qps=500",
                "--kube-api-burst=1000",
            ],
        )
        self.wait_healthy(f"https://127.0.0.1:{port}/healthz", process, "kube-controller-manager")

    def _start_scheduler(self) -> None:
        port = free_port()
        self.ports["kube-scheduler"] = port
        process = self.spawn("kube-scheduler", [self.binary("kube-scheduler"), *self._component_args(port)])
        self.wait_healthy(f"https://127.0.0.1:{port}/healthz", process, "kube-scheduler")

    def _start_kwok(self) -> None:
        port = free_port()
        self.ports["kwok"] = port
        process = self.spawn(
            "kwok",
            [
                self.binary("kwok"),
                f"--kubeconfig={self.kubeconfig}",
                f"--config={KWOK_STAGES}",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                f"--server-address=127.0.0.1:{port}",
                f"--node-lease-duration-seconds={self.node_lease_seconds}",
            ],
        )
        self.wait_healthy(f"http://127.0.0.1:{port}/healthz", process, "kwok")

    def restart_apiserver(self, downtime: float = 0.0, *, kill: bool = True) -> None:
        """Stop kube-apiserver (SIGKILL by default, as a crash would), wait ``downtime`` seconds
        and start it again with the same flags on the same port.

        etcd keeps the cluster's state and the kubeconfig's URL stays valid, so every client
        (controllers, kwok, KVC) reconnects on its own; returns once the new one is ready.
        """
        process = self.processes["kube-apiserver"]
        args = process.popen.args
        assert isinstance(args, list), args  # Component always starts an argument list
        argv = [str(arg) for arg in args]
        if kill:
            process.kill()
        else:
            process.stop()
        time.sleep(downtime)
        restarted = self.spawn("kube-apiserver", argv)
        self.wait_healthy(f"{self.server}/readyz", restarted, "kube-apiserver", timeout=90)
        self._save_state()

    def wait_healthy(
        self,
        url: str,
        process: Component,
        what: str,
        timeout: float = 60,
        accept: Callable[[str], bool] = lambda body: True,
        client_certificate: bool = True,
    ) -> None:
        """Until ``url`` answers 200 (and ``accept`` likes the body); over https with the admin's
        client certificate unless ``client_certificate`` is False (as the kubelet probes: a server
        that checks client certificates against a CA of its own refuses the admin's)."""
        context = ssl.create_default_context()
        if url.startswith("https://") and self.ca is not None:
            context.load_verify_locations(cadata=self.ca.cert_pem.decode())
            if client_certificate:
                context.load_cert_chain(self._pki("admin.crt"), self._pki("admin.key"))
            # Controller-manager and scheduler serve self-signed certificates.
            if "apiserver" not in what:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + timeout
        last_error = ""
        while time.monotonic() < deadline:
            process.check_alive()
            try:
                with urllib.request.urlopen(url, timeout=5, context=context) as response:  # noqa: S310
                    body = response.read().decode(errors="replace")
                    if response.status == 200 and accept(body):
                        logger.info("%s ready (%s)", what, url)
                        return
                    last_error = f"HTTP {response.status}: {body[:200]}"
            except (urllib.error.URLError, OSError) as exc:
                last_error = str(exc)
            time.sleep(0.2)
        raise ControlPlaneError(f"{what} not healthy after {timeout:.0f}s ({last_error}):\n{tail(process.log_path)}")

    # ------------------------------------------------------------------ nodes
    def add_nodes(self, nodes: Sequence[NodeSpec], timeout: float = 60) -> None:
        """Register simulated nodes and wait until they are Ready and schedulable."""
        client = self.core_v1()
        for node in nodes:
            self._nodes_added += 1
            ip = node.internal_ip or f"10.200.{self._nodes_added // 250}.{self._nodes_added % 250 + 1}"
            client.create_node(dataclasses.replace(node, internal_ip=ip).manifest())
        self.wait_nodes_ready([node.name for node in nodes], timeout)

    def wait_nodes_ready(self, names: Sequence[str], timeout: float = 60) -> None:
        client = self.core_v1()
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending:
            for node in client.list_node().items:
                if node.metadata.name not in pending:
                    continue
                ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
                # The node lifecycle controller removes this taint only once the node is Ready.
                not_ready_taint = any(t.key.startswith("node.kubernetes.io/") for t in node.spec.taints or [])
                if ready and not not_ready_taint:
                    pending.discard(node.metadata.name)
            if not pending:
                return
            self.check_alive()
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"nodes not Ready after {timeout:.0f}s: {sorted(pending)}\n{self.log_tails()}")
            time.sleep(0.25)

    # ------------------------------------------------------------------ clients
    def api_client(self) -> Any:
        return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))

    def core_v1(self) -> Any:
        return kubernetes.client.CoreV1Api(self.api_client())

    def kubectl(
        self, *args: str, check: bool = True, input_text: str | None = None, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """kubectl as the harness' admin, or with another identity's ``kubeconfig``."""
        return subprocess.run(
            [self.binary("kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            input=input_text,
            check=check,
            timeout=120,
        )
