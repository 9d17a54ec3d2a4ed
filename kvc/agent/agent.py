"""The node agent: holds the replicas its node is assigned, and reports on them.

It watches only its own VolumeNode (named after the node), fetches each assigned replica
into the node's data root with the replica's source type, verifies it, reports
per-replica progress, disk and a heartbeat in the VolumeNode's status, re-fetches data
that was removed or damaged, and deletes data that is no longer assigned.

Node paths in the VolumeNode (``/var/lib/kvc/...``) are mapped onto ``data_root``, so
several simulated nodes can share one machine without sharing data.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import shutil
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import urllib3
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from kvc import __version__, defaults, logs, metrics
from kvc.agent.files import MAX_OBJECTS, Limits, Manifest, ReplicaDir
from kvc.api import names
from kvc.api.units import parse_quantity
from kvc.sources._egress import EgressPolicy
from kvc.sources.base import FetchRequest, Source
from kvc.sources.registry import SourceRegistry, load_registry
from kvc.sources.transfer import FetchError, Progress

logger = logging.getLogger(__name__)

STATE_FILE = ".kvc-agent-state.json"
RETRY_BASE_SECONDS = 5.0
RETRY_MAX_SECONDS = 300.0
# A replica's message in the VolumeNode status is cut to this many characters: error texts
# come from sources (a server's answer, a key name) and the status shares one etcd object
# with every replica of the node.
MAX_MESSAGE_CHARS = 512
# Free disk the agent leaves on its node's file system: it stops writing under it (--min-free-disk).
DEFAULT_MIN_FREE_DISK = 1 << 30
# What a call to an API server that is down or restarting raises (besides 5xx ApiExceptions).
UNREACHABLE = (urllib3.exceptions.HTTPError, OSError)


def _bounded(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "…"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Replica:
    name: str
    spec: dict[str, Any]
    local: Path
    phase: str = "Pending"
    message: str = "waiting to start"
    progress: Progress = field(default_factory=Progress)
    stop: threading.Event = field(default_factory=threading.Event)
    future: Future[Manifest] | None = None
    failures: int = 0
    retry_at: float = 0.0
    verified_at: float = 0.0
    deep_verified_at: float = 0.0
    verified_time: str | None = None
    # Settings the controller changed while a fetch for the old ones was still running.
    changed_spec: dict[str, Any] | None = None

    def report(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": self.name,
            "phase": self.phase,
            "message": _bounded(self.message),
            "bytes": self.progress.bytes,
            "totalBytes": self.progress.total_bytes,
            "files": self.progress.files,
        }
        if self.verified_time:
            entry["verifiedTime"] = self.verified_time
        return entry


class Agent:
    def __init__(
        self,
        node: str,
        data_root: Path,
        api_client: Any,
        *,
        node_data_root: str = defaults.NODE_DATA_ROOT,
        extra_roots: Mapping[str, Path] | None = None,
        heartbeat_seconds: float = 10.0,
        verify_seconds: float = 60.0,
        deep_verify_seconds: float = 6 * 3600.0,
        parallel_replicas: int = 2,
        registry: SourceRegistry | None = None,
        egress: EgressPolicy | None = None,
        min_free_disk: int = DEFAULT_MIN_FREE_DISK,
        max_objects: int = MAX_OBJECTS,
    ) -> None:
        self.node = node
        self.data_root = data_root.resolve()
        self.node_data_root = PurePosixPath(node_data_root)
        # Node path -> local directory, for the data roots the admin allows besides the default
        # one (dataPath); the default root maps to data_root.
        self.roots: dict[PurePosixPath, Path] = {self.node_data_root: self.data_root}
        for node_path, local in (extra_roots or {}).items():
            self.roots[PurePosixPath(node_path)] = Path(local).resolve()
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.heartbeat_seconds = heartbeat_seconds
        self.verify_seconds = verify_seconds
        self.deep_verify_seconds = deep_verify_seconds
        self.registry = registry or load_registry()
        # What a fetch may take: the node's free disk it leaves, the objects it holds (memory).
        self.min_free_disk, self.max_objects = min_free_disk, max_objects
        # The networks fetches never connect to (--blocked-network).
        self.egress = egress or EgressPolicy()
        self._pool = ThreadPoolExecutor(max_workers=parallel_replicas, thread_name_prefix="replica")
        self._replicas: dict[str, _Replica] = {}
        # Unassigned while a fetch was writing: their data is deleted once the fetch has stopped.
        self._retiring: dict[str, _Replica] = {}
        self._desired: dict[str, dict[str, Any]] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()

    # ------------------------------------------------------------------ main loop
    def run(self, stop: threading.Event) -> None:
        self.data_root.mkdir(parents=True, exist_ok=True)
        while not stop.is_set():
            try:
                self._ensure_volumenode()
                break
            except (ApiException, *UNREACHABLE) as exc:
                if isinstance(exc, ApiException) and (exc.status or 0) < 500:
                    raise
                # The API server is not up (yet), or restarting: it will be back.
                logger.warning("cannot register VolumeNode %s yet (%s); retrying", self.node, type(exc).__name__)
                stop.wait(2.0)
        watcher = threading.Thread(target=self._watch, args=(stop,), name="watch", daemon=True)
        watcher.start()
        next_report = 0.0
        try:
            while not stop.is_set():
                self._sync()
                if time.monotonic() >= next_report or self._wake.is_set():
                    self._report()
                    next_report = time.monotonic() + self.heartbeat_seconds
                self._wake.wait(1.0)
                self._wake.clear()
        finally:
            for replica in self._replicas.values():
                replica.stop.set()
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _ensure_volumenode(self, replicas: list[dict[str, Any]] | None = None) -> None:
        """Create this node's VolumeNode if it does not exist, assigned ``replicas`` (none by default)."""
        body = {
            "apiVersion": names.API_VERSION,
            "kind": names.VOLUMENODE_KIND,
            "metadata": {"name": self.node, "labels": {names.LABEL_MANAGED_BY: names.MANAGED_BY}},
            "spec": {"replicas": replicas or []},
        }
        try:
            self.custom.create_cluster_custom_object(names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL, body)
            logger.info("created VolumeNode %s", self.node)
        except ApiException as exc:
            if exc.status != 409:
                raise

    def _restore_volumenode(self) -> None:
        """Create this node's VolumeNode again, deleted while the agent runs, with its assignments.

        Deleted by hand, by a script, or by a controller that thought the node gone: the data
        on disk, and the pods that read it, are still here. The object comes back with the
        replicas it had, so the deletion unassigns (and deletes) nothing; the controller
        releases what it no longer wants the usual way, never under a running pod.
        """
        with self._lock:
            kept = list((self._desired or {}).values())
        logger.warning("VolumeNode %s was deleted: creating it again with its %d replicas", self.node, len(kept))
        try:
            self._ensure_volumenode(kept)
        except (ApiException, *UNREACHABLE) as exc:  # the next report finds it missing and tries again
            logger.warning("creating VolumeNode %s again failed: %s", self.node, type(exc).__name__)
        self._wake.set()

    def _watch(self, stop: threading.Event) -> None:
        """Follow this node's VolumeNode only; every change wakes the main loop."""
        while not stop.is_set():
            try:
                for event in watch.Watch().stream(
                    self.custom.list_cluster_custom_object,
                    names.GROUP,
                    names.VERSION,
                    names.VOLUMENODE_PLURAL,
                    field_selector=f"metadata.name={self.node}",
                    timeout_seconds=60,
                ):
                    obj = event["object"]
                    if event["type"] == "DELETED":
                        self._restore_volumenode()
                        continue
                    desired = {r["name"]: r for r in (obj.get("spec") or {}).get("replicas") or []}
                    with self._lock:
                        self._desired = desired
                    self._wake.set()
                    if stop.is_set():
                        return
            except Exception as exc:  # the API server restarts, connections drop: watch again
                logger.warning("watch of VolumeNode %s ended (%s); restarting", self.node, type(exc).__name__)
                stop.wait(1.0)

    # ------------------------------------------------------------------ replicas
    def local_path(self, node_path: str) -> Path:
        """Where a node path lives on this machine; refuses paths outside the data roots."""
        path = PurePosixPath(node_path)
        if path.is_absolute() and ".." not in path.parts:
            for root, local in self.roots.items():
                if root in path.parents:
                    return local.joinpath(*path.relative_to(root).parts)
        allowed = ", ".join(str(root) for root in self.roots)
        raise ValueError(f"replica path {node_path} is outside this node's data roots ({allowed})")

    def _sync(self) -> None:
        with self._lock:
            desired = self._desired
        if desired is None:
            return  # no word from the API server yet: change nothing on disk
        for name, retiring in list(self._retiring.items()):
            if name in desired:  # assigned again before its fetch stopped: it stays
                self._replicas[name] = self._retiring.pop(name)
            elif retiring.future is None or retiring.future.done():
                self._remove(self._retiring.pop(name), "no longer assigned")
        for name, spec in desired.items():
            replica = self._replicas.get(name)
            if replica is None:
                replica = self._replicas[name] = _Replica(name, spec, Path())
            elif replica.spec != spec:
                replica.changed_spec = spec
                replica.stop.set()  # a fetch for the old settings stops; the new one starts after it
            if replica.future is None and (replica.changed_spec is not None or replica.local == Path()):
                self._apply_spec(replica)
            if replica.local != Path():
                self._advance(replica)
        for name in [n for n in self._replicas if n not in desired]:
            self._forget(self._replicas.pop(name))
        try:
            self._remove_unknown(set(desired))
        except Exception:  # as _remove: logged, tried again next sync, never the end of the agent
            logger.exception("deleting replicas unassigned while the agent was down failed; trying again later")

    def _apply_spec(self, replica: _Replica) -> None:
        """Take the replica's new settings, if any, then map its node path onto this machine.

        Called only while no fetch of the replica runs. A path that maps nowhere is retried
        with the backoff of a failed fetch: the controller may yet change it.
        """
        if replica.changed_spec is not None:
            old_local, old_options = replica.local, replica.spec.get("options")
            replica.spec, replica.changed_spec = replica.changed_spec, None
            replica.phase, replica.message = "Pending", "settings changed"
            replica.failures, replica.retry_at = 0, 0.0
            if old_local != Path() and self._maps_to(replica.spec) != old_local:
                logger.info("deleting replica %s at %s (its path changed)", replica.name, old_local)
                ReplicaDir(old_local).remove()
                self._prune_empty_parents(old_local)
                replica.local = Path()
            elif old_local != Path() and replica.spec.get("options") != old_options:
                # E.g. another part of the data for this node: what is on disk is checked
                # again and completed by the next fetch.
                ReplicaDir(old_local).unpublish()
        if replica.local != Path() or time.monotonic() < replica.retry_at:
            return
        try:
            replica.local = self.local_path(str(replica.spec.get("path", "")))
        except ValueError as exc:
            replica.failures += 1
            delay = min(RETRY_BASE_SECONDS * 2 ** (replica.failures - 1), RETRY_MAX_SECONDS)
            replica.retry_at = time.monotonic() + delay
            replica.phase = "Failed"
            replica.message = f"{exc} (attempt {replica.failures}; retrying in {delay:.0f}s)"
            return
        replica.phase, replica.message = "Pending", "waiting to start"
        replica.failures, replica.retry_at = 0, 0.0
        self._save_state()

    def _maps_to(self, spec: Mapping[str, Any]) -> Path:
        try:
            return self.local_path(str(spec.get("path", "")))
        except ValueError:
            return Path()

    def _advance(self, replica: _Replica) -> None:
        """One step for one replica: collect a finished fetch, verify, or start a fetch."""
        if replica.future is not None:
            if replica.future.done():
                self._collect(replica, replica.future)
            return
        if replica.phase == "Ready" and time.monotonic() - replica.deep_verified_at >= self.deep_verify_seconds:
            replica.future = self._pool.submit(self._deep_verify, replica)
            return
        if self._usable(replica) or time.monotonic() < replica.retry_at:
            return
        source = self.registry.get(str(replica.spec.get("sourceType")))
        if source is None or not source.node_local:
            replica.phase = "Failed"
            replica.message = self.registry.unknown_message(str(replica.spec.get("sourceType")))
            replica.retry_at = time.monotonic() + RETRY_MAX_SECONDS
            return
        replica.phase, replica.message = "Downloading", "downloading"
        replica.progress = Progress()
        replica.stop = threading.Event()
        replica.future = self._pool.submit(self._fetch, source, replica)

    def _fetch(self, source: Source, replica: _Replica) -> Manifest:
        """Runs in a worker thread: read the credentials, then let the source type fetch."""
        request = FetchRequest(
            options=dict(replica.spec.get("options") or {}),
            credentials=self._credentials(replica.spec),
            replica=ReplicaDir(replica.local),
            progress=replica.progress,
            stop=replica.stop,
            egress=self.egress,
            limits=self._limits(replica.spec),
        )
        return source.fetch(request)

    def _limits(self, spec: Mapping[str, Any]) -> Limits:
        """The replica's capacity (from the controller; none from one that gives none) and the agent's bounds."""
        capacity = spec.get("capacity")
        return Limits(parse_quantity(str(capacity)) if capacity else None, self.min_free_disk, self.max_objects)

    def _deep_verify(self, replica: _Replica) -> Manifest:
        """Runs in a worker thread: re-read the data and compare it with the source's checksums."""
        directory = ReplicaDir(replica.local)
        problems = directory.verify(deep=True)
        manifest = directory.manifest()
        if problems or manifest is None:
            logger.warning("replica %s changed on disk: %s; fetching again", replica.name, "; ".join(problems))
            directory.unpublish()
            raise FetchError(f"data changed on disk ({(problems or ['no manifest'])[0]}): fetching it again")
        return manifest

    def _collect(self, replica: _Replica, future: Future[Manifest]) -> None:
        replica.future = None
        error = future.exception()
        source_type = str(replica.spec.get("sourceType"))
        if replica.phase == "Downloading":
            metrics.FETCHES.labels(source_type, "failed" if error else "ok").inc()
            metrics.BYTES_FETCHED.labels(source_type).inc(replica.progress.bytes)
        else:  # a deep verification of Ready data
            metrics.VERIFICATIONS.labels("changed" if error else "ok").inc()
        if error is None:
            self._mark_ready(replica)
        else:
            replica.failures += 1
            delay = min(RETRY_BASE_SECONDS * 2 ** (replica.failures - 1), RETRY_MAX_SECONDS)
            replica.retry_at = time.monotonic() + delay
            replica.phase = "Failed"
            known = isinstance(error, (FetchError, ValueError))
            reason = str(error) if known else f"{type(error).__name__}: {error}"
            replica.message = f"{reason} (attempt {replica.failures}; retrying in {delay:.0f}s)"
            logger.warning("replica %s failed: %s", replica.name, replica.message)
        self._wake.set()

    def _mark_ready(self, replica: _Replica) -> None:
        manifest = ReplicaDir(replica.local).manifest()
        replica.phase, replica.failures = "Ready", 0
        replica.progress.total_bytes = replica.progress.bytes = manifest.total_bytes if manifest else 0
        replica.progress.files = len(manifest.files) if manifest else 0
        replica.message = f"{replica.progress.files} files, {replica.progress.bytes} bytes, verified"
        if manifest and manifest.skipped:
            # Keys that would have escaped the volume's directory: say so, never write them.
            replica.message += f"; skipped {len(manifest.skipped)} unsafe names such as {manifest.skipped[0]!r}"
        replica.verified_at = replica.deep_verified_at = time.monotonic()
        replica.verified_time = _now()

    def _usable(self, replica: _Replica) -> bool:
        """Whether the replica's published data is intact (checked every verify_seconds)."""
        directory = ReplicaDir(replica.local)
        if replica.phase == "Ready" and time.monotonic() - replica.verified_at < self.verify_seconds:
            return True
        if not directory.complete:
            return False
        problems = directory.verify()
        if not problems:
            if replica.phase == "Ready":
                replica.verified_at, replica.verified_time = time.monotonic(), _now()
            else:  # found complete on disk, e.g. after an agent restart
                self._mark_ready(replica)
            return True
        logger.warning("replica %s changed on disk: %s; fetching again", replica.name, "; ".join(problems))
        replica.phase = "Pending"
        replica.message = f"data changed on disk ({problems[0]}): fetching again"
        # Keep what is intact: the fetch resumes from it and checks every file again.
        directory.unpublish()
        return False

    def _credentials(self, spec: dict[str, Any]) -> dict[str, str]:
        ref = spec.get("credentialsSecret") or {}
        if not ref.get("name"):
            return {}
        # A copy in KVC's credentials namespace: named in messages by the user's Secret it copies.
        source = ref.get("source") or ref
        try:
            secret = self.core.read_namespaced_secret(ref["name"], ref["namespace"])
        except ApiException as exc:
            if exc.status == 404:
                raise FetchError(
                    f"credentials Secret {source['name']} not found in namespace {source['namespace']}"
                ) from None
            raise FetchError(
                f"cannot read credentials Secret {ref['namespace']}/{ref['name']}: API answered {exc.status}"
            ) from None
        values = {key: base64.b64decode(value).decode() for key, value in (secret.data or {}).items()}
        for value in values.values():
            logs.register_secret(value)
        return values

    def _forget(self, replica: _Replica) -> None:
        replica.stop.set()
        if replica.future is not None and not replica.future.cancel() and not replica.future.done():
            # A fetch is writing into the staging directory: deleting it now would leave
            # whatever the fetch writes until it notices the stop. Delete once it has stopped.
            self._retiring[replica.name] = replica
            self._save_state()
            return
        self._remove(replica, "no longer assigned")

    def _remove(self, replica: _Replica, why: str) -> None:
        """Delete the replica's data; a failure is logged, never raised (the agent's loop goes on for
        every other replica), and what is left stays in the state file to be deleted again next sync."""
        try:
            if replica.local != Path():
                logger.info("deleting replica %s at %s (%s)", replica.name, replica.local, why)
                ReplicaDir(replica.local).remove()
                self._prune_empty_parents(replica.local)
            self._save_state()
        except Exception:
            logger.exception("deleting replica %s at %s failed; trying again later", replica.name, replica.local)

    def _root_of(self, path: Path) -> Path | None:
        return next((root for root in self.roots.values() if root in path.parents), None)

    def _prune_empty_parents(self, path: Path) -> None:
        root = self._root_of(path)
        parent = path.parent
        while root is not None and parent != root and root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                return
            parent = parent.parent

    def _state_path(self) -> Path:
        return self.data_root / STATE_FILE

    def _save_state(self) -> None:
        replicas = [*self._replicas.values(), *self._retiring.values()]
        known = {r.name: str(r.local) for r in replicas if r.local != Path()}
        previous = self._load_state()
        # Keep entries of replicas whose data still exists, published or staged, until it is removed.
        on_disk = {k: v for k, v in previous.items() if ReplicaDir(Path(v)).exists}
        merged = {**on_disk, **known}
        temporary = self._state_path().with_suffix(".tmp")
        temporary.write_text(json.dumps(merged))
        temporary.replace(self._state_path())

    def _load_state(self) -> dict[str, str]:
        try:
            loaded = json.loads(self._state_path().read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}

    def _remove_unknown(self, desired: set[str]) -> None:
        """Delete data of replicas unassigned while the agent was down (found in its state file)."""
        state = self._load_state()
        mine = {*desired, *self._replicas, *self._retiring}
        stale = {name: path for name, path in state.items() if name not in mine}
        for name, path in stale.items():
            local = Path(path)
            if self._root_of(local) is not None:
                logger.info("deleting replica %s at %s (unassigned while the agent was down)", name, local)
                ReplicaDir(local).remove()
                self._prune_empty_parents(local)
        if stale:
            self._save_state()

    # ------------------------------------------------------------------ report
    def _report(self) -> None:
        usage = shutil.disk_usage(self.data_root)
        replicas = [r.report() for r in sorted(self._replicas.values(), key=lambda r: r.name)]
        for phase in metrics.REPLICA_PHASES:
            metrics.REPLICAS.labels(phase).set(sum(1 for r in replicas if r["phase"] == phase))
        status: dict[str, Any] = {
            "heartbeatTime": _now(),
            "agentVersion": __version__,
            "dataRoot": str(self.node_data_root),
            "disk": {"capacity": str(usage.total), "free": str(usage.free)},
            "summary": {"replicas": len(replicas), "ready": sum(1 for r in replicas if r["phase"] == "Ready")},
            "replicas": replicas,
        }
        try:
            self.custom.patch_cluster_custom_object_status(
                names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL, self.node, {"status": status}
            )
            logger.debug(
                "reported VolumeNode %s: %d replicas, %d ready, %s bytes free",
                self.node,
                status["summary"]["replicas"],
                status["summary"]["ready"],
                status["disk"]["free"],
            )
        except ApiException as exc:
            logger.warning("reporting status of VolumeNode %s failed: %s", self.node, exc.reason)
            if exc.status == 404:  # deleted while the watch was down: it missed the deletion
                self._restore_volumenode()
        except UNREACHABLE as exc:  # the API server restarts: report again at the next heartbeat
            logger.warning("reporting status of VolumeNode %s failed: %s", self.node, type(exc).__name__)
