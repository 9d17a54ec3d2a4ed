"""VolumeManager statuses in memory, fed by a watch: admission never calls the API server.

A background thread lists every VolumeManager, then follows a watch from that list's
resourceVersion, and lists again whenever the watch breaks (API server restart, expired
resourceVersion). ``synced`` turns true after the first complete list: until then the
webhook is not ready.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kubernetes import client, watch
from prometheus_client import Counter, Gauge

from kvc.api import names
from kvc.sources.registry import SourceRegistry
from kvc.wiring.resolve import Catalog, CatalogEntry, catalog_entries

logger = logging.getLogger(__name__)

# With several workers (webhook.workers), each holds an index: /metrics shows the smallest
# among the live ones, so the number is what every worker can resolve.
INDEXED = Gauge(
    "kvc_webhook_indexed_volumemanagers",
    "VolumeManagers held in the admission index",
    multiprocess_mode="livemin",
)
READ_THROUGHS = Counter(
    "kvc_webhook_read_throughs_total",
    "Namespaces listed from the API server for a volume the index did not hold, by what the list found",
    ["result"],
)


class VolumeIndex:
    def __init__(self, *, host_path: bool = False, registry: SourceRegistry | None = None) -> None:
        # Wire node-local data as a hostPath rather than its claim; name the claims of volumes
        # the controller has not reported from their spec (kvc.wiring.resolve.catalog_entries).
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

    def entries_of(self, volumemanager: Mapping[str, Any]) -> list[CatalogEntry]:
        """A VolumeManager's volumes as this index wires them (hostPath or claim, names from specs)."""
        return catalog_entries(volumemanager, host_path=self.host_path, registry=self.registry)

    def replace_all(self, volumemanagers: Iterable[Mapping[str, Any]]) -> None:
        fresh: dict[str, dict[str, list[CatalogEntry]]] = {}
        for obj in volumemanagers:
            metadata = obj.get("metadata") or {}
            fresh.setdefault(str(metadata.get("namespace")), {})[str(metadata.get("name"))] = self.entries_of(obj)
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
                managers[name] = self.entries_of(obj)
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


class ReadThrough:
    """A namespace's VolumeManagers listed from the API server, for a ref the index lacks.

    The index follows a watch, so a VolumeManager created a moment ago (one ``kubectl apply``
    of a file holding it and its pods) may not be in it yet: refusing its pods as unknown
    would lose them, since neither bare pods nor training operators retry a refusal. The list
    answers from the API server's current state. Lists are never merged into the index (the
    watch stays its only writer, so a deletion it has seen cannot be undone by an older list).

    One list per namespace runs at a time. A request arriving while one is in flight shares
    the next list, which starts once that one ends: it began after the request arrived, so it
    sees whatever was created before the request; a flood of unknown refs in one namespace
    costs at most one list in flight and one waiting.
    """

    def __init__(
        self, list_namespace: Callable[[str], Iterable[Mapping[str, Any]]], index: VolumeIndex | None = None
    ) -> None:
        """``index``: whose settings the listed volumes are read with (hostPath or claims)."""
        self._list_namespace = list_namespace
        self._index = index or VolumeIndex()
        self._in_flight: dict[str, asyncio.Task[Catalog]] = {}
        self._next: dict[str, asyncio.Task[Catalog]] = {}
        # Its own threads: lists for many namespaces at once wait here, not in the loop's
        # default executor, which aiohttp also uses.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="read-through")

    async def catalog(self, namespace: str) -> Catalog:
        """The namespace's volumes as the API server has them now; raises when it cannot be read."""
        task = self._next.get(namespace)
        if task is None:
            current = self._in_flight.get(namespace)
            if current is None:
                task = self._start(namespace)
            else:
                task = asyncio.ensure_future(self._after(namespace, current))
                self._next[namespace] = task
        # Shielded: a request that gives up (its client went away) never cancels a shared list.
        return await asyncio.shield(task)

    def _start(self, namespace: str) -> asyncio.Task[Catalog]:
        task = asyncio.ensure_future(self._list(namespace))
        self._in_flight[namespace] = task

        def done(finished: asyncio.Task[Catalog]) -> None:
            if self._in_flight.get(namespace) is finished:
                del self._in_flight[namespace]
            if not finished.cancelled() and finished.exception() is not None:
                READ_THROUGHS.labels("failed").inc()

        task.add_done_callback(done)
        return task

    async def _after(self, namespace: str, current: asyncio.Task[Catalog]) -> Catalog:
        await asyncio.wait([current])  # returns once it has ended, failed or not
        del self._next[namespace]
        return await self._start(namespace)

    async def _list(self, namespace: str) -> Catalog:
        listed = await asyncio.get_running_loop().run_in_executor(self._executor, self._list_namespace, namespace)
        return Catalog(entry for obj in listed for entry in self._index.entries_of(obj))


def namespace_lister(api_client: Any, timeout: float = 2.0) -> Callable[[str], list[Mapping[str, Any]]]:
    """What ReadThrough lists with: the namespace's VolumeManagers, within ``timeout`` seconds
    (a request may wait for one list before its own: both fit in the API server's 5 s wait
    for the webhook)."""
    custom = client.CustomObjectsApi(api_client)

    def list_namespace(namespace: str) -> list[Mapping[str, Any]]:
        listed = custom.list_namespaced_custom_object(
            names.GROUP, names.VERSION, namespace, names.VOLUMEMANAGER_PLURAL, _request_timeout=timeout
        )
        items: list[Mapping[str, Any]] = listed.get("items") or []
        return items

    return list_namespace
