"""Connecting to the cluster, and informers: objects of one kind kept in memory by a list and a watch.

A controller that lists every Node, VolumeNode or claim on each pass does work that
grows with the cluster on every pass. An ``Informer`` lists once (in pages), then
follows a watch from that list's resourceVersion, re-listing when the watch expires,
and keeps what the controller reads of each object (a ``transform`` of it). Readers take
a ``snapshot``: a consistent copy that later events do not change.

Informers are registered by name for the process (``register``); code that reads the
cluster asks ``informer(name)`` and falls back to an API call while none is synced, so
the same code runs in the controller (with informers) and anywhere else (without).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

logger = logging.getLogger(__name__)

T = TypeVar("T")


def api_client(pool_size: int | None = None) -> Any:
    """A client for the cluster; ``pool_size`` connections may be open at once (threads that share it)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    if pool_size:
        configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


def object_key(raw: Mapping[str, Any]) -> str:
    """``namespace/name`` for namespaced objects, ``name`` for cluster-scoped ones."""
    metadata = raw.get("metadata") or {}
    namespace = metadata.get("namespace")
    return f"{namespace}/{metadata['name']}" if namespace else str(metadata["name"])


def without_managed_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The object without ``metadata.managedFields``: often its largest part, and never read here."""
    metadata = raw.get("metadata")
    if isinstance(metadata, dict):
        metadata.pop("managedFields", None)
    return raw


# --------------------------------------------------------------------------- slim objects

# Names under which the controller registers its informers.
NODES = "nodes"
VOLUMENODES = "volumenodes"
CLAIMS = "persistentvolumeclaims"
VOLUMES = "persistentvolumes"
CREDENTIALS = "secrets"  # the copies in the credentials namespace (kvc.sources._credentials)


@dataclass(frozen=True, slots=True)
class Meta:
    name: str
    namespace: str | None = None
    uid: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    deletion_timestamp: str | None = None


@dataclass(frozen=True, slots=True)
class Taint:
    key: str
    value: str | None
    effect: str


@dataclass(frozen=True, slots=True)
class NodeCondition:
    type: str
    status: str
    reason: str | None = None
    last_transition_time: str | None = None


@dataclass(frozen=True, slots=True)
class NodeSpecRecord:
    unschedulable: bool | None = None
    taints: tuple[Taint, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeStatusRecord:
    conditions: tuple[NodeCondition, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """What the controller reads of a Node, under the attribute names of the typed client's V1Node.

    A full Node (images, addresses, daemon endpoints, managed fields) is ten times larger,
    and thousands of them are kept in memory.
    """

    metadata: Meta
    spec: NodeSpecRecord
    status: NodeStatusRecord

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> NodeRecord:
        metadata, spec, status = raw.get("metadata") or {}, raw.get("spec") or {}, raw.get("status") or {}
        return cls(
            Meta(
                name=str(metadata.get("name")),
                uid=str(metadata.get("uid", "")),
                labels=dict(metadata.get("labels") or {}),
                deletion_timestamp=metadata.get("deletionTimestamp"),
            ),
            NodeSpecRecord(
                unschedulable=spec.get("unschedulable"),
                taints=tuple(
                    Taint(str(t.get("key", "")), t.get("value"), str(t.get("effect", "")))
                    for t in spec.get("taints") or []
                ),
            ),
            NodeStatusRecord(
                conditions=tuple(
                    NodeCondition(
                        str(c.get("type")), str(c.get("status")), c.get("reason"), c.get("lastTransitionTime")
                    )
                    for c in status.get("conditions") or []
                )
            ),
        )


# Why an informer is not synced: its list or watch is refused (RBAC), not merely slow.
_PERMANENT = frozenset({401, 403, 404})


@dataclass(frozen=True)
class Snapshot(Generic[T]):
    """An informer's objects at one moment, with its indexes (index -> value -> keys)."""

    items: Mapping[str, T]
    indexes: Mapping[str, Mapping[str, frozenset[str]]] = field(default_factory=dict)
    revision: int = 0

    def keys_by(self, index: str, value: str) -> frozenset[str]:
        return self.indexes.get(index, {}).get(value, frozenset())

    def by(self, index: str, value: str) -> list[T]:
        """The objects whose ``index`` yields ``value``, in key order."""
        return [self.items[key] for key in sorted(self.keys_by(index, value)) if key in self.items]


class Store(Generic[T]):
    """Objects by key, with indexes; thread-safe. The part of an informer that needs no cluster (pure)."""

    def __init__(self, indexers: Mapping[str, Callable[[T], Iterable[str]]] | None = None) -> None:
        self._indexers = dict(indexers or {})
        self._items: dict[str, T] = {}
        # Values are frozensets replaced on change, so a shallow copy is a consistent snapshot.
        self._indexes: dict[str, dict[str, frozenset[str]]] = {name: {} for name in self._indexers}
        self._lock = threading.Lock()
        self.revision = 0

    def _unindex(self, key: str, item: T) -> None:
        for name, indexer in self._indexers.items():
            index = self._indexes[name]
            for value in indexer(item):
                keys = index.get(value, frozenset()) - {key}
                if keys:
                    index[value] = keys
                else:
                    index.pop(value, None)

    def _index(self, key: str, item: T) -> None:
        for name, indexer in self._indexers.items():
            index = self._indexes[name]
            for value in indexer(item):
                index[value] = index.get(value, frozenset()) | {key}

    def put(self, key: str, item: T | None) -> T | None:
        """Set (or with None, remove) one object; returns the one it replaced.

        An object equal to the one kept (a change in what the transform dropped, such as a
        Node's heartbeat) is not a change: readers keep the same object and revision.
        """
        with self._lock:
            old = self._items.get(key)
            if item is not None and old is not None and old == item:
                return old
            if old is not None:
                del self._items[key]
                self._unindex(key, old)
            if item is not None:
                self._items[key] = item
                self._index(key, item)
            elif old is None:
                return None
            self.revision += 1
        return old

    def replace(self, items: Mapping[str, T]) -> dict[str, T]:
        """Everything at once (a fresh list); returns the objects that are gone."""
        with self._lock:
            gone = {key: item for key, item in self._items.items() if key not in items}
            self._items = dict(items)
            self._indexes = {name: {} for name in self._indexers}
            for key, item in self._items.items():
                self._index(key, item)
            self.revision += 1
        return gone

    def get(self, key: str) -> T | None:
        return self._items.get(key)

    def by(self, index: str, value: str) -> list[T]:
        """The objects whose ``index`` yields ``value``, in key order."""
        with self._lock:
            keys = sorted(self._indexes[index].get(value, frozenset()))
            return [self._items[key] for key in keys]

    def snapshot(self) -> Snapshot[T]:
        with self._lock:
            return Snapshot(
                dict(self._items), {name: dict(index) for name, index in self._indexes.items()}, self.revision
            )

    def __len__(self) -> int:
        return len(self._items)


class Informer(Store[T]):
    """One kind of object kept in memory: a paged list, then a watch from its resourceVersion.

    ``lister`` is a generated list method (e.g. ``CoreV1Api.list_node``, or
    ``partial(CustomObjectsApi.list_cluster_custom_object, group, version, plural)``).
    Responses are parsed as raw JSON: the typed client's deserialisation would cost more
    than everything else the controller does with them. ``transform`` keeps what readers
    need (None: do not keep the object). ``on_delete`` is called, on the informer's
    thread, for each object deleted, also for deletions noticed by a re-list;
    ``on_change`` with (old, new) for each object added (old None), changed or deleted
    (new None), after the store has it. Both must be quick: the watch waits for them.
    """

    def __init__(
        self,
        name: str,
        lister: Callable[..., Any],
        transform: Callable[[dict[str, Any]], T | None],
        *,
        label_selector: str | None = None,
        indexers: Mapping[str, Callable[[T], Iterable[str]]] | None = None,
        on_delete: Callable[[str, T], None] | None = None,
        on_change: Callable[[T | None, T | None], None] | None = None,
        page_size: int = 500,
        watch_seconds: int = 300,
    ) -> None:
        super().__init__(indexers)
        self.name = name
        self._lister = lister
        self._transform = transform
        self._selector = {"label_selector": label_selector} if label_selector else {}
        self._on_delete = on_delete
        self._on_change = on_change
        self._page_size = page_size
        self._watch_seconds = watch_seconds
        self._synced = threading.Event()
        self._settled = threading.Event()  # synced, or refused: no use waiting longer
        self._stopping = threading.Event()
        self._response: Any = None
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Informer[T]:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        response = self._response
        if response is not None:
            try:
                response.shutdown()  # unblocks the watch thread's read
            except Exception:  # best effort: the thread is a daemon anyway
                logger.debug("closing the %s watch", self.name, exc_info=True)
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def wait_synced(self, timeout: float) -> bool:
        """Until the first list is in (True), it was refused, or ``timeout`` passed (False)."""
        self._settled.wait(timeout)
        return self.synced

    # ------------------------------------------------------------------ list and watch
    def _run(self) -> None:
        backoff = 0.5
        version: str | None = None
        while not self._stopping.is_set():
            try:
                if version is None:
                    version = self._list()
                    self._synced.set()
                    self._settled.set()
                    self.error = None
                version = self._watch(version)
                backoff = 0.5
            except ApiException as exc:
                version = None  # list again: too old a version (410), or a refusal
                if exc.status == 410:
                    continue
                # A refused watch (RBAC) would leave what is kept stale for good: until a list
                # succeeds again, readers go to the API.
                self._synced.clear()
                self._failed(f"the Kubernetes API answered {exc.status} {exc.reason}", exc.status in _PERMANENT)
                backoff = self._pause(backoff)
            except Exception as exc:  # a broken stream or connection: retry
                if self._stopping.is_set():
                    return
                self._failed(f"{type(exc).__name__}: {exc}", permanent=False)
                backoff = self._pause(backoff)

    def _failed(self, error: str, permanent: bool) -> None:
        if error != self.error:
            logger.warning("listing/watching %s failed (retrying): %s", self.name, error)
        self.error = error
        if permanent:
            self._settled.set()

    def _pause(self, backoff: float) -> float:
        self._stopping.wait(backoff)
        return min(backoff * 2, 30.0)

    def _call(self, **kwargs: Any) -> Any:
        return self._lister(**self._selector, **kwargs, _preload_content=False)

    def _list(self) -> str:
        items: dict[str, T] = {}
        token: str | None = None
        while True:
            page = {"_continue": token} if token else {}
            response = self._call(limit=self._page_size, **page)
            data = orjson.loads(response.data)
            for raw in data.get("items") or []:
                item = self._transform(raw)
                if item is not None:
                    items[object_key(raw)] = item
            metadata = data.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                version = str(metadata.get("resourceVersion", ""))
                break
        previous = self.snapshot().items if self._on_change is not None else {}
        for key, item in self.replace(items).items():
            self._deleted(key, item)
        for key in previous.keys() | items.keys():
            if previous.get(key) != items.get(key):
                self._changed(previous.get(key), items.get(key))
        logger.info("%s: %d listed", self.name, len(items))
        return version

    def _watch(self, version: str) -> str | None:
        response = self._call(
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_seconds,
            _request_timeout=(10, self._watch_seconds + 30),
        )
        self._response = response
        try:
            for line in iter_resp_lines(response):
                if not line:
                    continue
                event = orjson.loads(line)
                kind, raw = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if raw.get("code") == 410:
                        return None  # expired: list again
                    raise RuntimeError(f"watch error: {raw.get('message')}")
                version = str((raw.get("metadata") or {}).get("resourceVersion") or version)
                if kind == "BOOKMARK":
                    continue
                self._apply(str(kind), raw)
                if self._stopping.is_set():
                    break
        finally:
            self._response = None
            response.release_conn()
        return version

    def _apply(self, kind: str, raw: dict[str, Any]) -> None:
        key = object_key(raw)
        item = None if kind == "DELETED" else self._transform(raw)
        revision = self.revision  # only this thread puts: a new revision is a change
        old = self.put(key, item)
        if item is None and old is not None:
            self._deleted(key, old)
        if self.revision != revision:
            self._changed(old, item)

    def _changed(self, old: T | None, new: T | None) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(old, new)
        except Exception:
            logger.exception("%s: handling a change failed", self.name)

    def _deleted(self, key: str, item: T) -> None:
        if self._on_delete is None:
            return
        try:
            self._on_delete(key, item)
        except Exception:
            logger.exception("%s: handling the deletion of %s failed", self.name, key)


# --------------------------------------------------------------------------- the process' informers

_informers: dict[str, Informer[Any]] = {}


def register(informer: Informer[Any]) -> None:
    _informers[informer.name] = informer


def informer(name: str) -> Informer[Any] | None:
    """The synced informer of that name, or None (read from the API instead)."""
    found = _informers.get(name)
    return found if found is not None and found.synced else None


def stop_informers() -> None:
    for running in list(_informers.values()):
        running.stop()
    _informers.clear()
