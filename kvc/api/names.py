"""Names shared by every KVC component: API group, resources, labels, annotations.

Kubernetes limits names and label values (63 characters for a label value or a DNS
label); ``bounded_name`` keeps any combination of namespace, name and id valid by
truncating and appending a hash of the whole, so distinct inputs never collide.
"""

from __future__ import annotations

import hashlib
import re

GROUP = "kvc.kubeflow.org"
VERSION = "v1"
API_VERSION = f"{GROUP}/{VERSION}"

VOLUMEMANAGER_KIND = "VolumeManager"
VOLUMEMANAGER_PLURAL = "volumemanagers"
VOLUMENODE_KIND = "VolumeNode"
VOLUMENODE_PLURAL = "volumenodes"

FINALIZER = f"{GROUP}/cleanup"

# Labels on everything KVC creates: who manages it and which volume it belongs to.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "kvc"
LABEL_VOLUMEMANAGER = f"{GROUP}/volumemanager"
LABEL_VOLUMEMANAGER_NAMESPACE = f"{GROUP}/volumemanager-namespace"
LABEL_VOLUMEMANAGER_UID = f"{GROUP}/volumemanager-uid"
LABEL_VOLUME_ID = f"{GROUP}/volume-id"
LABEL_SOURCE_HASH = f"{GROUP}/source-hash"

# On a claim KVC made: when its PersistentVolume was created (made after the claim, bound
# to its uid). Writing it is also what makes kube-controller-manager bind them at once.
ANNOTATION_VOLUME_CREATED = f"{GROUP}/volume-created"

# Scheduling gate the webhook puts on pods whose data is still being provisioned, and the
# label that lets the controller find those pods; both are removed once the data is usable.
SCHEDULING_GATE = f"{GROUP}/data-ready"
LABEL_GATED = f"{GROUP}/gated"

# KVC's namespace for the copies of the Secrets that replicas need (never kvc-system, which
# holds the webhook's CA): the only Secrets the agents may read.
DEFAULT_CREDENTIALS_NAMESPACE = "kvc-credentials"

# KVC's own namespace in deploy/ (the controller and the webhook run there).
KVC_NAMESPACE = "kvc-system"
# The Lease the controller renews while it runs, in its own namespace (kvc/controller/lease.py):
# `kvc status` reads it to tell whether the controller is alive and how often it restarted.
CONTROLLER_LEASE = "kvc-controller"
# Seconds after its last renewal that the controller's Lease counts as stale.
CONTROLLER_LEASE_SECONDS = 30

# A StorageClass name no provisioner serves: KVC's PVs bind only to KVC's claims.
NFS_STORAGE_CLASS = "kvc-static-nfs"
# The same for the `local` PVs through which workloads mount node-local replicas.
NODE_LOCAL_STORAGE_CLASS = "kvc-node-local"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def short_hash(*parts: str, length: int = 10) -> str:
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
    return digest[:length]


def bounded_name(*parts: str, max_length: int = 63) -> str:
    """Join ``parts`` with '-' into a DNS label of at most ``max_length`` characters.

    Names that fit are returned as they are; longer ones are cut and end with a hash of
    the full name, so two different inputs never map to the same name.
    """
    name = "-".join(part.strip("-") for part in parts if part)
    name = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if len(name) <= max_length and _DNS_LABEL.match(name):
        return name
    suffix = short_hash(*parts, length=10)
    head = name[: max_length - len(suffix) - 1].rstrip("-")
    return f"{head}-{suffix}" if head else suffix


def is_dns_label(value: str) -> bool:
    return len(value) <= 63 and bool(_DNS_LABEL.match(value))
