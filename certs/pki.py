"""Pure certificate building: a CA, serving and client certificates, signing keys.

Everything here returns PEM bytes and touches neither files nor the cluster, so the
webhook installer, the local control plane and the tests share one implementation.
Keys are ECDSA P-256: small, fast, and accepted by every Kubernetes component.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_CA_VALIDITY = _dt.timedelta(days=3650)
DEFAULT_LEAF_VALIDITY = _dt.timedelta(days=365)
# Backdate notBefore so a peer whose clock is slightly behind accepts a fresh certificate.
_CLOCK_SKEW = _dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertKeyPair:
    """A certificate and its private key, both PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError("expected an ECDSA private key")
        return key


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str, organizations: tuple[str, ...] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def new_ca(
    common_name: str = "kvc-ca", validity: _dt.timedelta = DEFAULT_CA_VALIDITY, now: _dt.datetime | None = None
) -> CertKeyPair:
    """A self-signed CA that may sign leaf certificates only (path length 0), valid from ``now``."""
    key = _new_key()
    name = _name(common_name)
    now = now or _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertKeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _leaf(
    ca: CertKeyPair,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    validity: _dt.timedelta,
    sans: list[x509.GeneralName],
    *,
    now: _dt.datetime | None = None,
) -> CertKeyPair:
    key = _new_key()
    ca_cert = ca.certificate
    now = now or _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(min(now + validity, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca.private_key, hashes.SHA256())
    return CertKeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def new_serving_cert(
    ca: CertKeyPair,
    dns_names: list[str],
    ip_addresses: list[str] = [],  # noqa: B006 - never mutated
    validity: _dt.timedelta = DEFAULT_LEAF_VALIDITY,
    now: _dt.datetime | None = None,
) -> CertKeyPair:
    """A TLS server certificate for the given DNS names and IP addresses, signed by ``ca``."""
    if not dns_names and not ip_addresses:
        raise ValueError("a serving certificate needs at least one DNS name or IP address")
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    common_name = dns_names[0] if dns_names else ip_addresses[0]
    return _leaf(ca, _name(common_name), ExtendedKeyUsageOID.SERVER_AUTH, validity, sans, now=now)


def new_client_cert(
    ca: CertKeyPair,
    common_name: str,
    organizations: tuple[str, ...] = (),
    validity: _dt.timedelta = DEFAULT_LEAF_VALIDITY,
) -> CertKeyPair:
    """A TLS client certificate; Kubernetes reads CN as the user and O as the groups."""
    return _leaf(ca, _name(common_name, organizations), ExtendedKeyUsageOID.CLIENT_AUTH, validity, [])


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names a client may use for an in-cluster Service."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def new_signing_key() -> tuple[bytes, bytes]:
    """A private/public key pair in PEM, e.g. for signing ServiceAccount tokens."""
    key = _new_key()
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _key_pem(key), public


def load_certificates(pem: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle (a caBundle may hold several CAs)."""
    return x509.load_pem_x509_certificates(pem) if pem.strip() else []


def is_signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca``'s key signed ``cert`` (the issuer name alone proves nothing)."""
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def subject_alt_names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) of a certificate."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return sans.get_values_for_type(x509.DNSName), [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]


def fingerprint(cert: x509.Certificate) -> str:
    """A short SHA-256 fingerprint to tell certificates apart in messages."""
    return cert.fingerprint(hashes.SHA256()).hex()[:16]
