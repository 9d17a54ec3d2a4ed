"""VolumeManager statuses in memory, fed by a watch: admission never calls the API server.

A background thread lists every VolumeManager, then follows a watch from that list's
resourceVersion, and lists again whenever the watch breaks (API server restart, expired
resourceVersion). ``synced`` turns true after the first complete list: until then the
webhook is not ready.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes import client, watch
from prometheus_client import Gauge

from kvc.api import names
from kvc.sources.registry import SourceRegistry
from webhook.resolve import Catalog, CatalogEntry, catalog_entries

logger = logging.getLogger(__name__)

# With several workers (webhook.workers), each holds an index: /metrics shows the smallest
# among the live ones, so the number is what every worker can resolve.
INDEXED = Gauge(
    "kvc_webhook_indexed_volumemanagers",
    "VolumeManagers held in the admission index",
    multiprocess_mode="livemin",
)


class VolumeIndex:
    def __init__(self, *, host_path: bool = False, registry: SourceRegistry | None = None) -> None:
        # Wire node-local data as a hostPath rather than its claim; name the claims of volumes
        # the controller has not reported from their spec (webhook.resolve.catalog_entries).
        self.host_path = host_path
        self.registry = registry
        self._lock = threading.Lock()
        self._by_namespace: dict[str, dict[str, list[CatalogEntry]]] = {}
        # Built on first use after a change in the namespace: admissions far outnumber changes.
        self._catalogs: dict[str, Catalog] = {}
        self.synced = threading.Event()

    def catalog(self, namespace: str) -> Catalog:
        with self._lock:
            catalog = self._catalogs.get(namespace)
            if catalog is None:
                managers = self._by_namespace.get(namespace, {})
                catalog = Catalog(entry for entries in managers.values() for entry in entries)
                self._catalogs[namespace] = catalog
            return catalog

    def entries(self, namespace: str) -> Iterable[CatalogEntry]:
        return self.catalog(namespace).entries

    def replace_all(self, volumemanagers: Iterable[Mapping[str, Any]]) -> None:
        fresh: dict[str, dict[str, list[CatalogEntry]]] = {}
        for obj in volumemanagers:
            metadata = obj.get("metadata") or {}
            fresh.setdefault(str(metadata.get("namespace")), {})[str(metadata.get("name"))] = catalog_entries(
                obj, host_path=self.host_path, registry=self.registry
            )
        with self._lock:
            self._by_namespace = fresh
            self._catalogs = {}
        INDEXED.set(sum(len(managers) for managers in fresh.values()))
        self.synced.set()

    def apply(self, event_type: str, obj: Mapping[str, Any]) -> None:
        metadata = obj.get("metadata") or {}
        namespace, name = str(metadata.get("namespace")), str(metadata.get("name"))
        with self._lock:
            self._catalogs.pop(namespace, None)
            managers = self._by_namespace.setdefault(namespace, {})
            if event_type == "DELETED":
                managers.pop(name, None)
            else:
                managers[name] = catalog_entries(obj, host_path=self.host_path, registry=self.registry)
            INDEXED.set(sum(len(managers) for managers in self._by_namespace.values()))


def follow(index: VolumeIndex, api_client: Any, stop: threading.Event) -> None:
    """List, then watch, VolumeManagers in every namespace until ``stop`` (runs in a thread)."""
    custom = client.CustomObjectsApi(api_client)
    group, version, plural = names.GROUP, names.VERSION, names.VOLUMEMANAGER_PLURAL
    while not stop.is_set():
        try:
            listed = custom.list_cluster_custom_object(group, version, plural)
            index.replace_all(listed.get("items", []))
            version_seen = (listed.get("metadata") or {}).get("resourceVersion")
            for event in watch.Watch().stream(
                custom.list_cluster_custom_object,
                group,
                version,
                plural,
                resource_version=version_seen,
                timeout_seconds=300,
                allow_watch_bookmarks=True,
            ):
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    index.apply(event["type"], event["object"])
                if stop.is_set():
                    return
        except Exception as exc:  # the watch breaks on API server restarts and expiries: list again
            logger.warning("VolumeManager watch ended (%s); listing again", type(exc).__name__)
            stop.wait(1.0)
