from __future__ import annotations

import asyncio
import logging
import platform
from pathlib import Path
from typing import Any

import kopf
import kubernetes.config
import pytest
import yaml

from kvc.api import names
from kvc.controller import handlers, limit_malloc_arenas, passes
from kvc.throttle import Throttle

KUBECONFIG = {
    "apiVersion": "v1",
    "kind": "Config",
    "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True}}],
    "users": [{"name": "u", "user": {"token": "secret-token"}}],
    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}}],
    "current-context": "x",
}


def login(monkeypatch: pytest.MonkeyPatch, kubeconfig: Path) -> dict[str, Any]:
    """Run the login handler; what its session would send, read before the session is closed."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod: the kubeconfig
    # The client reads $KUBECONFIG when imported: point its default at the file instead.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))

    async def run() -> dict[str, Any]:
        # kopf types its decorated handlers with every argument it could pass; login reads two.
        login_handler: Any = handlers.login
        info = await login_handler(logger=logging.getLogger("test"), settings=kopf.OperatorSettings())
        assert isinstance(info, kopf.AiohttpSession)
        session = info.aiohttp_session
        assert session.connector is not None
        seen = {"server": info.server, "limit": session.connector.limit, "headers": dict(session.headers)}
        await session.close()
        return seen

    return asyncio.run(run())


def test_kopf_talks_to_the_api_server_on_a_bounded_pool_with_the_kubeconfig_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(KUBECONFIG))
    seen = login(monkeypatch, kubeconfig)
    assert seen["server"] == "https://127.0.0.1:6443"
    assert seen["limit"] == handlers.API_CONNECTIONS > 0
    assert seen["headers"]["Authorization"] == "Bearer secret-token"


def test_no_credentials_is_a_login_error_not_an_unbounded_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(kopf.LoginError):
        login(monkeypatch, tmp_path / "missing")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="M_ARENA_MAX is glibc's")
def test_malloc_arenas_are_capped_on_glibc() -> None:
    assert limit_malloc_arenas(2) is True


# --------------------------------------------------------------------------- which events pass


@pytest.fixture
def passed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The VolumeManagers (uids) passed, in order, with a fresh pass memory; nothing reconciled for real."""
    seen: list[str] = []
    monkeypatch.setattr(handlers, "PASSES", passes.PassMemory())
    monkeypatch.setattr(handlers, "_reconcile_once", lambda body, _patch, _memo: seen.append(body["metadata"]["uid"]))
    return seen


def volumemanager(uid: str = "u1", generation: int = 1, **status: Any) -> kopf.Body:
    metadata = {"uid": uid, "namespace": "team-a", "generation": generation, "finalizers": [names.FINALIZER]}
    raw: Any = {"metadata": metadata, "spec": {}, "status": status}
    return kopf.Body(raw)


def event(kind: str | None, body: kopf.Body) -> None:
    handler: Any = handlers.volumemanager_event  # kopf types it with every argument it could pass
    handler(type=kind, body=body, patch=kopf.Patch(), memo=kopf.Memo())


def test_a_spec_no_pass_has_seen_is_passed_at_its_first_event(passed: list[str]) -> None:
    event("MODIFIED", volumemanager("new"))  # no status yet
    event(None, volumemanager("changed-while-down", generation=3, observedGeneration=2))  # listed at start
    assert passed == ["new", "changed-while-down"]


def test_events_of_a_passed_spec_leave_it_to_the_timer(passed: list[str]) -> None:
    event("MODIFIED", volumemanager("u1", generation=2, observedGeneration=2))
    assert passed == []
    # What this process wrote counts before the watch brings it back.
    handlers.PASSES.record("u2", "Pending", {"observedGeneration": 1})
    event("MODIFIED", volumemanager("u2"))
    assert passed == []


class _Running:
    """A timer's ``stopped`` flag that is never set."""

    async def wait(self, timeout: float | None = None) -> bool:
        return False


def timer_tick(monkeypatch: pytest.MonkeyPatch, body: kopf.Body) -> None:
    """One tick of the resync timer, with no gated pods to look for."""
    never = Throttle(3600)
    never.due(body["metadata"]["namespace"])
    monkeypatch.setattr(handlers, "GATED_POD_PASSES", never)
    memo = kopf.Memo()
    memo.executor = None  # the loop's default executor
    handler: Any = handlers.volumemanager_timer
    asyncio.run(handler(body=body, patch=kopf.Patch(), memo=memo, stopped=_Running()))


def test_the_timer_passes_a_volumemanager_only_once_its_finalizer_is_on(
    monkeypatch: pytest.MonkeyPatch, passed: list[str]
) -> None:
    body = volumemanager("u1")
    body["metadata"]["finalizers"] = []  # kopf starts timers before it adds the finalizer
    timer_tick(monkeypatch, body)
    assert passed == []
    body["metadata"]["finalizers"] = [names.FINALIZER]
    timer_tick(monkeypatch, body)
    assert passed == ["u1"]


def test_nothing_is_made_before_the_finalizer_is_on_or_once_deletion_started(passed: list[str]) -> None:
    unguarded = volumemanager("u1")
    unguarded["metadata"]["finalizers"] = []
    event("ADDED", unguarded)
    deleting = volumemanager("u2")
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    event("MODIFIED", deleting)
    event("DELETED", volumemanager("u3"))
    assert passed == []


def test_a_failed_event_pass_is_retried_by_the_next_tick_and_frees_its_volumemanager(
    monkeypatch: pytest.MonkeyPatch, passed: list[str]
) -> None:
    def fail(*_: Any) -> None:
        raise RuntimeError("API server unreachable")

    monkeypatch.setattr(handlers, "_reconcile_once", fail)
    handlers.PASSES.record("u1", "Pending", None)  # settled before the spec changed
    with pytest.raises(RuntimeError, match="unreachable"):
        event("MODIFIED", volumemanager("u1", generation=2, observedGeneration=1))
    assert handlers.PASSES.due("u1")
    assert handlers.PASSES.begin("u1")  # not left claimed by the failed pass


def test_a_pass_under_way_is_not_doubled(passed: list[str]) -> None:
    assert handlers.PASSES.begin("u1")  # e.g. the timer's
    event("MODIFIED", volumemanager("u1"))
    assert passed == []
    handlers.PASSES.end("u1")
    event("MODIFIED", volumemanager("u1"))
    assert passed == ["u1"]
