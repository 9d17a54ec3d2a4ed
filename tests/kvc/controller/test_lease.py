"""The controller's heartbeat Lease: the objects it writes (pure), and the runner against a
stand-in for the API server that keeps resourceVersions as the real one does (e2e/test_cli.py
runs it against the real one)."""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import kopf
import pytest
from kubernetes.client.rest import ApiException
from urllib3.exceptions import MaxRetryError, NewConnectionError

from kvc.api import names
from kvc.controller import handlers, lease
from kvc.controller.lease import Heartbeat, HeartbeatSettings, KubernetesLeases, LeaseError
from tests.fakeclock import FakeClock

T0 = dt.datetime(2025, 3, 1, 12, 0, 0, 250000, tzinfo=dt.UTC)
SETTINGS = HeartbeatSettings(namespace="kvc-system", identity="kvc-controller-5f7d-abcde")


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


class FakeLeases:
    """Leases kept in memory as the API server keeps them: a resourceVersion bumped by every
    write, 409 for a replace with an older one or a create of an existing Lease, 404 where the
    namespace does not exist. ``failure``: raised by every call while set."""

    def __init__(self, namespaces: tuple[str, ...] = ("kvc-system",)) -> None:
        self.namespaces = set(namespaces)
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[str] = []
        self.failure: Exception | None = None
        self._version = 100

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._called("get")
        found = self.objects.get((namespace, name))
        return copy.deepcopy(found) if found else None

    def create(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        self._called("create")
        if namespace not in self.namespaces:
            raise LeaseError(404, f'404 Not Found: namespaces "{namespace}" not found')
        name = body["metadata"]["name"]
        if (namespace, name) in self.objects:
            raise LeaseError(409, f'409 Conflict: leases.coordination.k8s.io "{name}" already exists')
        return self._store(namespace, name, body)

    def replace(self, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        self._called("replace")
        stored = self.objects.get((namespace, name))
        if stored is None:
            raise LeaseError(404, f'404 Not Found: leases.coordination.k8s.io "{name}" not found')
        if body["metadata"].get("resourceVersion") != stored["metadata"]["resourceVersion"]:
            raise LeaseError(409, "409 Conflict: the object has been modified; please apply your changes")
        return self._store(namespace, name, body)

    def edit(self, namespace: str, name: str, **spec: Any) -> None:
        """Someone else writes the Lease (a kubectl edit, another controller)."""
        stored = copy.deepcopy(self.objects[(namespace, name)])
        stored["spec"].update(spec)
        self._store(namespace, name, stored)

    def lease(self, namespace: str = "kvc-system", name: str = names.CONTROLLER_LEASE) -> dict[str, Any]:
        return self.objects[(namespace, name)]

    def _called(self, call: str) -> None:
        self.calls.append(call)
        if self.failure is not None:
            raise self.failure

    def _store(self, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        self._version += 1
        stored = copy.deepcopy(dict(body))
        stored["metadata"] = {**stored["metadata"], "resourceVersion": str(self._version), "namespace": namespace}
        self.objects[(namespace, name)] = stored
        return copy.deepcopy(stored)


class Clocks:
    """The wall clock the Lease's times come from and the monotonic one of the log reminders."""

    def __init__(self) -> None:
        self.seconds = FakeClock(0.0)

    def wall(self) -> dt.datetime:
        return at(self.seconds())

    def advance(self, seconds: float) -> None:
        self.seconds.now += seconds


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


def heartbeat(leases: FakeLeases, clocks: Clocks, settings: HeartbeatSettings = SETTINGS) -> Heartbeat:
    return Heartbeat(leases, settings, clock=clocks.wall, monotonic=clocks.seconds)


# --------------------------------------------------------------------------- the objects


def test_a_new_lease_is_held_since_now_with_no_transition() -> None:
    created = lease.new_lease(SETTINGS, T0)
    assert created == {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": "kvc-controller",
            "namespace": "kvc-system",
            "labels": {"app.kubernetes.io/managed-by": "kvc"},
        },
        "spec": {
            "holderIdentity": "kvc-controller-5f7d-abcde",
            "leaseDurationSeconds": 30,
            "acquireTime": "2025-03-01T12:00:00.250000Z",
            "renewTime": "2025-03-01T12:00:00.250000Z",
            "leaseTransitions": 0,
        },
    }


def test_micro_time_is_utc_with_microseconds_whatever_the_zone() -> None:
    paris = dt.timezone(dt.timedelta(hours=1))
    assert lease.micro_time(dt.datetime(2025, 3, 1, 13, 0, 0, tzinfo=paris)) == "2025-03-01T12:00:00.000000Z"


def held(
    holder: str = SETTINGS.identity, acquired: str = "2025-03-01T11:00:00.000000Z", transitions: object = 2
) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": "kvc-controller",
            "namespace": "kvc-system",
            "resourceVersion": "42",
            "managedFields": [{"manager": "kvc"}],
            "annotations": {"note": "kept"},
        },
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 30,
            "acquireTime": acquired,
            "renewTime": "2025-03-01T11:59:50.000000Z",
            "leaseTransitions": transitions,
        },
    }


def test_renewing_a_lease_this_process_holds_changes_only_its_renew_time() -> None:
    current = held()
    renewed = lease.renewed_lease(current, SETTINGS, "2025-03-01T11:00:00.000000Z", at(10))
    assert renewed["spec"] == {**current["spec"], "renewTime": "2025-03-01T12:00:10.250000Z"}
    # The resourceVersion read makes the replace fail if anyone wrote the Lease since.
    assert renewed["metadata"]["resourceVersion"] == "42"
    assert renewed["metadata"]["annotations"] == {"note": "kept"}
    assert "managedFields" not in renewed["metadata"]
    assert current == held()  # the Lease read is not changed in place


@pytest.mark.parametrize(
    ("current", "acquired", "transitions"),
    [
        # A new pod takes over from the one before it.
        (held(holder="kvc-controller-5f7d-zzzzz"), None, 3),
        # The same pod's container, restarted: same name, but this process never took the Lease.
        (held(), None, 3),
        # This process held it, and another one wrote it since (two controllers at once).
        (held(holder="someone-else", acquired="2025-03-01T11:30:00.000000Z"), "2025-03-01T11:00:00.000000Z", 3),
        # A Lease nobody ever held (made by hand): taking it is no transition.
        ({"metadata": {"resourceVersion": "7"}, "spec": {"leaseDurationSeconds": 15}}, None, 0),
        # Garbage where the count belongs counts as none.
        (held(holder="old", transitions="many"), None, 1),
    ],
)
def test_taking_the_lease_over_counts_a_transition_and_sets_acquire_time(
    current: dict[str, Any], acquired: str | None, transitions: int
) -> None:
    renewed = lease.renewed_lease(current, SETTINGS, acquired, at(5))
    assert renewed["spec"]["holderIdentity"] == SETTINGS.identity
    assert renewed["spec"]["acquireTime"] == renewed["spec"]["renewTime"] == "2025-03-01T12:00:05.250000Z"
    assert renewed["spec"]["leaseTransitions"] == transitions
    assert renewed["spec"]["leaseDurationSeconds"] == 30
    assert renewed["metadata"]["labels"][names.LABEL_MANAGED_BY] == names.MANAGED_BY


def test_renewals_come_three_times_per_lease_duration() -> None:
    assert SETTINGS.renew_seconds == 10
    assert HeartbeatSettings(duration_seconds=3, identity="x").renew_seconds == 1


def test_the_holder_is_the_pod_name_else_host_and_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "kvc-controller-5f7d-abcde")
    assert lease.holder_identity() == "kvc-controller-5f7d-abcde"
    monkeypatch.delenv("POD_NAME")
    assert lease.holder_identity() == f"{socket.gethostname()}-{os.getpid()}"


# --------------------------------------------------------------------------- the runner


def test_the_first_beat_creates_the_lease_and_later_ones_replace_it_with_one_call(clocks: Clocks) -> None:
    leases = FakeLeases()
    beats = heartbeat(leases, clocks)
    assert beats.beat()
    first = copy.deepcopy(leases.lease())
    assert first["spec"]["renewTime"] == first["spec"]["acquireTime"] == "2025-03-01T12:00:00.250000Z"
    assert first["spec"]["leaseTransitions"] == 0
    for _ in range(3):
        clocks.advance(10)
        assert beats.beat()
    assert leases.calls == ["get", "create", "replace", "replace", "replace"]
    spec = leases.lease()["spec"]
    assert spec["renewTime"] == "2025-03-01T12:00:30.250000Z"
    assert (spec["acquireTime"], spec["leaseTransitions"]) == (first["spec"]["acquireTime"], 0)


def test_a_restarted_controller_takes_the_lease_over_and_counts_it(clocks: Clocks) -> None:
    leases = FakeLeases()
    assert heartbeat(leases, clocks).beat()
    clocks.advance(40)  # killed: no renewal since
    # The kubelet restarts the container: the same pod name, a new process.
    assert heartbeat(leases, clocks).beat()
    spec = leases.lease()["spec"]
    assert spec["leaseTransitions"] == 1
    assert spec["acquireTime"] == "2025-03-01T12:00:40.250000Z"
    # Then a new pod.
    clocks.advance(5)
    assert heartbeat(leases, clocks, HeartbeatSettings(identity="kvc-controller-5f7d-xyz12")).beat()
    spec = leases.lease()["spec"]
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("kvc-controller-5f7d-xyz12", 2)


def test_a_conflict_is_read_again_at_the_next_beat_without_counting_a_transition(
    clocks: Clocks, caplog: pytest.LogCaptureFixture
) -> None:
    leases = FakeLeases()
    beats = heartbeat(leases, clocks)
    assert beats.beat()
    leases.edit("kvc-system", names.CONTROLLER_LEASE, leaseDurationSeconds=30)  # a no-op edit: a new version
    clocks.advance(10)
    with caplog.at_level(logging.DEBUG, logger="kvc.controller.lease"):
        assert not beats.beat()
        clocks.advance(10)
        assert beats.beat()
    assert leases.calls[-3:] == ["replace", "get", "replace"]
    spec = leases.lease()["spec"]
    assert (spec["leaseTransitions"], spec["renewTime"]) == (0, "2025-03-01T12:00:20.250000Z")
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "cannot renew Lease kvc-system/kvc-controller" in warning.getMessage()
    assert "409 Conflict" in warning.getMessage()


def test_a_second_controller_writing_the_lease_is_warned_about(
    clocks: Clocks, caplog: pytest.LogCaptureFixture
) -> None:
    leases = FakeLeases()
    ours = heartbeat(leases, clocks)
    assert ours.beat()
    other = heartbeat(leases, clocks, HeartbeatSettings(identity="stray-controller"))
    clocks.advance(1)
    assert other.beat()
    clocks.advance(9)
    with caplog.at_level(logging.INFO, logger="kvc.controller.lease"):
        assert not ours.beat()  # its version is stale: 409, read again
        assert ours.beat()
    assert leases.lease()["spec"]["holderIdentity"] == SETTINGS.identity
    assert leases.lease()["spec"]["leaseTransitions"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("was renewed by stray-controller meanwhile: is another KVC controller running?" in w for w in warnings)


def test_a_deleted_lease_is_created_again(clocks: Clocks) -> None:
    leases = FakeLeases()
    beats = heartbeat(leases, clocks)
    assert beats.beat()
    del leases.objects[("kvc-system", names.CONTROLLER_LEASE)]
    clocks.advance(10)
    assert not beats.beat()  # 404 on replace
    clocks.advance(10)
    assert beats.beat()
    assert leases.lease()["spec"]["holderIdentity"] == SETTINGS.identity


def test_an_outage_never_raises_warns_once_per_reason_and_says_when_it_is_over(
    clocks: Clocks, caplog: pytest.LogCaptureFixture
) -> None:
    leases = FakeLeases()
    beats = heartbeat(leases, clocks)
    assert beats.beat()
    leases.failure = LeaseError(None, "no answer from the API server: Connection refused")
    with caplog.at_level(logging.DEBUG, logger="kvc.controller.lease"):
        for _ in range(6):
            clocks.advance(10)
            assert not beats.beat()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [
            "heartbeat: cannot renew Lease kvc-system/kvc-controller (failed once; retrying every 10s): "
            "no answer from the API server: Connection refused"
        ]
        # Still failing minutes later: said again, with the count.
        clocks.advance(lease.REMIND_SECONDS)
        assert not beats.beat()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2
        assert "(failed 7 times in a row; retrying every 10s)" in warnings[1]
        # Another reason is news.
        leases.failure = LeaseError(403, '403 Forbidden: leases "kvc-controller" is forbidden')
        clocks.advance(10)
        assert not beats.beat()
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 3
        leases.failure = None
        clocks.advance(10)
        assert beats.beat()
    assert "heartbeat: Lease kvc-system/kvc-controller renewed again after 8 failed attempts" in caplog.messages
    # The process held the Lease throughout: no transition for an outage.
    assert leases.lease()["spec"]["leaseTransitions"] == 0


def test_a_missing_namespace_is_a_warning_and_the_lease_is_made_once_it_exists(
    clocks: Clocks, caplog: pytest.LogCaptureFixture
) -> None:
    leases = FakeLeases(namespaces=())
    beats = heartbeat(leases, clocks)
    with caplog.at_level(logging.WARNING, logger="kvc.controller.lease"):
        assert not beats.beat()
    assert 'namespaces "kvc-system" not found' in caplog.text
    leases.namespaces.add("kvc-system")
    clocks.advance(10)
    assert beats.beat()
    assert leases.lease()["spec"]["leaseTransitions"] == 0


def test_an_unexpected_error_does_not_end_the_heartbeat(clocks: Clocks) -> None:
    leases = FakeLeases()
    leases.failure = RuntimeError("a bug")
    beats = heartbeat(leases, clocks)
    assert not beats.beat()
    leases.failure = None
    assert beats.beat()


def test_the_thread_renews_at_once_and_stops_when_told(clocks: Clocks) -> None:
    leases = FakeLeases()
    beats = Heartbeat(leases, SETTINGS).start()
    assert beats.running
    try:
        deadline = time.monotonic() + 5
        while ("kvc-system", names.CONTROLLER_LEASE) not in leases.objects and time.monotonic() < deadline:
            time.sleep(0.01)
        assert leases.calls == ["get", "create"]
    finally:
        began = time.monotonic()
        beats.stop()
    assert time.monotonic() - began < 1  # not a renewal period
    assert not beats.running


def test_cleanup_stops_the_heartbeat() -> None:
    class Stoppable:
        stopped = False

        def stop(self) -> None:
            self.stopped = True

    running = Stoppable()
    cleanup: Any = handlers.controller_cleanup  # kopf types handlers with every argument it could pass
    cleanup(memo=kopf.Memo(heartbeat=running), logger=logging.getLogger("test"))
    assert running.stopped
    cleanup(memo=kopf.Memo(), logger=logging.getLogger("test"))  # a startup that failed early


# --------------------------------------------------------------------------- the API server's client


class Response:
    def __init__(self, body: Mapping[str, Any]) -> None:
        self.data = json.dumps(body).encode()


class FakeCoordination:
    """CoordinationV1Api's three calls: records them, answers ``answer`` or raises ``error``."""

    def __init__(self, answer: Mapping[str, Any] | None = None, error: Exception | None = None) -> None:
        self.answer = answer or {}
        self.error = error
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def _answer(self, call: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Response:
        self.calls.append((call, args, kwargs))
        if self.error is not None:
            raise self.error
        return Response(self.answer)

    def read_namespaced_lease(self, *args: Any, **kwargs: Any) -> Response:
        return self._answer("read", args, kwargs)

    def create_namespaced_lease(self, *args: Any, **kwargs: Any) -> Response:
        return self._answer("create", args, kwargs)

    def replace_namespaced_lease(self, *args: Any, **kwargs: Any) -> Response:
        return self._answer("replace", args, kwargs)


def api_error(status: int, reason: str, message: str) -> ApiException:
    error = ApiException(status=status, reason=reason)
    error.body = json.dumps({"kind": "Status", "message": message, "code": status})
    return error


def test_the_client_passes_plain_objects_with_a_timeout() -> None:
    api = FakeCoordination(answer={"metadata": {"name": "kvc-controller"}})
    leases = KubernetesLeases(api)
    body = lease.new_lease(SETTINGS, T0)
    assert leases.get("kvc-system", "kvc-controller") == {"metadata": {"name": "kvc-controller"}}
    leases.create("kvc-system", body)
    leases.replace("kvc-system", "kvc-controller", body)
    assert [(call, args) for call, args, _ in api.calls] == [
        ("read", ("kvc-controller", "kvc-system")),
        ("create", ("kvc-system", body)),
        ("replace", ("kvc-controller", "kvc-system", body)),
    ]
    for _, _, kwargs in api.calls:
        assert kwargs == {"_preload_content": False, "_request_timeout": lease.REQUEST_TIMEOUT}


def test_the_client_says_what_the_api_server_answered_in_one_line() -> None:
    assert KubernetesLeases(FakeCoordination(error=api_error(404, "Not Found", "not found"))).get("a", "b") is None
    forbidden = api_error(
        403,
        "Forbidden",
        'leases.coordination.k8s.io "kvc-controller" is forbidden: User "system:serviceaccount:kvc-system:'
        'kvc-controller" cannot update resource "leases"\nin API group "coordination.k8s.io"',
    )
    with pytest.raises(LeaseError) as refused:
        KubernetesLeases(FakeCoordination(error=forbidden)).replace("kvc-system", "kvc-controller", {})
    assert refused.value.status == 403
    assert refused.value.reason == (
        '403 Forbidden: leases.coordination.k8s.io "kvc-controller" is forbidden: User '
        '"system:serviceaccount:kvc-system:kvc-controller" cannot update resource "leases" in API group '
        '"coordination.k8s.io"'
    )
    down = MaxRetryError(None, "/apis/coordination.k8s.io", NewConnectionError(None, "Connection refused"))  # type: ignore[arg-type]
    with pytest.raises(LeaseError) as unanswered:
        KubernetesLeases(FakeCoordination(error=down)).get("kvc-system", "kvc-controller")
    assert unanswered.value.status is None
    assert unanswered.value.reason.startswith("no answer from the API server: ")
    with pytest.raises(LeaseError) as not_found:
        KubernetesLeases(FakeCoordination(error=api_error(404, "Not Found", "gone"))).create("x", {})
    assert (not_found.value.status, not_found.value.reason) == (404, "404 Not Found: gone")
