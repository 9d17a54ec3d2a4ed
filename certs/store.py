"""Where the webhook's TLS material lives in the cluster, read and written.

- Secret ``kvc-webhook-tls`` (type kubernetes.io/tls), mounted by the webhook: ``tls.crt``,
  ``tls.key`` and ``ca.crt`` (the trusted bundle).
- Secret ``kvc-webhook-ca``: the signing CA's ``ca.crt`` and ``ca.key``, read only by
  ``kvc certs``; its annotation records when that CA was rolled in.
- ``caBundle`` of every hook of the MutatingWebhookConfiguration: the trusted bundle.

Writes carry the resourceVersion that was read, so two concurrent runs cannot both win.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from kubernetes import client
from kubernetes.client.rest import ApiException

from certs import pki
from certs.rotation import Step, TLSState

logger = logging.getLogger(__name__)

ROLLED_AT = "kvc.kubeflow.org/ca-rolled-at"
LABELS = {
    "app.kubernetes.io/name": "kvc",
    "app.kubernetes.io/part-of": "kvc",
    "app.kubernetes.io/component": "webhook-certificates",
    "app.kubernetes.io/managed-by": "kvc-certs",
}


class StoreError(RuntimeError):
    """The cluster's TLS objects cannot be read or written; the message says what to do."""


@dataclass(frozen=True)
class Location:
    namespace: str = "kvc-system"
    tls_secret: str = "kvc-webhook-tls"  # noqa: S105 - a Secret's name, not a password
    ca_secret: str = "kvc-webhook-ca"  # noqa: S105
    webhook_config: str = "kvc-webhook"  # "" when no MutatingWebhookConfiguration is managed


def _data(secret: Any, key: str) -> bytes:
    value = (secret.data or {}).get(key)
    return base64.b64decode(value) if value else b""


def _read_secret(core: Any, location: Location, name: str) -> Any:
    try:
        return core.read_namespaced_secret(name, location.namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise StoreError(f"cannot read Secret {location.namespace}/{name}: {exc.reason}") from exc


def read_state(api: Any, location: Location) -> tuple[TLSState, dict[str, str | None]]:
    """The stored state, and the resourceVersion of each Secret (None when absent)."""
    core = client.CoreV1Api(api)
    ca_secret = _read_secret(core, location, location.ca_secret)
    tls_secret = _read_secret(core, location, location.tls_secret)
    versions = {
        name: (secret.metadata.resource_version if secret is not None else None)
        for name, secret in ((location.ca_secret, ca_secret), (location.tls_secret, tls_secret))
    }
    ca = rolled_at = serving = None
    if ca_secret is not None:
        cert, key = _data(ca_secret, "ca.crt"), _data(ca_secret, "ca.key")
        if not cert or not key:
            raise StoreError(
                f"Secret {location.namespace}/{location.ca_secret} lacks ca.crt or ca.key: "
                "delete it and run `kvc certs install` to start over with a new CA"
            )
        ca = pki.CertKeyPair(cert, key)
        stamp = (ca_secret.metadata.annotations or {}).get(ROLLED_AT)
        rolled_at = dt.datetime.fromisoformat(stamp) if stamp else None
    bundle: tuple[bytes, ...] = ()
    if tls_secret is not None:
        cert, key = _data(tls_secret, "tls.crt"), _data(tls_secret, "tls.key")
        serving = pki.CertKeyPair(cert, key) if cert and key else None
        bundle = tuple(
            c.public_bytes(serialization.Encoding.PEM) for c in pki.load_certificates(_data(tls_secret, "ca.crt"))
        )
    return TLSState(ca=ca, bundle=bundle, serving=serving, rolled_at=rolled_at), versions


def webhook_bundle(api: Any, location: Location) -> bytes | None:
    """The caBundle the API server uses (of the first hook), or None without a configuration."""
    if not location.webhook_config:
        return None
    config = _read_config(api, location)
    hooks = config.webhooks or []
    return base64.b64decode(hooks[0].client_config.ca_bundle or "") if hooks else b""


def _read_config(api: Any, location: Location) -> Any:
    try:
        return client.AdmissionregistrationV1Api(api).read_mutating_webhook_configuration(location.webhook_config)
    except ApiException as exc:
        if exc.status == 404:
            raise StoreError(
                f"MutatingWebhookConfiguration {location.webhook_config} not found: apply deploy/default first "
                "(or pass --webhook-config '' to write only the Secrets)"
            ) from exc
        raise StoreError(f"cannot read MutatingWebhookConfiguration {location.webhook_config}: {exc.reason}") from exc


def _patch_bundle(api: Any, location: Location, bundle: bytes) -> None:
    config = _read_config(api, location)
    encoded = base64.b64encode(bundle).decode()
    hooks = [{"name": hook.name, "clientConfig": {"caBundle": encoded}} for hook in config.webhooks or []]
    # A strategic merge patch: hooks are merged by name, nothing else is touched.
    client.AdmissionregistrationV1Api(api).patch_mutating_webhook_configuration(
        location.webhook_config, {"metadata": {"resourceVersion": config.metadata.resource_version}, "webhooks": hooks}
    )


def _write_secret(api: Any, location: Location, name: str, body: dict[str, Any], resource_version: str | None) -> str:
    core = client.CoreV1Api(api)
    body["metadata"] = {**body.get("metadata", {}), "name": name, "namespace": location.namespace, "labels": LABELS}
    try:
        if resource_version is None:
            created = core.create_namespaced_secret(location.namespace, body)
        else:
            body["metadata"]["resourceVersion"] = resource_version
            created = core.replace_namespaced_secret(name, location.namespace, body)
    except ApiException as exc:
        if exc.status == 409:
            raise StoreError(
                f"Secret {location.namespace}/{name} was changed by someone else meanwhile: run the command again"
            ) from exc
        if exc.status == 404:
            raise StoreError(f"namespace {location.namespace} not found: create it (deploy/default does)") from exc
        raise StoreError(f"cannot write Secret {location.namespace}/{name}: {exc.reason}") from exc
    # Which keys, never their values (a CA's private key among them).
    logger.debug("wrote Secret %s/%s (keys %s)", location.namespace, name, ", ".join(sorted(body.get("data") or {})))
    return str(created.metadata.resource_version)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def publish(api: Any, location: Location, step: Step, versions: dict[str, str | None]) -> None:
    """Write one step: the bundle to the API server first, then the Secrets."""
    state = step.state
    if step.bundle_changed and location.webhook_config:
        _patch_bundle(api, location, state.bundle_pem)
    if step.ca_changed and state.ca is not None:
        annotations = {ROLLED_AT: state.rolled_at.isoformat()} if state.rolled_at else {}
        versions[location.ca_secret] = _write_secret(
            api,
            location,
            location.ca_secret,
            {
                "type": "Opaque",
                "metadata": {"annotations": annotations},
                "data": {"ca.crt": _b64(state.ca.cert_pem), "ca.key": _b64(state.ca.key_pem)},
            },
            versions.get(location.ca_secret),
        )
    if state.serving is not None and (step.serving_changed or step.bundle_changed):
        versions[location.tls_secret] = _write_secret(
            api,
            location,
            location.tls_secret,
            {
                "type": "kubernetes.io/tls",
                "data": {
                    "tls.crt": _b64(state.serving.cert_pem),
                    "tls.key": _b64(state.serving.key_pem),
                    "ca.crt": _b64(state.bundle_pem),
                },
            },
            versions.get(location.tls_secret),
        )
