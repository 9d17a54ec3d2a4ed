"""Fixtures for tests against the real local control plane.

``control_plane`` (session): one cluster with three simulated nodes for the whole run.
``namespace`` (per test): a fresh namespace enforcing Pod Security `restricted`, deleted afterwards.
``s3`` (session): an S3 server on loopback; ``s3_data`` (per test) a bucket and its Secret.
``webhook`` (per module): KVC's webhook, registered with the API server.
When a test fails, the tails of every component's log are attached to its report and
the full logs are copied to ``.e2e-logs/`` for reading after the run (always, with
KVC_E2E_KEEP_LOGS=1).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from e2e.cluster import ControlPlane, NodeSpec
from e2e.kvc import KvcAgent, KvcController, KvcWebhook, apply_crds
from e2e.s3server import S3Server, credentials_secret

NODE_NAMES = ("kvc-node-1", "kvc-node-2", "kvc-node-3")
LOGS_KEPT_IN = Path(".e2e-logs")
_planes: list[ControlPlane] = []


def _terminate(signum: int, frame: object) -> None:
    # pytest tears fixtures down on KeyboardInterrupt only; treat SIGTERM the same so a
    # stopped CI job or `timeout` leaves no process or directory behind.
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    signal.signal(signal.SIGTERM, _terminate)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and _planes:
        report.sections.append(("control plane logs", _planes[-1].log_tails()))
        item.session.config.stash.setdefault(_failed_key, []).append(item.nodeid)


_failed_key = pytest.StashKey[list[str]]()


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    plane = ControlPlane()
    _planes.append(plane)
    try:
        plane.start()
        plane.add_nodes([NodeSpec(name, labels={"kvc.test/zone": f"zone-{i}"}) for i, name in enumerate(NODE_NAMES)])
        yield plane
    finally:
        failed = request.config.stash.get(_failed_key, [])
        wanted = failed or os.environ.get("KVC_E2E_KEEP_LOGS")
        keep = LOGS_KEPT_IN / time.strftime("%Y%m%d-%H%M%S") if wanted else None
        plane.stop(keep_logs_in=keep)
        _planes.remove(plane)


@pytest.fixture(scope="session")
def api(control_plane: ControlPlane) -> Any:
    return control_plane.api_client()


@pytest.fixture
def namespace(control_plane: ControlPlane, api: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace that enforces Pod Security `restricted` (the level KVC's wiring must
    pass), unless the test is marked ``pod_security("<level>")``."""
    marker = request.node.get_closest_marker("pod_security")
    level = marker.args[0] if marker else "restricted"
    core = client.CoreV1Api(api)
    name = f"kvc-e2e-{uuid.uuid4().hex[:8]}"
    labels = {"kvc.test/e2e": "true", "pod-security.kubernetes.io/enforce": level}
    core.create_namespace({"metadata": {"name": name, "labels": labels}})
    # Pods are refused until the ServiceAccount controller has created `default`.
    deadline = time.monotonic() + 30
    while not core.list_namespaced_service_account(name, field_selector="metadata.name=default").items:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no default ServiceAccount in {name} after 30s")
        time.sleep(0.1)
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3") / "s3.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kvc_crds(control_plane: ControlPlane) -> None:
    """KVC's CRDs from deploy/crd, applied with kustomize as an admin would, and Established."""
    apply_crds(control_plane)


@pytest.fixture(scope="session")
def controller_process(control_plane: ControlPlane, kvc_crds: None) -> Iterator[KvcController]:
    running = KvcController(control_plane).start()
    yield running
    running.stop()


@pytest.fixture
def controller(controller_process: KvcController) -> KvcController:
    """The running controller; restarted first if an earlier test stopped or killed it."""
    if not controller_process.running:
        controller_process.start()
    return controller_process


@pytest.fixture(scope="session")
def agent_processes(control_plane: ControlPlane, kvc_crds: None) -> Iterator[dict[str, KvcAgent]]:
    agents = {node: KvcAgent(control_plane, node).start() for node in NODE_NAMES}
    yield agents
    for agent in agents.values():
        agent.stop()


@pytest.fixture
def agents(agent_processes: dict[str, KvcAgent]) -> dict[str, KvcAgent]:
    """One running, reporting agent per simulated node (restarted if an earlier test stopped one)."""
    for agent in agent_processes.values():
        if not agent.running:
            agent.start()
    for agent in agent_processes.values():
        agent.wait_reporting()
    return agent_processes


@pytest.fixture(scope="module")
def webhook(
    control_plane: ControlPlane, api: Any, kvc_crds: None, request: pytest.FixtureRequest
) -> Iterator[KvcWebhook]:
    """KVC's webhook, registered with the API server, for the tests of one module (its log is
    named after the module)."""
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_").replace("_", "-")
    running = KvcWebhook(control_plane, name=f"kvc-webhook-{module}").start()
    with running.registered(api):
        yield running
    running.stop()


@pytest.fixture
def s3_data(s3: S3Server, api: Any, namespace: str) -> str:
    """A bucket of 20 small objects under cifar/ (``helpers.s3_config``), and the Secret aws-creds."""
    s3_client = s3.client()
    bucket = f"hook-{namespace}"
    s3_client.create_bucket(Bucket=bucket)
    for i in range(20):
        s3_client.put_object(Bucket=bucket, Key=f"cifar/{i}.bin", Body=bytes([i]) * 1000)
    client.CoreV1Api(api).create_namespaced_secret(namespace, credentials_secret("aws-creds"))
    return bucket
