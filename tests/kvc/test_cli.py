"""`kvc status` and `kvc datasets` against a stand-in for the API (the real one is in e2e/test_cli.py):
what reaches the terminal, and the exit codes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from click.testing import CliRunner, Result
from kubernetes.client.rest import ApiException
from kubernetes.config import kube_config

from kvc.cli import cli


def kubeconfig(path: Path, server: str = "https://127.0.0.1:6443", namespace: str | None = "team-a") -> Path:
    context: dict[str, str] = {"cluster": "c", "user": "u"}
    if namespace:
        context["namespace"] = namespace
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "ctx", "context": context}],
                "current-context": "ctx",
            }
        )
    )
    return path


def api_error(status: int, body: dict[str, Any] | str, reason: str = "") -> ApiException:
    error = ApiException(status=status, reason=reason or {404: "Not Found", 403: "Forbidden"}.get(status, "Error"))
    error.body = body if isinstance(body, str) else json.dumps(body)
    return error


class FakeApi:
    """CustomObjectsApi's three read calls; records what was asked, answers from pages or raises."""

    def __init__(self, pages: list[list[dict[str, Any]]] | None = None, error: Exception | None = None) -> None:
        self.pages = pages or [[]]
        self.error = error
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def _answer(self, call: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((call, args, kwargs))
        if self.error is not None:
            raise self.error
        if call == "get":
            return self.pages[0][0]
        index = int(kwargs.get("_continue") or 0)
        more = {"continue": str(index + 1)} if index + 1 < len(self.pages) else {}
        return {"items": self.pages[index], "metadata": more}

    def get_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._answer("get", args, kwargs)

    def list_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._answer("list", args, kwargs)

    def list_cluster_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._answer("list-all", args, kwargs)


@pytest.fixture
def use_kubeconfig(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[Path], None]:
    # The client reads KUBECONFIG once, at import: point its default at the test's file.
    def use(path: Path) -> None:
        monkeypatch.setenv("KUBECONFIG", str(path))
        monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))

    return use


class LeaseResponse:
    """What read_namespaced_lease answers with _preload_content=False: the body and the headers."""

    def __init__(self, body: dict[str, Any], date: str | None) -> None:
        self.data = json.dumps(body).encode()
        self.headers = {"Date": date} if date else {}


# The API server's clock when it answers (its Date header), and a Lease renewed 3 s before.
SERVER_DATE = "Sat, 01 Mar 2025 12:00:00 GMT"
LEASE = {
    "metadata": {"name": "kvc-controller", "namespace": "kvc-system"},
    "spec": {
        "holderIdentity": "kvc-controller-5f7d-abcde",
        "leaseDurationSeconds": 30,
        "acquireTime": "2025-03-01T11:58:00.000000Z",
        "renewTime": "2025-03-01T11:59:57.000000Z",
        "leaseTransitions": 2,
    },
}


class FakeCoordination:
    """CoordinationV1Api's read of the controller's Lease: records it, answers or raises."""

    def __init__(
        self, lease: dict[str, Any] | None = None, error: Exception | None = None, date: str | None = SERVER_DATE
    ) -> None:
        self.lease = LEASE if lease is None else lease
        self.error = error
        self.date = date
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def read_namespaced_lease(self, *args: Any, **kwargs: Any) -> LeaseResponse:
        self.calls.append((args, kwargs))
        if self.error is not None:
            raise self.error
        return LeaseResponse(self.lease, self.date)


@pytest.fixture
def coordination(monkeypatch: pytest.MonkeyPatch) -> Callable[[FakeCoordination], FakeCoordination]:
    """Install a FakeCoordination as the cluster's coordination API."""

    def install(api: FakeCoordination) -> FakeCoordination:
        monkeypatch.setattr(kubernetes.client, "CoordinationV1Api", lambda *_: api)
        return api

    install(FakeCoordination())
    return install


@pytest.fixture
def cluster(
    use_kubeconfig: Callable[[Path], None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    coordination: Callable[[FakeCoordination], FakeCoordination],
) -> Any:
    """Install a FakeApi as the cluster behind a kubeconfig whose context namespace is team-a
    (and, as its coordination API, a FakeCoordination with a fresh Lease, unless a test installs another)."""
    use_kubeconfig(kubeconfig(tmp_path / "kubeconfig"))

    def install(api: FakeApi) -> FakeApi:
        monkeypatch.setattr(kubernetes.client, "CustomObjectsApi", lambda *_: api)
        return api

    return install


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def assert_one_line_error(result: Result, line: str, exit_code: int = 1) -> None:
    assert result.exit_code == exit_code, result.output
    assert result.stderr.splitlines() == [line]
    assert result.stdout == ""
    assert "Traceback" not in result.output


VM = {
    "metadata": {"name": "datasets", "namespace": "team-a"},
    "spec": {"volumeConfigs": [{"id": "cifar", "sourceType": "S3", "labels": {"team": "vision"}}]},
    "status": {"state": "Running", "message": "all 1 volumes ready", "volumes": [{"id": "cifar", "phase": "Ready"}]},
}


# --------------------------------------------------------------------------- errors


def test_no_kubeconfig_is_one_line(use_kubeconfig: Callable[[Path], None], tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    use_kubeconfig(missing)
    result = run("status", "datasets")
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"kvc: no usable kubeconfig at {missing}: ")


def test_an_unreachable_cluster_is_one_line(use_kubeconfig: Callable[[Path], None], tmp_path: Path) -> None:
    # Nothing listens on port 1; the client retries, and its retry warnings must not reach the user.
    use_kubeconfig(kubeconfig(tmp_path / "kubeconfig", server="https://127.0.0.1:1"))
    for args in (["status", "datasets"], ["datasets", "-A"]):
        assert_one_line_error(run(*args), "kvc: cannot reach the cluster at https://127.0.0.1:1: Connection refused")


NOT_FOUND_BODY = {
    "kind": "Status",
    "status": "Failure",
    "message": 'volumemanagers.kvc.kubeflow.org "nope" not found',
    "reason": "NotFound",
    "details": {"name": "nope", "group": "kvc.kubeflow.org", "kind": "volumemanagers"},
    "code": 404,
}
FORBIDDEN_MESSAGE = (
    'volumemanagers.kvc.kubeflow.org is forbidden: User "bob" cannot list resource "volumemanagers"'
    ' in API group "kvc.kubeflow.org" at the cluster scope'
)
NO_API = "kvc: the cluster does not serve volumemanagers.kvc.kubeflow.org/v1: are KVC's CRDs installed?"


@pytest.mark.parametrize(
    ("args", "error", "line"),
    [
        (
            ["status", "nope"],
            api_error(404, NOT_FOUND_BODY),
            'kvc: volumemanager "nope" not found in namespace "team-a"',
        ),
        (
            ["status", "nope", "-n", "other"],
            api_error(404, NOT_FOUND_BODY),
            'kvc: volumemanager "nope" not found in namespace "other"',
        ),
        (["status", "nope"], api_error(404, "404 page not found\n"), NO_API),
        (["datasets"], api_error(404, "404 page not found\n"), NO_API),
        (
            ["datasets", "-A"],
            api_error(403, {"kind": "Status", "message": FORBIDDEN_MESSAGE, "code": 403}),
            f"kvc: forbidden: {FORBIDDEN_MESSAGE}; -n NAMESPACE searches one namespace",
        ),
        (
            ["status", "x"],
            api_error(403, {"message": "no"}),
            "kvc: forbidden: no",
        ),
        (
            ["status", "x"],
            api_error(401, {"message": "Unauthorized"}, "Unauthorized"),
            "kvc: the cluster rejected the kubeconfig's credentials (401 Unauthorized)",
        ),
        (
            ["status", "x"],
            api_error(500, "etcd is\nunhappy", "Internal Server Error"),
            "kvc: the API server answered 500 Internal Server Error: etcd is unhappy",
        ),
    ],
)
def test_api_errors_are_one_line(cluster: Any, args: list[str], error: ApiException, line: str) -> None:
    cluster(FakeApi(error=error))
    assert_one_line_error(run(*args), line)


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["datasets", "-l", "team in (a,b)"], "set-based requirements"),
        (["datasets", "-l", "team=vision", "-l", "=x"], "'=x' has no label key"),
        (["datasets", "-l", "team=a b"], "is not a label value"),
        (["datasets", "-A", "-n", "team-a"], "use either -A/--all-namespaces or -n/--namespace"),
        (["status"], "Missing argument 'VOLUMEMANAGER'"),
    ],
)
def test_usage_errors_exit_2_before_any_request(cluster: Any, args: list[str], problem: str) -> None:
    api = cluster(FakeApi())
    result = run(*args)
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    assert problem in errors[0]
    assert api.calls == []


@pytest.mark.parametrize("args", [["--help"], ["status", "--help"], ["datasets", "-h"]])
def test_help(args: list[str]) -> None:
    result = run(*args)
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: ")


# --------------------------------------------------------------------------- output


def test_status_reads_the_volumemanager_in_the_contexts_namespace(cluster: Any) -> None:
    api = cluster(FakeApi(pages=[[VM]]))
    result = run("status", "datasets")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:3] == [
        "VolumeManager datasets in namespace team-a",
        "State:    Running",
        "Message:  all 1 volumes ready",
    ]
    ((call, args, _),) = api.calls
    assert (call, args) == ("get", ("kvc.kubeflow.org", "v1", "team-a", "volumemanagers", "datasets"))


RUNNING = "Controller: running (kvc-controller-5f7d-abcde, renewed 3s ago; started 2m ago; restarted 2 times)"


def test_status_says_whether_the_controller_renews_its_heartbeat(cluster: Any, coordination: Any) -> None:
    cluster(FakeApi(pages=[[VM]]))
    leases = coordination(FakeCoordination())
    result = run("status", "datasets")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[3] == RUNNING
    ((args, kwargs),) = leases.calls
    assert args == ("kvc-controller", "kvc-system")
    assert kwargs["_preload_content"] is False
    assert kwargs["_request_timeout"]


def test_the_heartbeat_is_judged_by_the_api_servers_clock_not_this_machines(cluster: Any, coordination: Any) -> None:
    # Renewed 3 s before the API server's answer, which this machine's clock (years later) ignores.
    cluster(FakeApi(pages=[[VM]]))
    coordination(FakeCoordination())
    assert run("status", "datasets").stdout.splitlines()[3] == RUNNING
    # An answer without a Date: this machine's clock it is, and the Lease of 2025 is stale.
    coordination(FakeCoordination(date=None))
    line = run("status", "datasets").stdout.splitlines()[3]
    assert line.startswith("Controller: NOT RENEWING - last renewed ")
    assert line.endswith(" ago by kvc-controller-5f7d-abcde: the controller may be down; this status may be stale")


@pytest.mark.parametrize(
    ("lease_api", "line"),
    [
        (
            FakeCoordination(error=api_error(404, NOT_FOUND_BODY)),
            "Controller: no heartbeat found (is the KVC controller running? no Lease kvc-controller in namespace "
            "kvc-system)",
        ),
        (
            FakeCoordination(error=api_error(403, {"message": 'leases "kvc-controller" is forbidden'})),
            "Controller: heartbeat not readable (forbidden to read Lease kvc-system/kvc-controller)",
        ),
        (
            FakeCoordination(error=api_error(500, "etcd is unhappy", "Internal Server Error")),
            "Controller: heartbeat not readable (the API server answered 500 Internal Server Error)",
        ),
        (
            FakeCoordination(error=ConnectionRefusedError(111, "Connection refused")),
            "Controller: heartbeat not readable (cannot reach the cluster at https://127.0.0.1:6443: "
            "Connection refused)",
        ),
    ],
)
def test_a_heartbeat_that_cannot_be_read_is_one_line_and_the_status_still_shows(
    cluster: Any, coordination: Any, lease_api: FakeCoordination, line: str
) -> None:
    cluster(FakeApi(pages=[[VM]]))
    coordination(lease_api)
    result = run("status", "datasets")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[1:4] == ["State:    Running", "Message:  all 1 volumes ready", line]
    assert lines[-1].split()[:3] == ["cifar", "S3", "Ready"]


def test_the_kvc_namespace_says_where_the_heartbeat_is(
    cluster: Any, coordination: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster(FakeApi(pages=[[VM]]))
    leases = coordination(FakeCoordination())
    assert run("status", "datasets", "--kvc-namespace", "kvc-ops").exit_code == 0
    monkeypatch.setenv("KVC_NAMESPACE", "from-env")
    assert run("status", "datasets").exit_code == 0
    assert [args[1] for args, _ in leases.calls] == ["kvc-ops", "from-env"]


def test_the_namespace_defaults_to_default_without_one_in_the_context(
    use_kubeconfig: Callable[[Path], None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    coordination: Any,
) -> None:
    use_kubeconfig(kubeconfig(tmp_path / "kubeconfig", namespace=None))
    api = FakeApi(pages=[[VM]])
    monkeypatch.setattr(kubernetes.client, "CustomObjectsApi", lambda *_: api)
    assert run("status", "datasets").exit_code == 0
    assert api.calls[0][1][2] == "default"


def test_datasets_lists_every_page_and_filters_by_label(cluster: Any) -> None:
    other = {
        "metadata": {"name": "models", "namespace": "team-b"},
        "spec": {"volumeConfigs": [{"id": "bert", "sourceType": "HTTP", "labels": {"team": "nlp"}}]},
    }
    second = {**VM, "metadata": {"name": "more", "namespace": "team-c"}}
    api = cluster(FakeApi(pages=[[VM, other], [second]]))
    result = run("datasets", "-A", "-l", "team=vision")
    assert result.exit_code == 0, result.output
    assert [line.split() for line in result.stdout.splitlines()] == [
        ["NAMESPACE", "VOLUMEMANAGER", "ID", "SOURCE", "PHASE", "REPLICAS", "LABELS"],
        ["team-a", "datasets", "cifar", "S3", "Ready", "-", "team=vision"],
        ["team-c", "more", "cifar", "S3", "Ready", "-", "team=vision"],
    ]
    assert [call for call, _, _ in api.calls] == ["list-all", "list-all"]
    assert api.calls[1][2]["_continue"] == "1"


def test_datasets_searches_one_namespace_and_says_when_nothing_matches(cluster: Any) -> None:
    api = cluster(FakeApi(pages=[[VM]]))
    result = run("datasets", "-n", "team-x", "-l", "team=vision,kind=model")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert result.stderr == 'No volumes matching team=vision,kind=model in namespace "team-x".\n'
    assert [(call, args[2]) for call, args, _ in api.calls] == [("list", "team-x")]


# --------------------------------------------------------------------------- kvc run controller


def test_the_controller_keeps_its_heartbeat_in_its_pods_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """POD_NAMESPACE (the downward API in deploy/manager) places the Lease; the flag overrides it."""
    import kvc.controller  # noqa: PLC0415 - kopf's import, for this test only
    from kvc import metrics  # noqa: PLC0415
    from kvc.controller import lease  # noqa: PLC0415

    given: list[lease.HeartbeatSettings] = []
    monkeypatch.setattr(kvc.controller, "run", lambda *args, heartbeat, **kwargs: given.append(heartbeat))
    monkeypatch.setattr(kvc.controller, "limit_malloc_arenas", lambda: True)
    monkeypatch.setattr(metrics, "serve", lambda port: None)
    monkeypatch.setenv("POD_NAMESPACE", "kvc-ops")
    monkeypatch.setenv("POD_NAME", "kvc-controller-5f7d-abcde")
    assert run("run", "controller").exit_code == 0
    assert given.pop() == lease.HeartbeatSettings(
        namespace="kvc-ops", duration_seconds=30, identity="kvc-controller-5f7d-abcde"
    )
    result = run("run", "controller", "--lease-namespace", "elsewhere", "--lease-duration", "6")
    assert result.exit_code == 0, result.output
    settings = given.pop()
    assert (settings.namespace, settings.duration_seconds, settings.renew_seconds) == ("elsewhere", 6, 2)
    assert run("run", "controller", "--lease-duration", "2").exit_code == 2  # renewed more than once a second
