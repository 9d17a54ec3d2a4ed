"""The controller's informers: what it reads on every pass, kept in memory by watches.

Nodes and VolumeNodes (placement, labels, the agents' reports), the claims and volumes
KVC made, and its copies of credentials. With them a pass over a VolumeManager whose resources
are in place makes no API call to read, however many nodes and VolumeManagers there are.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

from kubernetes import client

from kvc import kube
from kvc.api import names
from kvc.sources import _claims, _credentials
from kvc.sources._nodelocal import ClusterView

logger = logging.getLogger(__name__)


def start(
    api: Any,
    *,
    credentials_namespace: str = names.DEFAULT_CREDENTIALS_NAMESPACE,
    timeout: float = 120.0,
    on_node_deleted: Callable[[str], None] | None = None,
    touch: Callable[[Iterable[str]], None] = lambda _uids: None,
    touch_nodes: Callable[[], None] = lambda: None,
) -> list[kube.Informer[Any]]:
    """Start and register the informers, and wait (up to ``timeout``) for their first lists.

    ``touch`` is told the VolumeManagers (uids) whose claims, PersistentVolumes or
    replicas changed, ``touch_nodes`` that a node or an agent came or went or changed:
    what the passes are built from.

    An informer that is not synced (e.g. its watch is refused) leaves its readers on the
    API; it keeps trying in the background.
    """

    def made_changed(old: Any, new: Any) -> None:
        touch({*(_claims.owner_uid(old) if old else ()), *(_claims.owner_uid(new) if new else ())})

    def volumenode_changed(old: Any, new: Any) -> None:
        touch(ClusterView.changed_owners(old, new))
        if old is None or new is None:
            touch_nodes()

    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    volumenodes = functools.partial(
        custom.list_cluster_custom_object, names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL
    )
    informers: list[kube.Informer[Any]] = [
        kube.Informer(
            kube.NODES,
            core.list_node,
            kube.NodeRecord.from_raw,
            on_delete=(lambda key, _node: on_node_deleted(key)) if on_node_deleted else None,
            on_change=lambda _old, _new: touch_nodes(),
        ),
        kube.Informer(
            kube.VOLUMENODES,
            volumenodes,
            kube.without_managed_fields,
            indexers={
                "replica": ClusterView.replica_keys,
                "owner": ClusterView.owner_uids,
                "namespace": ClusterView.owner_namespaces,
            },
            on_change=volumenode_changed,
        ),
        kube.Informer(
            kube.CLAIMS,
            core.list_persistent_volume_claim_for_all_namespaces,
            _claims.ClaimRecord.from_raw,
            label_selector=_claims.SELECTOR,
            indexers={"owner": _claims.owner_uid},
            on_change=made_changed,
        ),
        kube.Informer(
            kube.VOLUMES,
            core.list_persistent_volume,
            _claims.VolumeRecord.from_raw,
            label_selector=_claims.SELECTOR,
            indexers={"owner": _claims.owner_uid},
            on_change=made_changed,
        ),
        # The copies of credentials, metadata only (their data is never kept in memory).
        kube.Informer(
            kube.CREDENTIALS,
            functools.partial(core.list_namespaced_secret, credentials_namespace),
            _credentials.CopyRecord.from_raw,
            label_selector=_credentials.SELECTOR,
            indexers={"owner": _credentials.owner_uid},
        ),
    ]
    for informer in informers:
        kube.register(informer)
        informer.start()
    for informer in informers:
        if not informer.wait_synced(timeout):
            logger.warning("%s not listed yet (%s): reading them from the API meanwhile", informer.name, informer.error)
    return informers
