"""The webhook server over real HTTP(S) on loopback."""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509

from certs import pki
from webhook.index import ReadThrough, VolumeIndex
from webhook.server import MAX_BODY, Callers, ReloadingTLS, make_app, new_event_loop

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


def with_client(
    index: VolumeIndex,
    body: Callable[[TestClient[Any, Any]], Awaitable[None]],
    read_through: ReadThrough | None = None,
) -> None:
    async def main() -> None:
        async with TestClient(TestServer(make_app(index, read_through=read_through))) as client:
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


def test_a_ref_the_index_lacks_is_looked_for_on_the_api_server_before_it_is_refused() -> None:
    created_a_moment_ago = synced_index().catalog("team-a")
    listed: list[str] = []

    def api_server(namespace: str) -> list[dict[str, Any]]:
        listed.append(namespace)
        if namespace == "team-b":
            raise ConnectionError("API server unreachable")
        return [
            {
                "metadata": {"name": "datasets", "namespace": namespace},
                "spec": {"volumeConfigs": [{"id": e.volume_id, "sourceType": "S3"}]},
                "status": {"volumes": [{"id": e.volume_id, "phase": "Ready", "volumeSource": SOURCE}]},
            }
            for e in created_a_moment_ago.entries
        ]

    behind = VolumeIndex()
    behind.replace_all([])  # its watch has not delivered the new VolumeManager yet

    async def body(client: TestClient[Any, Any]) -> None:
        found = await (await client.post("/mutate", json=review({"kvc/volume": "cifar"}))).json()
        assert found["response"]["allowed"] is True
        assert found["response"]["patchType"] == "JSONPatch"
        unknown = await (await client.post("/mutate", json=review({"kvc/volume": "nope"}))).json()
        assert (
            "volume nope not found in namespace team-a; volumes there: datasets/cifar"
            in (unknown["response"]["status"]["message"])
        )
        # The API server cannot be asked: the index's answer stands, and says what it knows.
        elsewhere = review({"kvc/volume": "cifar"})
        elsewhere["request"]["namespace"] = "team-b"
        refused = await (await client.post("/mutate", json=elsewhere)).json()
        assert (
            "volume cifar not found in namespace team-b; volumes there: none"
            in (refused["response"]["status"]["message"])
        )
        # Known volumes, and objects that ask for none, never cost a list.
        listed.clear()
        behind.replace_all([api_server("team-a")[0]])
        listed.clear()
        assert (await (await client.post("/mutate", json=review({"kvc/volume": "cifar"}))).json())["response"][
            "allowed"
        ]
        assert (await (await client.post("/mutate", json=review({"other": "x"}))).json())["response"]["allowed"]
        assert listed == []
        text = await (await client.get("/metrics")).text()
        assert 'kvc_webhook_read_throughs_total{result="found"}' in text
        assert 'kvc_webhook_read_throughs_total{result="unknown"}' in text
        assert 'kvc_webhook_read_throughs_total{result="failed"}' in text

    with_client(behind, body, read_through=ReadThrough(api_server))

    without = VolumeIndex()
    without.replace_all([])

    async def refused_without(client: TestClient[Any, Any]) -> None:
        lost = await (await client.post("/mutate", json=review({"kvc/volume": "cifar"}))).json()
        assert lost["response"]["allowed"] is False

    with_client(without, refused_without)


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


# --------------------------------------------------------------------------- only the API server may ask


def _post(port: int, server_ca: bytes, client: pki.CertKeyPair | None, directory: Path, path: str) -> tuple[int, str]:
    """(status, body) of a request over TLS, with ``client``'s certificate when given."""
    context = ssl.create_default_context(cadata=server_ca.decode())
    if client is not None:
        cert, key = directory / "client.crt", directory / "client.key"
        cert.write_bytes(client.cert_pem)
        key.write_bytes(client.key_pem)
        context.load_cert_chain(cert, key)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    try:
        if path == "/mutate":
            connection.request("POST", path, body=orjson.dumps(review({"kvc/volume": "cifar"})))
        else:
            connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_only_the_api_servers_client_certificate_gets_admission_answers(tmp_path: Path) -> None:
    server_ca, clients_ca, stranger_ca = pki.new_ca("serving"), pki.new_ca("api-server-clients"), pki.new_ca("other")
    serving = pki.new_serving_cert(server_ca, ["localhost"], ["127.0.0.1"])
    files = {"tls.crt": serving.cert_pem, "tls.key": serving.key_pem, "clients.crt": clients_ca.cert_pem}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    tls = ReloadingTLS(tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "clients.crt")
    callers = Callers(required=True, names=frozenset({"kube-apiserver-webhook-client"}))
    api_server = pki.new_client_cert(clients_ca, "kube-apiserver-webhook-client")
    wrong_name = pki.new_client_cert(clients_ca, "someone-else")
    forged = pki.new_client_cert(stranger_ca, "kube-apiserver-webhook-client")

    async def main() -> None:
        runner = web.AppRunner(make_app(synced_index(), callers=callers))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.context).start()
        port = runner.addresses[0][1]
        loop = asyncio.get_running_loop()

        def ask(client: pki.CertKeyPair | None, path: str = "/mutate") -> tuple[int, str]:
            return _post(port, server_ca.cert_pem, client, tmp_path, path)

        try:
            status, body = await loop.run_in_executor(None, ask, api_server)
            assert status == 200
            assert "patch" in body
            # A pod that reaches the port, naming team-a: refused, and told nothing of team-a.
            for client in (None, wrong_name):
                status, body = await loop.run_in_executor(None, ask, client)
                assert status == 403
                for secret in ("cifar", "datasets", "team-a", "/var/lib/kvc"):
                    assert secret not in body
            # A certificate of another CA fails the handshake: with TLS 1.3 the client may learn it
            # only when it reads the answer that never comes.
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await loop.run_in_executor(None, ask, forged)
            # The kubelet's probes and Prometheus present no certificate and still get answers.
            for path in ("/healthz", "/readyz", "/metrics"):
                status, _ = await loop.run_in_executor(None, ask, None, path)
                assert status == 200, path
        finally:
            await runner.cleanup()

    run(main())


def test_without_a_client_ca_anyone_is_answered(tmp_path: Path) -> None:
    assert Callers().refusal(None) is None
    assert Callers(required=True).refusal({"subject": ((("commonName", "anyone"),),)}) is None
    assert Callers(required=True).refusal(None) is not None
    by_san = {"subject": ((("commonName", "x"),),), "subjectAltName": (("DNS", "apiserver"),)}
    assert Callers(required=True, names=frozenset({"apiserver"})).refusal(by_san) is None
