"""The webhook server over real HTTP(S) on loopback."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509

from certs import pki
from webhook.index import VolumeIndex
from webhook.server import MAX_BODY, ReloadingTLS, make_app, new_event_loop

SOURCE = {"hostPath": {"path": "/var/lib/kvc/team-a/datasets/cifar-1", "type": "Directory"}}


def synced_index() -> VolumeIndex:
    index = VolumeIndex()
    index.replace_all(
        [
            {
                "metadata": {"name": "datasets", "namespace": "team-a"},
                "spec": {"volumeConfigs": [{"id": "cifar", "sourceType": "S3"}]},
                "status": {"volumes": [{"id": "cifar", "phase": "Ready", "message": "ok", "volumeSource": SOURCE}]},
            }
        ]
    )
    return index


def run(main: Coroutine[Any, Any, None]) -> None:
    """On the event loop the webhook serves on."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main)


def with_client(index: VolumeIndex, body: Callable[[TestClient[Any, Any]], Awaitable[None]]) -> None:
    async def main() -> None:
        async with TestClient(TestServer(make_app(index))) as client:
            await body(client)

    run(main())


def review(annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "uid-7",
            "operation": "CREATE",
            "namespace": "team-a",
            "object": {
                "kind": "Pod",
                "metadata": {"annotations": annotations},
                "spec": {"containers": [{"name": "c"}]},
            },
        },
    }


def test_admission_endpoint_answers_reviews_and_rejects_garbage() -> None:
    async def body(client: TestClient[Any, Any]) -> None:
        ok = await client.post("/mutate", json=review({"kvc/volume": "cifar"}))
        assert ok.status == 200
        decision = await ok.json()
        assert decision["response"]["uid"] == "uid-7"
        assert decision["response"]["patchType"] == "JSONPatch"
        denied = await (await client.post("/mutate", json=review({"kvc/volume": "nope"}))).json()
        assert denied["response"]["allowed"] is False
        not_json = await client.post("/mutate", data=b"{not json")
        assert not_json.status == 400
        assert (await not_json.json()) == {"error": "the body is not JSON"}
        not_review = await client.post("/mutate", json={"kind": "Pod"})
        assert not_review.status == 400
        too_big = await client.post("/mutate", data=b"x" * (MAX_BODY + 1))
        assert too_big.status == 413
        text = await (await client.get("/metrics")).text()
        assert 'kvc_webhook_admissions_total{result="patched"}' in text
        assert 'kvc_webhook_denials_total{reason="unknown"}' in text
        assert "kvc_webhook_admission_seconds_bucket" in text

    with_client(synced_index(), body)


def test_ready_only_once_the_index_has_synced() -> None:
    index = VolumeIndex()

    async def body(client: TestClient[Any, Any]) -> None:
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 503
        index.replace_all([])
        assert (await client.get("/readyz")).status == 200

    with_client(index, body)


def _served_certificate(port: int, ca_pem: bytes) -> x509.Certificate:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_a_renewed_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    ca = pki.new_ca("webhook-test")
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    first = pki.new_serving_cert(ca, ["localhost"], ["127.0.0.1"])
    cert_file.write_bytes(first.cert_pem)
    key_file.write_bytes(first.key_pem)
    tls = ReloadingTLS(cert_file, key_file)

    async def main() -> None:
        runner = web.AppRunner(make_app(synced_index()))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.context)
        await site.start()
        port = runner.addresses[0][1]
        try:
            loop = asyncio.get_running_loop()
            served = await loop.run_in_executor(None, _served_certificate, port, ca.cert_pem)
            assert served.serial_number == first.certificate.serial_number
            second = pki.new_serving_cert(ca, ["localhost"], ["127.0.0.1"])
            key_file.write_bytes(second.key_pem)
            cert_file.write_bytes(second.cert_pem)
            assert tls.reload_if_changed()
            served = await loop.run_in_executor(None, _served_certificate, port, ca.cert_pem)
            assert served.serial_number == second.certificate.serial_number
        finally:
            await runner.cleanup()

    run(main())


def test_a_broken_certificate_pair_keeps_the_old_one(tmp_path: Path) -> None:
    ca = pki.new_ca("webhook-test")
    good = pki.new_serving_cert(ca, ["localhost"], ["127.0.0.1"])
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(good.cert_pem)
    key_file.write_bytes(good.key_pem)
    tls = ReloadingTLS(cert_file, key_file)
    cert_file.write_bytes(pki.new_serving_cert(ca, ["localhost"]).cert_pem)  # the key no longer matches
    assert tls.reload_if_changed() is False

    async def main() -> None:
        runner = web.AppRunner(make_app(synced_index()))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.context)
        await site.start()
        try:
            port = runner.addresses[0][1]
            served = await asyncio.get_running_loop().run_in_executor(None, _served_certificate, port, ca.cert_pem)
            assert served.serial_number == good.certificate.serial_number
        finally:
            await runner.cleanup()

    run(main())
