"""`kvc certs` against the real API server: the installed certificates serve admissions,
and rotations (serving certificate, then a new CA) fail no admission."""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from kubernetes import client
from kubernetes.client.rest import ApiException

from certs import pki
from e2e.cluster import ControlPlane, free_port
from e2e.helpers import restricted_pod, wait_for
from e2e.kvc import WEBHOOK_MANIFEST, KvcWebhook

PROBE = restricted_pod("probe", {"kvc/volume": "probe"})
REACHED = "KVC: volume probe not found"  # the webhook answered: the TLS handshake worked


def kvc_certs(plane: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvc", "certs", *args],
        env={**os.environ, "KUBECONFIG": str(plane.kubeconfig)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@dataclass
class Kubelet:
    """Copies the TLS Secret into the webhook's files, as the kubelet refreshes a mounted Secret."""

    core: Any
    namespace: str
    cert_file: Path
    key_file: Path
    stop: threading.Event = field(default_factory=threading.Event)

    def sync(self) -> None:
        data = self.core.read_namespaced_secret("kvc-webhook-tls", self.namespace).data
        for path, key in ((self.key_file, "tls.key"), (self.cert_file, "tls.crt")):
            content = base64.b64decode(data[key])
            if not path.exists() or path.read_bytes() != content:
                staged = path.with_suffix(".new")
                staged.write_bytes(content)
                staged.replace(path)  # atomic, like the kubelet's symlink swap

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.sync()


@dataclass
class Load:
    """Annotated pods created (dry run) at a steady rate; every answer that is not the
    webhook's own denial is a failed admission."""

    core: Any
    namespace: str
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                self.core.create_namespaced_pod(self.namespace, PROBE, dry_run="All")
                self.failures.append("admitted without the webhook")
            except ApiException as exc:
                message = str(json.loads(exc.body).get("message"))
                if REACHED in message:
                    self.answered += 1
                else:
                    self.failures.append(message)


def served_certificate(port: int) -> x509.Certificate:
    """What a new TLS connection to the webhook is shown (not verified: only compared)."""
    return x509.load_pem_x509_certificate(ssl.get_server_certificate(("127.0.0.1", port)).encode())


@pytest.fixture
def registration(api: Any, namespace: str) -> Iterator[tuple[str, int]]:
    """deploy/webhook's configuration, without caBundle, aimed at a local port, for one namespace."""
    manifest = yaml.safe_load(WEBHOOK_MANIFEST.read_text())
    name = f"kvc-webhook-{namespace}"
    manifest["metadata"]["name"] = name
    port = free_port()
    for hook in manifest["webhooks"]:
        hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}/mutate"}
        hook["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    admission = client.AdmissionregistrationV1Api(api)
    admission.create_mutating_webhook_configuration(manifest)
    yield name, port
    admission.delete_mutating_webhook_configuration(name)


def test_installed_certificates_serve_admissions_and_rotations_fail_none(
    control_plane: ControlPlane, api: Any, namespace: str, kvc_crds: None, registration: tuple[str, int]
) -> None:
    config, port = registration
    where = ["-n", namespace, "--webhook-config", config, "--ip", "127.0.0.1"]
    wait = ["--propagation-wait", "2s"]
    installed = kvc_certs(control_plane, "install", *where, *wait)
    assert installed.returncode == 0, installed.stderr
    assert "new CA: there is no CA" in installed.stdout
    assert "new serving certificate: there is no serving certificate" in installed.stdout

    core = client.CoreV1Api(api)
    webhook = KvcWebhook(control_plane, name="kvc-webhook-certs")
    webhook.port = port
    kubelet = Kubelet(core, namespace, webhook.cert_file, webhook.key_file)
    kubelet.sync()
    webhook.start()
    load = Load(core, namespace)
    threads = [threading.Thread(target=t.run, daemon=True) for t in (kubelet, load)]
    try:
        wait_for(lambda: kvc_probe(core, namespace), what="the API server to call the webhook with the installed CA")
        versions = {s: core.read_namespaced_secret(s, namespace).metadata.resource_version for s in SECRETS}
        again = kvc_certs(control_plane, "install", *where, *wait)
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == "nothing to do: the certificates are valid"
        assert versions == {s: core.read_namespaced_secret(s, namespace).metadata.resource_version for s in SECRETS}
        shown = kvc_certs(control_plane, "show", *where)
        assert shown.returncode == 0, shown.stderr
        assert (
            f"SANs: kvc-webhook, kvc-webhook.{namespace}, kvc-webhook.{namespace}.svc, "
            f"kvc-webhook.{namespace}.svc.cluster.local, 127.0.0.1" in shown.stdout
        )
        assert f"caBundle of {config}: matches the Secret" in shown.stdout

        for thread in threads:
            thread.start()
        time.sleep(2)
        renewed = kvc_certs(control_plane, "rotate", *where, *wait, "--force")
        assert "new serving certificate: asked for (--force)" in renewed.stdout, renewed.stderr
        wait_for(lambda: served_is_stored(core, namespace, port), timeout=30, what="the renewed certificate served")
        old_bundle = pki.load_certificates(secret_bytes(core, namespace, "ca.crt"))

        rolled = kvc_certs(control_plane, "rotate", *where, *wait, "--ca")
        assert "new CA: asked for (--ca)" in rolled.stdout, rolled.stderr
        assert len(pki.load_certificates(secret_bytes(core, namespace, "ca.crt"))) == 2
        wait_for(lambda: served_is_stored(core, namespace, port), timeout=30, what="the new CA's certificate served")

        pruned = kvc_certs(control_plane, "rotate", *where, *wait, "--overlap", "0s")
        assert "leaves the bundle (overlap over)" in pruned.stdout, pruned.stderr
        (only,) = pki.load_certificates(secret_bytes(core, namespace, "ca.crt"))
        assert only not in old_bundle
        time.sleep(3)  # admissions keep working with the old CA gone
    finally:
        load.stop.set()
        kubelet.stop.set()
        # The last admission in flight must be answered before the webhook goes: stopping it
        # under a request reset that request (seen once in CI), which is not a rotation's fault.
        for thread in threads:
            if thread.is_alive():
                thread.join(timeout=15)
        webhook.stop()
    print(f"\nrotation under load: {load.answered} admissions answered, {len(load.failures)} failed")
    assert load.failures == []
    assert load.answered >= 100


SECRETS = ("kvc-webhook-tls", "kvc-webhook-ca")


def kvc_probe(core: Any, namespace: str) -> bool:
    try:
        core.create_namespaced_pod(namespace, PROBE, dry_run="All")
    except ApiException as exc:
        return REACHED in str(exc.body)
    return False


def secret_bytes(core: Any, namespace: str, key: str) -> bytes:
    return base64.b64decode(core.read_namespaced_secret("kvc-webhook-tls", namespace).data[key])


def served_is_stored(core: Any, namespace: str, port: int) -> bool:
    stored = x509.load_pem_x509_certificate(secret_bytes(core, namespace, "tls.crt"))
    return served_certificate(port) == stored


def test_certs_commands_fail_with_one_clear_line(control_plane: ControlPlane, namespace: str) -> None:
    missing = kvc_certs(control_plane, "install", "-n", namespace, "--webhook-config", "no-such-config")
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        "Error: MutatingWebhookConfiguration no-such-config not found: apply deploy/default first "
        "(or pass --webhook-config '' to write only the Secrets)"
    )
    bad = kvc_certs(control_plane, "rotate", "-n", namespace, "--overlap", "a day")
    assert bad.returncode == 2
    assert "'a day' is not a Go duration" in bad.stderr
    no_namespace = kvc_certs(control_plane, "install", "-n", "no-such-namespace", "--webhook-config", "")
    assert no_namespace.returncode == 1
    assert "namespace no-such-namespace not found" in no_namespace.stderr
