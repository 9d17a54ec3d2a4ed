from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs import pki


@pytest.fixture(scope="module")
def ca() -> pki.CertKeyPair:
    return pki.new_ca("test-ca")


def test_ca_is_a_p256_ca_limited_to_leaf_certificates(ca: pki.CertKeyPair) -> None:
    cert = ca.certificate
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is True
    assert constraints.path_length == 0
    assert isinstance(ca.private_key.curve, ec.SECP256R1)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test-ca"


def test_serving_cert_carries_every_san_and_chains_to_the_ca(ca: pki.CertKeyPair) -> None:
    names = pki.service_dns_names("kvc-webhook", "kvc-system")
    leaf = pki.new_serving_cert(ca, names, ["127.0.0.1"])
    cert = leaf.certificate
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [
        "kvc-webhook",
        "kvc-webhook.kvc-system",
        "kvc-webhook.kvc-system.svc",
        "kvc-webhook.kvc-system.svc.cluster.local",
    ]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    cert.verify_directly_issued_by(ca.certificate)


def test_serving_cert_is_accepted_by_a_real_tls_handshake(ca: pki.CertKeyPair, tmp_path: Path) -> None:
    leaf = pki.new_serving_cert(ca, ["localhost"], ["127.0.0.1"])
    (tmp_path / "tls.crt").write_bytes(leaf.cert_pem)
    (tmp_path / "tls.key").write_bytes(leaf.key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"ok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.recv(2) == b"ok"
    thread.join(5)
    listener.close()


def test_a_certificate_from_another_ca_with_the_same_name_is_refused(ca: pki.CertKeyPair) -> None:
    impostor = pki.new_serving_cert(pki.new_ca("test-ca"), ["localhost"])
    with pytest.raises(InvalidSignature):
        impostor.certificate.verify_directly_issued_by(ca.certificate)


def test_client_cert_has_user_and_groups_for_kubernetes(ca: pki.CertKeyPair) -> None:
    cert = pki.new_client_cert(ca, "alice", ("system:masters", "team-a")).certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == [
        "system:masters",
        "team-a",
    ]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_leaf_validity_is_configurable_and_capped_by_the_ca() -> None:
    short_ca = pki.new_ca("short", validity=dt.timedelta(days=10))
    leaf = pki.new_serving_cert(short_ca, ["x"], validity=dt.timedelta(days=365)).certificate
    assert leaf.not_valid_after_utc <= short_ca.certificate.not_valid_after_utc
    hour = pki.new_serving_cert(short_ca, ["x"], validity=dt.timedelta(hours=1)).certificate
    remaining = hour.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=55) < remaining <= dt.timedelta(hours=1)


def test_serving_cert_needs_a_name(ca: pki.CertKeyPair) -> None:
    with pytest.raises(ValueError, match="at least one DNS name or IP"):
        pki.new_serving_cert(ca, [])


def test_signing_key_pair_matches() -> None:
    private_pem, public_pem = pki.new_signing_key()
    private = serialization.load_pem_private_key(private_pem, password=None)
    assert (
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        == public_pem
    )
