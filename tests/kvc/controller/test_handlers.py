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

from kvc.controller import handlers, limit_malloc_arenas

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
