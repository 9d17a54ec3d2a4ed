"""The controller's heartbeat: a coordination.k8s.io/v1 Lease it renews while it runs.

`kvc status` reads the Lease to tell whether the controller is alive (``renewTime`` within
``leaseDurationSeconds``), since when this process runs (``acquireTime``) and how often a new
process took over (``leaseTransitions``). As in Kubernetes' leader election, a transition is
counted whenever a process takes the Lease from an earlier holder: another pod, or an earlier
process of the same pod (a container the kubelet restarted keeps the pod's name, so the holder
is told apart by the ``acquireTime`` it wrote, not by its name alone).

This is a heartbeat, not leader election: nothing waits for the Lease, a process takes it
whoever held it, and a failure to renew is logged and retried at the next renewal while the
controller reconciles on. ``renewed_lease`` and ``new_lease`` build the objects (pure);
``Heartbeat`` renews them from a daemon thread through ``Leases`` (``KubernetesLeases``: the
API server).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubernetes.client.rest import ApiException
from urllib3.exceptions import HTTPError

from kvc.api import names

logger = logging.getLogger(__name__)

LEASE_API_VERSION = "coordination.k8s.io/v1"
# (connect, read) seconds per request: a hung API server must not hold the thread past a renewal.
REQUEST_TIMEOUT = (5, 10)
# A failure that keeps repeating is logged at WARNING again this often, not at every renewal.
REMIND_SECONDS = 300.0


def holder_identity() -> str:
    """The pod's name (``POD_NAME``, from the downward API), else ``<hostname>-<pid>``."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class HeartbeatSettings:
    namespace: str = names.KVC_NAMESPACE
    duration_seconds: int = names.CONTROLLER_LEASE_SECONDS
    name: str = names.CONTROLLER_LEASE
    identity: str = field(default_factory=holder_identity)

    @property
    def renew_seconds(self) -> float:
        # A third of the duration, as Kubernetes' own leases: two renewals may fail in a row
        # before the Lease looks stale.
        return self.duration_seconds / 3

    @property
    def where(self) -> str:
        return f"{self.namespace}/{self.name}"


# --------------------------------------------------------------------------- the Lease (pure)


def micro_time(moment: dt.datetime) -> str:
    """A MicroTime as the API server writes it: RFC 3339 in UTC, with microseconds."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def new_lease(settings: HeartbeatSettings, now: dt.datetime) -> dict[str, Any]:
    """The Lease as this process creates it: held since ``now``, no transition yet."""
    return {
        "apiVersion": LEASE_API_VERSION,
        "kind": "Lease",
        "metadata": {
            "name": settings.name,
            "namespace": settings.namespace,
            "labels": {names.LABEL_MANAGED_BY: names.MANAGED_BY},
        },
        "spec": {
            "holderIdentity": settings.identity,
            "leaseDurationSeconds": settings.duration_seconds,
            "acquireTime": micro_time(now),
            "renewTime": micro_time(now),
            "leaseTransitions": 0,
        },
    }


def holds(lease: Mapping[str, Any], identity: str, acquired: str | None) -> bool:
    """Whether ``lease`` is this process's: its identity, and the ``acquireTime`` it wrote (None: it
    never took the Lease; an earlier process of the same pod had the same identity)."""
    spec = lease.get("spec") or {}
    return acquired is not None and spec.get("holderIdentity") == identity and spec.get("acquireTime") == acquired


def renewed_lease(
    current: Mapping[str, Any], settings: HeartbeatSettings, acquired: str | None, now: dt.datetime
) -> dict[str, Any]:
    """``current`` renewed by this process at ``now``, for a replace.

    While the process holds it only ``renewTime`` (and the duration) change. Taking it over, at
    the process's start or back from another holder, sets ``holderIdentity`` and ``acquireTime``
    and counts a transition, unless nobody ever held it. ``metadata`` keeps the resourceVersion
    read: the replace fails with 409 if someone wrote the Lease since.
    """
    metadata = {key: value for key, value in (current.get("metadata") or {}).items() if key != "managedFields"}
    metadata["labels"] = {**(metadata.get("labels") or {}), names.LABEL_MANAGED_BY: names.MANAGED_BY}
    spec = dict(current.get("spec") or {})
    if not holds(current, settings.identity, acquired):
        held_before = bool(spec.get("holderIdentity") or spec.get("acquireTime"))
        spec["leaseTransitions"] = _count(spec.get("leaseTransitions")) + (1 if held_before else 0)
        spec["holderIdentity"] = settings.identity
        spec["acquireTime"] = micro_time(now)
    spec["leaseDurationSeconds"] = settings.duration_seconds
    spec["renewTime"] = micro_time(now)
    return {"apiVersion": LEASE_API_VERSION, "kind": "Lease", "metadata": metadata, "spec": spec}


# --------------------------------------------------------------------------- the API


class LeaseError(Exception):
    """A request about the Lease failed. ``status``: the HTTP status (None: no answer came)."""

    def __init__(self, status: int | None, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Leases(Protocol):
    """The three calls the heartbeat makes, on plain objects; failures raise LeaseError."""

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Lease, or None when there is none."""

    def create(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]: ...

    def replace(self, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]: ...


class KubernetesLeases:
    """``Leases`` through the Kubernetes client's CoordinationV1Api, as the API server's JSON."""

    def __init__(self, api: Any) -> None:
        self._api = api

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call(self._api.read_namespaced_lease, name, namespace)
        except LeaseError as error:
            if error.status == 404:
                return None
            raise

    def create(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._call(self._api.create_namespaced_lease, namespace, body)

    def replace(self, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._call(self._api.replace_namespaced_lease, name, namespace, body)

    @staticmethod
    def _call(method: Callable[..., Any], *args: Any) -> dict[str, Any]:
        try:
            response = method(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            raise LeaseError(exc.status or None, _api_reason(exc)) from None
        except (HTTPError, OSError) as exc:
            raise LeaseError(None, f"no answer from the API server: {exc}") from None
        answer: dict[str, Any] = json.loads(response.data)
        return answer


def _api_reason(exc: ApiException) -> str:
    """``<status> <reason>: <the Status' message>``: what the API server said, in one line."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        body = None
    message = body.get("message") if isinstance(body, dict) else None
    head = f"{exc.status} {exc.reason}" if exc.status else str(exc.reason)
    return " ".join(f"{head}: {message}".split()) if message else " ".join(head.split())


# --------------------------------------------------------------------------- the runner


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Heartbeat:
    """Renews the Lease every ``settings.renew_seconds`` from a daemon thread, until ``stop()``.

    The Lease last read or written is kept, so a renewal is one replace; a conflict (409) or a
    Lease gone (404) makes the next renewal read it again. A failure is logged at WARNING when
    its reason is new (or again every REMIND_SECONDS), else at DEBUG, and never raised.
    """

    def __init__(
        self,
        leases: Leases,
        settings: HeartbeatSettings,
        clock: Callable[[], dt.datetime] = _utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._leases = leases
        self._clock = clock
        self._monotonic = monotonic
        self._known: dict[str, Any] | None = None  # None: read the Lease before writing it
        self._acquired: str | None = None  # the acquireTime this process wrote: the Lease is its own
        self._failure: str | None = None
        self._failures = 0
        self._warned_at = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.beat()
            self._stopping.wait(self.settings.renew_seconds)

    def beat(self) -> bool:
        """One renewal (creating or taking over the Lease when needed); False when it failed."""
        try:
            current, written = self._write(self._clock())
        except LeaseError as error:
            if error.status in {404, 409}:  # gone, or written by someone else since we read it
                self._known = None
            self._failed(error.reason)
            return False
        except Exception as exc:  # the thread must outlive anything: the next renewal reads afresh
            self._known = None
            self._failed(f"{type(exc).__name__}: {exc}")
            return False
        self._renewed(current, written)
        return True

    def _write(self, now: dt.datetime) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        settings = self.settings
        current = self._known if self._known is not None else self._leases.get(settings.namespace, settings.name)
        if current is None:
            return None, self._leases.create(settings.namespace, new_lease(settings, now))
        lease = renewed_lease(current, settings, self._acquired, now)
        return current, self._leases.replace(settings.namespace, settings.name, lease)

    def _renewed(self, current: Mapping[str, Any] | None, written: dict[str, Any]) -> None:
        spec = written.get("spec") or {}
        where, identity = self.settings.where, self.settings.identity
        if current is None or not holds(current, identity, self._acquired):
            previous = (current or {}).get("spec") or {}
            how = (
                "created it"
                if current is None
                else f"took it over from {previous.get('holderIdentity') or 'no holder'}"
                f" (transition {spec.get('leaseTransitions')})"
            )
            if self._acquired is None:
                logger.info(
                    "heartbeat: holding Lease %s as %s, renewed every %gs; %s",
                    where,
                    identity,
                    self.settings.renew_seconds,
                    how,
                )
            elif current is None:
                logger.warning("heartbeat: Lease %s was deleted; created it again", where)
            else:
                # Someone else wrote it while this process held it: most likely a second
                # controller (kopf runs standalone: both would handle every VolumeManager).
                logger.warning(
                    "heartbeat: Lease %s was renewed by %s meanwhile: is another KVC controller running?"
                    " Took it back (transition %s)",
                    where,
                    previous.get("holderIdentity"),
                    spec.get("leaseTransitions"),
                )
        if self._failure is not None:
            logger.info("heartbeat: Lease %s renewed again after %d failed attempts", where, self._failures)
        self._known, self._acquired = written, spec.get("acquireTime")
        self._failure, self._failures = None, 0

    def _failed(self, reason: str) -> None:
        self._failures += 1
        now = self._monotonic()
        if reason != self._failure or now - self._warned_at >= REMIND_SECONDS:
            logger.warning(
                "heartbeat: cannot renew Lease %s (%s; retrying every %gs): %s",
                self.settings.where,
                "failed once" if self._failures == 1 else f"failed {self._failures} times in a row",
                self.settings.renew_seconds,
                reason,
            )
            self._warned_at = now
        else:
            logger.debug("heartbeat: cannot renew Lease %s (again): %s", self.settings.where, reason)
        self._failure = reason
