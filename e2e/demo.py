"""`make demo` / `make demo-status` / `make demo-down`: all of KVC, end to end, on one machine.

``up`` starts a supervisor process in the background: it owns every long-running demo
process (control plane, 4 simulated nodes with one KVC agent each, KVC's controller and
webhook, a loopback S3 server seeded with a generated image data set, an HTTP server
with a model tarball), they die with it, and it stops them all when ``down`` sends it
SIGTERM, so nothing outlives the demo.  As a kubelet restarts a crashed container, it
starts a KVC component that exits again after a back-off (its log says so, ``status``
shows each process's restarts and last exit); the control plane exiting ends the demo.
Once the supervisor reports ready, ``up`` itself plays the user's part: applies
deploy/samples, shows ``kvc status`` until the data is Running, creates an annotated Pod
and a TFJob and shows what the webhook injected and where their pods landed.  The
cluster keeps running for exploring until ``down``.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import kubernetes
import yaml
from kubernetes.client.rest import ApiException

from e2e.cluster import ControlPlane, ControlPlaneError, NodeSpec, pid_alive, tail, terminate_group
from e2e.helpers import RESTRICTED_POD_SECURITY, operator_pods, restricted_container
from e2e.kvc import WEBHOOK_MANIFEST, KvcAgent, KvcController, KvcProcess, KvcWebhook, apply_crds
from e2e.s3server import S3Server, credentials_secret
from e2e.testenv import build
from kvc.api import names
from kvc.inspect import human_age
from kvc.testing.fileserver import FileServer

ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = ROOT / "deploy" / "samples"
TRAINING_CRDS = Path(__file__).resolve().parent / "manifests" / "kubeflow-training-crds.yaml"
DEMO_DIR = Path(".demo")
SUPERVISOR_FILE = "supervisor.json"
NODES = [
    NodeSpec("kvc-demo-node-1", labels={"topology.kubernetes.io/zone": "zone-a"}),
    NodeSpec("kvc-demo-node-2", labels={"topology.kubernetes.io/zone": "zone-a"}),
    NodeSpec("kvc-demo-node-3", labels={"topology.kubernetes.io/zone": "zone-b"}),
    NodeSpec("kvc-demo-node-4", labels={"topology.kubernetes.io/zone": "zone-b"}),
]
STARTUP_TIMEOUT = 180
DATA_TIMEOUT = 180
NAMESPACE = "default"  # what `kubectl get vmgr` shows without -n: the easiest place to explore
KVC_NAMESPACE = "kvc-system"

# The S3 server listens on a fixed port so the sample and `aws --endpoint-url` work as
# written; this variable moves it (0: any free port) when 19000 is taken.
S3_PORT_ENV = "KVC_DEMO_S3_PORT"
DEFAULT_S3_PORT = 19000
# The endpoints written in deploy/samples; the demo substitutes its actual ones.
SAMPLE_S3_ENDPOINT = f"http://127.0.0.1:{DEFAULT_S3_PORT}"
SAMPLE_HTTP_ENDPOINT = "http://127.0.0.1:19080"

S3_CREDENTIALS_SECRET = "demo-s3-creds"
BUCKET = "kvc-demo"
DATASET_PREFIX = "images/"
DATASET_CLASSES = ("cat", "dog", "bird", "horse", "ship", "truck", "plane", "frog", "deer", "car")
FILES_PER_CLASS = 240
FILE_SIZES = (40_000, 130_000)  # bytes: about 2,400 files, 200 MB
MODEL_FILE = "resnet50-demo.tar"
MODEL_WEIGHTS_BYTES = 16 * 1024 * 1024
SCRATCH_CLAIM = "team-scratch"  # the claim deploy/samples' PVC volume exposes

# The samples' VolumeManagers and the volume of each the demo follows.
DATASETS, IMAGES = "datasets", "images"
MODELS, MODEL = "models", "resnet50"
NFS_VOLUMEMANAGER, NFS_VOLUME = "shared-datasets", "imagenet"
ALL_VOLUMEMANAGERS = (DATASETS, MODELS, NFS_VOLUMEMANAGER, "scratch")
POD_NAME = "trainer"
TFJOB_NAME = "resnet"
SERVICE_ACCOUNT_VOLUME_PREFIX = "kube-api-access-"  # added by the API server, not by KVC
SUPERVISE_INTERVAL = 0.5  # seconds between two looks at the demo's processes

logger = logging.getLogger("e2e.demo")  # not __name__: `python -m e2e.demo` runs as __main__


def _say(message: str = "") -> None:
    print(message, flush=True)


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and what to look at."""


# --------------------------------------------------------------------------- generated data


def _fake_jpeg(rng: random.Random, size: int) -> bytes:
    """Random bytes framed like a JPEG (SOI/APP0 ... EOI): image-like to tools, incompressible."""
    head, tail_marker = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"\xff\xd9"
    return head + rng.randbytes(size - len(head) - len(tail_marker)) + tail_marker


def dataset_objects() -> Iterator[tuple[str, Callable[[], bytes]]]:
    """The demo data set's keys and, lazily, their content: the same bytes on every run."""
    for label in DATASET_CLASSES:
        for index in range(FILES_PER_CLASS):
            key = f"{DATASET_PREFIX}{label}/{label}_{index:04d}.jpg"

            def content(key: str = key) -> bytes:
                rng = random.Random(key)  # seeded by the key: deterministic, and each file differs
                return _fake_jpeg(rng, rng.randint(*FILE_SIZES))

            yield key, content


def seed_s3(server: S3Server) -> tuple[int, int]:
    """Upload the data set (in parallel: moto answers each request on its own thread); (files, bytes)."""
    client = server.client()
    client.create_bucket(Bucket=BUCKET)

    def upload(item: tuple[str, Callable[[], bytes]]) -> int:
        key, content = item
        body = content()
        client.put_object(Bucket=BUCKET, Key=key, Body=body)
        return len(body)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        sizes = list(pool.map(upload, dataset_objects()))
    return len(sizes), sum(sizes)


def write_model_tarball(path: Path) -> str:
    """A small "model" tarball, byte for byte the same on every run (fixed members, times, owners); its SHA-256."""
    rng = random.Random("resnet50-demo")
    config = {"architecture": "resnet50", "classes": list(DATASET_CLASSES), "input": [224, 224, 3]}
    members = {
        "resnet50/config.json": json.dumps(config, sort_keys=True).encode(),
        "resnet50/weights.bin": rng.randbytes(MODEL_WEIGHTS_BYTES),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            archive.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def render_samples(target: Path, s3_endpoint: str, http_endpoint: str) -> Path:
    """deploy/samples with the demo's endpoints in place of the samples' defaults."""
    target.mkdir(parents=True, exist_ok=True)
    for sample in SAMPLES_DIR.glob("*.yaml"):
        text = sample.read_text().replace(SAMPLE_S3_ENDPOINT, s3_endpoint).replace(SAMPLE_HTTP_ENDPOINT, http_endpoint)
        (target / sample.name).write_text(text)
    return target


def sample_model_sha256() -> str:
    manifest = yaml.safe_load((SAMPLES_DIR / "kvc_v1_volumemanager_http.yaml").read_text())
    return str(manifest["spec"]["volumeConfigs"][0]["options"]["sha256"])


# --------------------------------------------------------------------------- supervisor


def _supervisor(demo_dir: Path) -> dict[str, Any] | None:
    """The running demo's supervisor record, or None when no demo runs."""
    try:
        record: dict[str, Any] = json.loads((demo_dir / SUPERVISOR_FILE).read_text())
    except (OSError, ValueError):
        return None
    pid = record.get("pid")
    return record if isinstance(pid, int) and pid_alive(pid) else None


def _write_record(demo_dir: Path, record: Mapping[str, Any]) -> None:
    staged = demo_dir / f"{SUPERVISOR_FILE}.new"
    staged.write_text(json.dumps(record))
    staged.replace(demo_dir / SUPERVISOR_FILE)  # readers never see half a record


# The states `status` shows, as `kubectl get pods` would.
RUNNING, STARTING, BACKOFF = "Running", "Starting", "BackOff"


@dataclasses.dataclass(frozen=True)
class BackOff:
    """How long to wait before starting again a component that exited: the kubelet's
    CrashLoopBackOff (10 s doubling to 5 min), scaled to a demo.

    ``initial``: the first wait; each exit soon after a start doubles it, up to ``cap``; a
    component that had run ``stable_after`` seconds when it exited starts over at ``initial``.
    """

    initial: float = 1.0
    cap: float = 30.0
    stable_after: float = 60.0

    def delay(self, previous: float | None, ran_for: float) -> float:
        """The wait before the next start of a component that exited after running ``ran_for``
        seconds; ``previous``: the wait before its last start (None: it never exited before)."""
        if previous is None or ran_for >= self.stable_after:
            return self.initial
        return min(previous * 2, self.cap)


class Restartable(Protocol):
    """What the supervisor needs of a component (a KvcProcess, or a test's stand-in)."""

    name: str

    @property
    def pid(self) -> int | None: ...

    @property
    def exit_code(self) -> int | None: ...

    def healthy(self) -> bool: ...

    def restart(self) -> object: ...


def describe_exit(code: int) -> str:
    """An exit status as a person reads it: "exit code 1", "killed by SIGKILL"."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


class Supervised:
    """A component the supervisor keeps running: started again, after a back-off, whenever it exits.

    ``tick()`` is called every ``SUPERVISE_INTERVAL`` on the supervisor's main thread (the only
    one that spawns: a child's PR_SET_PDEATHSIG fires when the *thread* that forked it ends).
    A restarted component is Starting until its probe answers, then Running.
    """

    def __init__(
        self, process: Restartable, backoff: BackOff | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.process = process
        self.backoff = backoff or BackOff()
        self.clock = clock
        self.state = RUNNING  # handed over once started: start() waited for it to be healthy
        self.started_at = clock()
        self.restarts = 0
        self.delay: float | None = None  # the wait before the last restart
        self.restart_at = 0.0  # when a component in BackOff starts again
        self.last_exit: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.process.name

    def tick(self) -> bool:
        """Act on what happened since the last look; whether anything changed (the record is rewritten)."""
        now = self.clock()
        if self.state == BACKOFF:
            return now >= self.restart_at and self._restart(now)
        code = self.process.exit_code
        if code is not None:
            self._exited(code, now)
            return True
        if self.state == STARTING and self.process.healthy():
            self.state = RUNNING
            logger.info("%s running again (pid %s, restart %d)", self.name, self.process.pid, self.restarts)
            return True
        return False

    def _exited(self, code: int, now: float) -> None:
        ran_for = now - self.started_at
        self.delay = self.backoff.delay(self.delay, ran_for)
        self.state, self.restart_at = BACKOFF, now + self.delay
        self.last_exit = {
            "code": code if code >= 0 else None,
            "signal": describe_exit(code).removeprefix("killed by ") if code < 0 else None,
            "at": now,
            "ran_for": ran_for,
        }
        logger.warning(
            "%s exited (%s) after %.0fs; restarting in %gs (restart %d)",
            self.name,
            describe_exit(code),
            ran_for,
            self.delay,
            self.restarts + 1,
        )

    def _restart(self, now: float) -> bool:
        try:
            self.process.restart()
        except OSError as exc:  # not even started (e.g. out of processes): wait longer, try again
            self.delay = self.backoff.delay(self.delay, 0)
            self.restart_at = now + self.delay
            logger.warning("%s could not be started (%s); trying again in %gs", self.name, exc, self.delay)
            return True
        self.restarts += 1
        self.state, self.started_at = STARTING, now
        logger.info("%s starting again (pid %s, restart %d)", self.name, self.process.pid, self.restarts)
        return True

    def row(self) -> dict[str, Any]:
        """Its entry in the supervisor record, read by `status`."""
        return {
            "name": self.name,
            "pid": None if self.state == BACKOFF else self.process.pid,
            "state": self.state,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "started_at": self.started_at,
            "restart_at": self.restart_at if self.state == BACKOFF else None,
        }


def _control_plane_rows(plane: ControlPlane, kvc: set[str], started_at: float) -> list[dict[str, Any]]:
    """The control plane's processes as `status` rows: never restarted (one exiting ends the demo)."""
    return [
        {"name": name, "pid": process.pid, "state": RUNNING, "restarts": 0, "last_exit": None, "started_at": started_at}
        for name, process in plane.processes.items()
        if name not in kvc
    ]


def _start_webhook(plane: ControlPlane) -> KvcWebhook:
    """As an admin installs it: register deploy/webhook, `kvc certs install`, serve the Secret's certificate."""
    core = plane.core_v1()
    core.create_namespace({"metadata": {"name": KVC_NAMESPACE}})
    webhook = KvcWebhook(plane)
    registration = yaml.safe_load(WEBHOOK_MANIFEST.read_text())
    for hook in registration["webhooks"]:
        # No caBundle: `kvc certs install` patches it in, as it would in a real cluster.
        hook["clientConfig"] = {"url": f"{webhook.url}/mutate"}
    kubernetes.client.AdmissionregistrationV1Api(plane.api_client()).create_mutating_webhook_configuration(registration)
    installed = subprocess.run(
        [sys.executable, "-m", "kvc", "certs", "install", "--namespace", KVC_NAMESPACE, "--ip", "127.0.0.1"],
        env={**os.environ, "KUBECONFIG": str(plane.kubeconfig)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if installed.returncode != 0:
        raise DemoError(f"`kvc certs install` failed: {installed.stderr.strip()}")
    _say(f"==> kvc certs install: {'; '.join(installed.stdout.splitlines())}")
    # What the kubelet does with the Secret mounted into the webhook's pod.
    secret = core.read_namespaced_secret("kvc-webhook-tls", KVC_NAMESPACE).data
    webhook.cert_file.write_bytes(base64.b64decode(secret["tls.crt"]))
    webhook.key_file.write_bytes(base64.b64decode(secret["tls.key"]))
    return webhook.start()


def serve(demo_dir: Path, s3_port: int) -> int:
    """The supervisor: start everything, report ready, run until SIGTERM, then stop everything."""
    # Into supervisor.log: the harness's own messages (which component became ready, when).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stopping = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    record: dict[str, Any] = {"pid": os.getpid(), "ready": False}
    _write_record(demo_dir, record)
    plane = ControlPlane(workdir=demo_dir / "cluster")
    with contextlib.ExitStack() as cleanup:

        def remove_files() -> None:
            if stopping.is_set():  # `down`: nothing is left
                shutil.rmtree(demo_dir, ignore_errors=True)
            else:  # a failed start: `up` shows supervisor.log; the components' logs stay for a look
                (demo_dir / SUPERVISOR_FILE).unlink(missing_ok=True)

        cleanup.callback(remove_files)
        cleanup.callback(lambda: plane.stop(keep_logs_in=None if stopping.is_set() else demo_dir / "logs"))
        started = time.monotonic()
        plane.start()
        plane_started_at = time.time()
        _say(f"==> control plane up in {time.monotonic() - started:.1f}s; starting the S3 and HTTP servers")
        s3 = S3Server(plane.logs_dir / "s3.log", port=s3_port).start()
        cleanup.callback(s3.stop)
        # Seeding takes the longest: it runs while the nodes, agents and controller start.
        seeder = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        cleanup.callback(seeder.shutdown, wait=False, cancel_futures=True)
        seeding = seeder.submit(seed_s3, s3)
        http_root = demo_dir / "http"
        http_root.mkdir()
        model_sha256 = write_model_tarball(http_root / MODEL_FILE)
        if model_sha256 != sample_model_sha256():
            raise DemoError(
                f"the generated {MODEL_FILE} has SHA-256 {model_sha256}, but deploy/samples pins "
                f"{sample_model_sha256()}: update the sample"
            )
        files = cleanup.enter_context(FileServer(http_root).running())
        _say(f"==> registering {len(NODES)} simulated nodes and KVC's CRDs; one agent per node, the controller")
        plane.add_nodes(NODES)
        apply_crds(plane, TRAINING_CRDS, names_=("crd/tfjobs.kubeflow.org",))
        agents = [KvcAgent(plane, node.name).start() for node in NODES]
        controller = KvcController(plane).start()
        _say("==> webhook: registering deploy/webhook by url, then `kvc certs install --ip 127.0.0.1`")
        webhook = _start_webhook(plane)
        kvc_processes: list[KvcProcess] = [controller, webhook, *agents]
        supervised = [Supervised(process) for process in kvc_processes]
        for agent in agents:
            agent.wait_reporting(timeout=60)
        count, size = seeding.result(timeout=STARTUP_TIMEOUT)
        _say(f"==> S3 seeded: s3://{BUCKET}/{DATASET_PREFIX} holds {count} images, {size / 1e6:.0f} MB")
        record.update(
            ready=True,
            kubeconfig=str(plane.kubeconfig),
            bin_dir=str(plane.bin_dir),
            logs=str(plane.logs_dir),
            s3_endpoint=s3.endpoint_url,
            http_endpoint=files.url,
        )
        kvc_names = {process.name for process in kvc_processes}
        control_plane_rows = _control_plane_rows(plane, kvc_names, plane_started_at)
        record["components"] = control_plane_rows + [component.row() for component in supervised]
        _write_record(demo_dir, record)
        while not stopping.wait(SUPERVISE_INTERVAL):
            for name, process in list(plane.processes.items()):
                if name not in kvc_names:
                    process.check_alive()  # the cluster itself: without it there is no demo
            # Every component looked at on each pass, not up to the first change: two may exit at once.
            changes = [component.tick() for component in supervised]
            if any(changes):
                record["components"] = control_plane_rows + [component.row() for component in supervised]
                _write_record(demo_dir, record)
    return 0


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _s3_port() -> int:
    value = os.environ.get(S3_PORT_ENV, str(DEFAULT_S3_PORT))
    try:
        port = int(value)
    except ValueError:
        raise DemoError(f"{S3_PORT_ENV}={value!r} is not a port number") from None
    if port and _port_taken(port):
        raise DemoError(
            f"port {port} (the demo's S3 server) is in use: stop what listens there, "
            f"or run with {S3_PORT_ENV}=<free port> (0 for any)"
        )
    return port


def _start_supervisor(demo_dir: Path, s3_port: int) -> dict[str, Any]:
    """Start the supervisor, echo its progress lines, and return its record once it is ready."""
    log_path = demo_dir / "supervisor.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "e2e.demo", "_serve", "--dir", str(demo_dir), "--s3-port", str(s3_port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # survives this command and the terminal's Ctrl-C
        )
    shown = 0
    while True:
        lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
        for line in lines[shown:]:
            if line.startswith("==> "):
                _say(line)
        shown = len(lines)
        record = _supervisor(demo_dir)
        if record and record.get("ready"):
            return record
        if supervisor.poll() is not None:
            raise DemoError(f"the demo failed to start (logs in {demo_dir / 'logs'}):\n{tail(log_path)}")
        if time.monotonic() - started > STARTUP_TIMEOUT:
            terminate_group(supervisor.pid)
            raise DemoError(f"not ready after {STARTUP_TIMEOUT}s:\n{tail(log_path)}")
        time.sleep(0.2)


# --------------------------------------------------------------------------- the user's part


class Session:
    """The cluster as the demo's user sees it: kubectl, kvc and an API client."""

    def __init__(self, record: Mapping[str, Any]) -> None:
        self.kubeconfig = str(record["kubeconfig"])
        self.bin_dir = Path(str(record["bin_dir"]))
        self.logs = str(record["logs"])
        self.api = kubernetes.config.new_client_from_config(config_file=self.kubeconfig)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.custom = kubernetes.client.CustomObjectsApi(self.api)

    def kubectl(self, *args: str) -> str:
        result = subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if result.returncode != 0:
            raise DemoError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def kvc(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "kvc", *args],
            env={**os.environ, "KUBECONFIG": self.kubeconfig},
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        return result.stdout if result.returncode == 0 else result.stderr

    def volumemanager(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.custom.get_namespaced_custom_object(
            names.GROUP, names.VERSION, NAMESPACE, names.VOLUMEMANAGER_PLURAL, name
        )
        return found

    def plain(self, obj: Any) -> dict[str, Any]:
        plain: dict[str, Any] = self.api.sanitize_for_serialization(obj)
        return plain


def _run_shown(command: str, output: str) -> None:
    _say(f"$ {command}")
    _say(output.rstrip() + "\n")


def _prepare_namespace(session: Session, s3_endpoint: str, http_endpoint: str, demo_dir: Path) -> None:
    """What the samples expect to exist: the S3 credentials Secret and the claim of the PVC sample."""
    deadline = time.monotonic() + 30
    # Pods are refused until the ServiceAccount controller has created `default`.
    while not session.core.list_namespaced_service_account(NAMESPACE, field_selector="metadata.name=default").items:
        if time.monotonic() > deadline:
            raise DemoError(f"no default ServiceAccount in namespace {NAMESPACE} after 30s")
        time.sleep(0.2)
    # Tenants' namespaces can enforce Pod Security `restricted`: KVC wires data through claims.
    _run_shown(
        f"kubectl label namespace {NAMESPACE} pod-security.kubernetes.io/enforce=restricted   # no hostPath pods",
        session.kubectl(
            "label", "--overwrite", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted"
        ),
    )
    session.core.create_namespaced_secret(NAMESPACE, credentials_secret(S3_CREDENTIALS_SECRET))
    # A statically provisioned volume for the claim, as an admin would make one (nothing mounts it here).
    session.core.create_persistent_volume(
        {
            "metadata": {"name": f"{NAMESPACE}-{SCRATCH_CLAIM}"},
            "spec": {
                "capacity": {"storage": "10Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "hostPath": {"path": "/srv/scratch"},
                "claimRef": {"namespace": NAMESPACE, "name": SCRATCH_CLAIM},
            },
        }
    )
    session.core.create_namespaced_persistent_volume_claim(
        NAMESPACE,
        {
            "metadata": {"name": SCRATCH_CLAIM},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "resources": {"requests": {"storage": "10Gi"}},
            },
        },
    )
    rendered = render_samples(demo_dir / "samples", s3_endpoint, http_endpoint)
    _run_shown(
        f"kubectl apply -k deploy/samples   # S3 at {s3_endpoint}, HTTP at {http_endpoint}",
        session.kubectl("apply", "-n", NAMESPACE, "-k", str(rendered)),
    )


class LiveView:
    """Shows a changing block of text: redrawn in place on a terminal, printed when changed otherwise."""

    def __init__(self, min_interval: float = 5.0) -> None:
        self.tty = sys.stdout.isatty()
        self.min_interval = min_interval
        self.lines_shown = 0
        self.last_text = ""
        self.last_time = 0.0

    def show(self, text: str, final: bool = False) -> None:
        if self.tty:
            # Lines cut to the terminal's width: a wrapped line would throw off the count of lines to redraw.
            width = shutil.get_terminal_size().columns
            text = "\n".join(line[:width] for line in text.splitlines())
            # Up to the first line of the previous block, clear to the end of the screen.
            prefix = f"\x1b[{self.lines_shown}F\x1b[J" if self.lines_shown else ""
            sys.stdout.write(prefix + text + "\n")
            sys.stdout.flush()
            self.lines_shown = text.count("\n") + 1
            return
        now = time.monotonic()
        if text != self.last_text and (final or now - self.last_time >= self.min_interval):
            _say(text + "\n")
            self.last_text, self.last_time = text, now


def _wait_running(session: Session) -> dict[str, dict[str, Any]]:
    """Show `kvc status datasets` until every sample VolumeManager is Running; their final objects."""
    view = LiveView()
    deadline = time.monotonic() + DATA_TIMEOUT
    while True:
        states = {name: session.volumemanager(name) for name in ALL_VOLUMEMANAGERS}
        done = all((vm.get("status") or {}).get("state") == "Running" for vm in states.values())
        failed = [n for n, vm in states.items() if (vm.get("status") or {}).get("state") == "Failed"]
        view.show(f"$ kvc status {DATASETS}\n{session.kvc('status', DATASETS, '-n', NAMESPACE).rstrip()}", done)
        if done:
            return states
        if failed or time.monotonic() > deadline:
            why = f"{', '.join(failed)} Failed" if failed else f"not Running after {DATA_TIMEOUT}s"
            details = "\n".join(session.kvc("status", name, "-n", NAMESPACE) for name in failed or ALL_VOLUMEMANAGERS)
            raise DemoError(f"volumes {why}:\n{details}")
        time.sleep(2)


def _holders(vm: Mapping[str, Any], volume_id: str) -> list[str]:
    for volume in (vm.get("status") or {}).get("volumes") or []:
        if volume.get("id") == volume_id:
            return sorted(n["name"] for n in volume.get("nodes") or [] if n.get("phase") == "Ready")
    return []


def _volume_source(volume: Mapping[str, Any]) -> str:
    if "hostPath" in volume:
        return f"hostPath {volume['hostPath']['path']}"
    if "persistentVolumeClaim" in volume:
        return f"persistentVolumeClaim {volume['persistentVolumeClaim']['claimName']}"
    return json.dumps({k: v for k, v in volume.items() if k != "name"})


def injected(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """What the webhook added to a pod (or pod template), one line each: volumes, mounts, affinity, gates."""
    lines = []
    old_spec, new_spec = before.get("spec") or {}, after.get("spec") or {}
    old_volumes = {v["name"] for v in old_spec.get("volumes") or []}
    for volume in new_spec.get("volumes") or []:
        if volume["name"] not in old_volumes and not volume["name"].startswith(SERVICE_ACCOUNT_VOLUME_PREFIX):
            lines.append(f"+ volume        {volume['name']}: {_volume_source(volume)}")
    old_containers = {c["name"]: c for c in old_spec.get("containers") or []}
    for container in new_spec.get("containers") or []:
        old_mounts = {m["mountPath"] for m in old_containers.get(container["name"], {}).get("volumeMounts") or []}
        for mount in container.get("volumeMounts") or []:
            if mount["mountPath"] not in old_mounts and not mount["name"].startswith(SERVICE_ACCOUNT_VOLUME_PREFIX):
                mode = "read-only" if mount.get("readOnly") else "read-write"
                lines.append(f"+ volumeMount   {container['name']}: {mount['name']} at {mount['mountPath']} ({mode})")
    required = ((new_spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    for term in required.get("nodeSelectorTerms") or []:
        expressions = [f"{e['key']} {e['operator']}" for e in term.get("matchExpressions") or []]
        lines.append(f"+ nodeAffinity  required: {' AND '.join(expressions)}")
    lines += [f"+ schedulingGate {gate['name']}" for gate in new_spec.get("schedulingGates") or []]
    old_annotations = (before.get("metadata") or {}).get("annotations") or {}
    for key, value in ((after.get("metadata") or {}).get("annotations") or {}).items():
        if key not in old_annotations:
            lines.append(f"+ annotation    {key}: {value}")
    return lines


def _wait_bound(session: Session, pod_names: list[str], timeout: float = 60) -> dict[str, str]:
    """Until each pod is scheduled and Running; pod -> node."""
    deadline = time.monotonic() + timeout
    while True:
        pods = {p.metadata.name: p for p in session.core.list_namespaced_pod(NAMESPACE).items}
        placed = {
            name: pods[name].spec.node_name
            for name in pod_names
            if name in pods and pods[name].spec.node_name and pods[name].status.phase == "Running"
        }
        if len(placed) == len(pod_names):
            return placed
        if time.monotonic() > deadline:
            waiting = sorted(set(pod_names) - set(placed))
            raise DemoError(f"pods not Running after {timeout:.0f}s: {waiting} (see `kubectl describe pod`)")
        time.sleep(0.3)


def _show_pod(session: Session, holders: Mapping[str, list[str]]) -> str:
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": POD_NAME, "annotations": {"kvc/volume": f"{IMAGES},{NFS_VOLUME}"}},
        "spec": {"securityContext": RESTRICTED_POD_SECURITY, "containers": [restricted_container("trainer")]},
    }
    _say(f"$ kubectl create -f pod.yaml   # a Pod annotated kvc/volume: {IMAGES},{NFS_VOLUME}")
    created = session.plain(session.core.create_namespaced_pod(NAMESPACE, manifest))
    _say("what the webhook injected:")
    _say("\n".join(f"  {line}" for line in injected(manifest, created)))
    node = _wait_bound(session, [POD_NAME])[POD_NAME]
    if node not in holders[IMAGES]:
        raise DemoError(f"pod {POD_NAME} landed on {node}, which does not hold {IMAGES} ({holders[IMAGES]})")
    _say(f"pod/{POD_NAME} is Running on {node} (holders of {IMAGES}: {', '.join(holders[IMAGES])})\n")
    return node


def tfjob_manifest() -> dict[str, Any]:
    def replica(count: int) -> dict[str, Any]:
        return {
            "replicas": count,
            "restartPolicy": "OnFailure",
            "template": {
                "spec": {"securityContext": RESTRICTED_POD_SECURITY, "containers": [restricted_container("tensorflow")]}
            },
        }

    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "TFJob",
        "metadata": {
            "name": TFJOB_NAME,
            "annotations": {"kvc/volume": f"{IMAGES},{MODEL}", f"kvc/mount-path.{MODEL}": "/models/resnet50"},
        },
        "spec": {"tfReplicaSpecs": {"Chief": replica(1), "Worker": replica(2)}},
    }


def _show_tfjob(session: Session, holders: Mapping[str, list[str]]) -> dict[str, str]:
    manifest = tfjob_manifest()
    _say(f"$ kubectl create -f tfjob.yaml   # TFJob annotated kvc/volume: {IMAGES},{MODEL}; Chief 1, Worker 2")
    stored = session.custom.create_namespaced_custom_object("kubeflow.org", "v1", NAMESPACE, "tfjobs", manifest)
    _say("what the webhook injected into each replica template (Worker shown):")
    worker = manifest["spec"]["tfReplicaSpecs"]["Worker"]["template"]
    _say("\n".join(f"  {line}" for line in injected(worker, stored["spec"]["tfReplicaSpecs"]["Worker"]["template"])))
    _say("the pods a training operator creates from those templates:")
    pods = operator_pods(stored)
    for pod in pods:
        session.core.create_namespaced_pod(NAMESPACE, pod)
    placed = _wait_bound(session, [p["metadata"]["name"] for p in pods])
    both = sorted(set(holders[IMAGES]) & set(holders[MODEL]))
    for name, node in sorted(placed.items()):
        if node not in both:
            raise DemoError(f"pod {name} landed on {node}, which does not hold both {IMAGES} and {MODEL} ({both})")
        _say(f"  pod/{name:<20} Running on {node}  (holds {IMAGES} and {MODEL})")
    _say("")
    return placed


def stop_command(demo_dir: Path) -> str:
    return "make demo-down" if demo_dir == DEMO_DIR.resolve() else f"python -m e2e.demo down --dir {demo_dir}"


def status_command(demo_dir: Path) -> str:
    return "make demo-status" if demo_dir == DEMO_DIR.resolve() else f"python -m e2e.demo status --dir {demo_dir}"


def _play(session: Session, record: Mapping[str, Any], demo_dir: Path, started: float) -> None:
    _run_shown(
        "kubectl get nodes -L topology.kubernetes.io/zone",
        session.kubectl("get", "nodes", "-L", "topology.kubernetes.io/zone"),
    )
    _prepare_namespace(session, str(record["s3_endpoint"]), str(record["http_endpoint"]), demo_dir)
    vms = _wait_running(session)
    _say(f"==> all VolumeManagers Running after {time.monotonic() - started:.0f}s\n")
    _run_shown(f"kvc status {MODELS}", session.kvc("status", MODELS, "-n", NAMESPACE))
    _run_shown("kubectl get vmgr -o wide", session.kubectl("get", "vmgr", "-n", NAMESPACE, "-o", "wide"))
    holders = {IMAGES: _holders(vms[DATASETS], IMAGES), MODEL: _holders(vms[MODELS], MODEL)}
    pod_node = _show_pod(session, holders)
    tfjob_nodes = _show_tfjob(session, holders)

    elapsed = time.monotonic() - started
    bin_dir = session.bin_dir
    _say("Summary")
    for name, vm in vms.items():
        status = vm.get("status") or {}
        volumes = ", ".join(
            f"{v['id']} {v.get('phase')} ({v.get('sourceType')}"
            + (f", on {', '.join(_holders(vm, v['id']))}" if v.get("nodes") else "")
            + ")"
            for v in status.get("volumes") or []
        )
        _say(f"  VolumeManager {name:<16} {status.get('state')}: {volumes}")
    _say(f"  Pod {POD_NAME} on {pod_node}, a node holding {IMAGES}; {NFS_VOLUME} mounted from its claim")
    tfjob_placement = ", ".join(sorted(set(tfjob_nodes.values())))
    _say(f"  TFJob {TFJOB_NAME}: {len(tfjob_nodes)} pods on {tfjob_placement}, holding {IMAGES} and {MODEL}")
    _say(f"  demo completed in {elapsed:.0f}s\n")
    _say("Explore it:")
    _say(f"  export KUBECONFIG={session.kubeconfig}")
    _say(f"  export PATH={bin_dir}:{Path(sys.executable).parent}:$PATH   # kubectl and kvc")
    _say("  kubectl get vmgr,pods -o wide")
    _say(f"  kvc status {DATASETS}")
    _say("  kvc datasets -l team=vision")
    _say(f"  kubectl get pod {POD_NAME} -o yaml   # the injected volumes, mounts and node affinity")
    _say(f"  {status_command(demo_dir)}   # the demo's processes: a KVC one that dies is restarted, with back-off")
    _say(f"Logs: {session.logs} (restarts: {demo_dir / 'supervisor.log'})")
    _say(f"Stop it:  {stop_command(demo_dir)}")


def up(demo_dir: Path = DEMO_DIR) -> int:
    started = time.monotonic()
    demo_dir = demo_dir.resolve()
    if _supervisor(demo_dir):
        _say(f"demo: a demo is already running ({demo_dir}); run `make demo-down` first")
        return 1
    shutil.rmtree(demo_dir, ignore_errors=True)  # what a killed demo left behind
    s3_port = _s3_port()
    if build.missing_binaries():
        _say("demo: control plane not built yet: building it now (a cold build takes ~15 minutes) ...")
        build.build(build.load_versions())
        started = time.monotonic()
    demo_dir.mkdir(parents=True)
    _say("==> starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok")
    record = _start_supervisor(demo_dir, s3_port)
    _say(f"==> KVC ready in {time.monotonic() - started:.1f}s\n")
    session = Session(record)
    try:
        _play(session, record, demo_dir, started)
    except (DemoError, ApiException) as exc:
        reason = exc.body if isinstance(exc, ApiException) else str(exc)
        raise DemoError(
            f"{reason}\n(the cluster stays up for a look: logs in {session.logs}; `{stop_command(demo_dir)}` stops it)"
        ) from None
    return 0


def status_table(components: list[Mapping[str, Any]], now: float) -> str:
    """The demo's processes, as `kubectl get pods` shows pods: NAME PID STATUS RESTARTS LAST EXIT AGE.

    AGE: how long the current process has run; STATUS: Running, Starting (restarted, its probe
    not answering yet), BackOff (exited, waiting to be started again) or Exited (the record
    is older than its exit: the supervisor is about to notice).
    """
    rows = [("NAME", "PID", "STATUS", "RESTARTS", "LAST EXIT", "AGE")]
    for component in components:
        pid, state = component.get("pid"), str(component.get("state"))
        if state == BACKOFF:
            status = f"{BACKOFF} (restart in {human_age(float(component['restart_at']) - now)})"
        elif isinstance(pid, int) and not pid_alive(pid):
            status = "Exited"
        else:
            status = state
        last_exit = component.get("last_exit")
        if last_exit:
            how = last_exit["signal"] or f"exit code {last_exit['code']}"
            last = f"{how} ({human_age(now - float(last_exit['at']))} ago)"
        else:
            last = "-"
        age = "-" if state == BACKOFF else human_age(now - float(component["started_at"]))
        rows.append((str(component["name"]), str(pid or "-"), status, str(component["restarts"]), last, age))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ("   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


def status(demo_dir: Path = DEMO_DIR) -> int:
    demo_dir = demo_dir.resolve()
    record = _supervisor(demo_dir)
    if record is None:
        _say("demo: no demo is running")
        return 1
    if not record.get("ready"):
        _say(f"demo: starting (supervisor pid {record['pid']}); progress in {demo_dir / 'supervisor.log'}")
        return 0
    _say(status_table(record.get("components") or [], time.time()))
    return 0


def down(demo_dir: Path = DEMO_DIR) -> int:
    demo_dir = demo_dir.resolve()
    record = _supervisor(demo_dir)
    if record is None:
        existed = demo_dir.exists()
        shutil.rmtree(demo_dir, ignore_errors=True)
        _say("demo: removed a stopped demo's files" if existed else "demo: nothing to stop (no demo is running)")
        return 0
    pid = int(record["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):  # its components die with it (PR_SET_PDEATHSIG)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(demo_dir, ignore_errors=True)
    _say(f"demo: stopped the demo's processes and removed {demo_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.demo", description=__doc__)
    parser.add_argument("command", choices=["up", "status", "down", "_serve"])
    parser.add_argument("--dir", type=Path, default=DEMO_DIR, help="where the demo keeps its state and logs")
    parser.add_argument("--s3-port", type=int, default=DEFAULT_S3_PORT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.command == "_serve":
            return serve(args.dir.resolve(), args.s3_port)
        commands = {"up": up, "status": status, "down": down}
        return commands[args.command](args.dir)
    except (ControlPlaneError, build.TestenvError, DemoError) as exc:
        _say(f"demo: error: {exc}")
        return 1
    except KeyboardInterrupt:
        if args.command == "_serve":
            raise
        _say(f"demo: interrupted; whatever started keeps running until `{stop_command(args.dir.resolve())}`")
        return 130


if __name__ == "__main__":
    sys.exit(main())
