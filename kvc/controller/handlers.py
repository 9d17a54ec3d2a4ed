"""kopf handlers for VolumeManagers: thin wrappers over ``reconcile`` and ``status``."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf
from kubernetes import client
from kubernetes.client.rest import ApiException

from kvc import defaults, kube, metrics
from kvc.api import names
from kvc.api.models import State
from kvc.controller import caches, gates, lease, passes, reconcile, status
from kvc.policy import AdminPolicy
from kvc.sources.base import SourceContext
from kvc.sources.registry import load_registry
from kvc.throttle import Throttle

logger = logging.getLogger(__name__)

# How often every VolumeManager is re-checked, to notice what no watch tells us about
# (a claim binding, a deleted PV). Quick enough that Ready shows within seconds.
RESYNC_SECONDS = 2.0

VMGR: tuple[str, str, str] = (names.GROUP, names.VERSION, names.VOLUMEMANAGER_PLURAL)

# Threads running the (synchronous) handlers. Passes mostly compute from the informers;
# these threads cover the API calls of passes that write (creates, node labels, assignments).
WORKERS = 16

# Connections kopf keeps to the API server (its watches, patches and events). kopf's own
# session never caps them: a thousand VolumeManagers created at once opened hundreds of TLS
# connections, each keeping 128 KiB of buffers after the burst. Requests beyond the cap wait
# for a free connection; the API server is the bottleneck then anyway.
API_CONNECTIONS = 24

# One look for gated pods per namespace per resync, whatever number of VolumeManagers it has.
GATED_POD_PASSES = Throttle(RESYNC_SECONDS)

# The status each VolumeManager was last given here, and which ones have settled.
PASSES = passes.PassMemory()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = names.FINALIZER
    # The CRD's structural schema prunes unknown status fields: keep kopf's state in annotations.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.GROUP)
    settings.persistence.diffbase_storage = _NoDiffBase()
    # Our own events describe what happens; kopf's become events only when a handler fails.
    settings.posting.level = logging.WARNING
    # kopf logs every handler run at INFO: with a thousand VolumeManagers, hundreds of lines a
    # second saying a timer succeeded. Failures are warnings and stay; --verbose shows all.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings.watching.server_timeout = 300
    settings.execution.max_workers = WORKERS
    memo.executor = settings.execution.executor
    # The client's pool defaults to 5 connections per CPU: the workers and the informers'
    # watches would queue for a connection.
    api = kube.api_client(pool_size=2 * WORKERS)
    memo.core = client.CoreV1Api(api)
    memo.custom = client.CustomObjectsApi(api)
    memo.setdefault("credentials_namespace", names.DEFAULT_CREDENTIALS_NAMESPACE)
    caches.start(
        api,
        credentials_namespace=memo.credentials_namespace,
        on_node_deleted=functools.partial(node_deleted, memo.custom),
        touch=PASSES.touch,
        touch_nodes=PASSES.touch_nodes,
    )
    memo.registry = load_registry()
    memo.setdefault("node_data_root", defaults.NODE_DATA_ROOT)
    memo.setdefault("agent_grace_seconds", defaults.AGENT_GRACE_SECONDS)
    # Agents are judged by what passes see of their heartbeats, and a gap of half the grace
    # between two looks counts as an outage: even settled VolumeManagers are looked at well
    # within that.
    PASSES.settled_seconds = min(passes.SETTLED_SECONDS, memo.agent_grace_seconds / 4)
    memo.setdefault("allowed_data_roots", ())
    memo.setdefault("policy", AdminPolicy())
    memo.setdefault("default_capacity", defaults.NODE_CAPACITY)
    logger.info("source types: %s", ", ".join(sorted(memo.registry.sources)))
    # The Lease `kvc status` reads to tell the controller is alive: renewed from a thread of its
    # own, so neither a slow API server nor a refusal ever holds up reconciling.
    memo.setdefault("heartbeat_settings", lease.HeartbeatSettings())
    leases = lease.KubernetesLeases(client.CoordinationV1Api(api))
    memo.heartbeat = lease.Heartbeat(leases, memo.heartbeat_settings).start()


class _NoDiffBase(kopf.DiffBaseStorage):
    """No copy of the last handled spec on the object: its generation tells a spec change.

    kopf's own diff-base (an annotation holding the spec as last handled) costs one more
    PATCH of every new VolumeManager, and one more watch event to every watcher; the
    status' observedGeneration, written anyway, says which spec was passed last
    (``volumemanager_event``). Without a diff-base kopf sees no create, update or resume
    to handle: deletion (the finalizer) and timers do not depend on it.
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        """Nothing kept: see the class."""


@kopf.on.login()
async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
    """kopf's own login (in-cluster, else kubeconfig), on a session with a bounded pool."""
    info = kopf.login_via_client(**kwargs)
    return None if info is None else _bounded_session(info, API_CONNECTIONS)


def _bounded_session(info: kopf.ConnectionInfo, limit: int) -> kopf.AiohttpSession:
    """The session kopf would make from ``info``, with at most ``limit`` connections."""
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )
    return kopf.AiohttpSession(
        server=info.server,
        default_namespace=info.default_namespace,
        priority=info.priority,
        expiration=info.expiration,
        aiohttp_session=session,
    )


def _context(body: kopf.Body, memo: kopf.Memo, known_status: Mapping[str, Any] | None = None) -> SourceContext:
    known = (body.get("status") or {}) if known_status is None else known_status
    return SourceContext(
        owner=reconcile.owner_of(body),
        core=memo.core,
        custom=memo.custom,
        node_data_root=memo.node_data_root,
        agent_grace_seconds=memo.agent_grace_seconds,
        allowed_data_roots=memo.allowed_data_roots,
        policy=memo.policy,
        default_capacity=memo.default_capacity,
        credentials_namespace=memo.credentials_namespace,
        previous_phases={str(v.get("id")): str(v.get("phase")) for v in known.get("volumes") or []},
        together_on=gates.TOGETHER.of(body["metadata"]["namespace"], body["metadata"]["name"]),
        cannot_meet=functools.partial(_cannot_meet, body["metadata"]["namespace"], body["metadata"]["name"]),
    )


def _cannot_meet(namespace: str, manager: str, volume_id: str, node: str, reason: str) -> None:
    gates.TOGETHER.refuse(namespace, (manager, volume_id), node, reason)


def _reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, trigger: str) -> None:
    uid = str(body["metadata"]["uid"])
    if not PASSES.begin(uid):
        metrics.RECONCILES.labels(trigger, "busy").inc()
        return
    try:
        with metrics.RECONCILE_SECONDS.time():
            _reconcile_once(body, patch, memo)
    except Exception:
        metrics.RECONCILES.labels(trigger, "error").inc()
        raise
    finally:
        PASSES.end(uid)
    metrics.RECONCILES.labels(trigger, "ok").inc()


def _reconcile_once(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo) -> None:
    uid, started = str(body["metadata"]["uid"]), PASSES.now()
    old = PASSES.status(uid, body.get("status") or {})
    result = reconcile.reconcile(body, _context(body, memo, old), memo.registry)
    new = status.aggregate(
        result.volumes,
        generation=body["metadata"].get("generation", 0),
        previous_conditions=old.get("conditions") or [],
        notes=result.notes,
    )
    for event in status.transitions(old.get("volumes") or [], result.volumes):
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        metrics.VOLUME_TRANSITIONS.labels(event.reason).inc()
    changed = status.state_event(old.get("state"), new)
    if changed is not None:
        kopf.event(body, type=changed.type, reason=changed.reason, message=changed.message)
    written = new if status.status_changed(old, new) else None
    if written is not None:
        patch.status.update(written)
    PASSES.record(uid, new["state"], written, started)


def _guarded(body: kopf.Body) -> bool:
    """Whether a pass may make resources for it: its finalizer is on (kopf adds it first, and
    the timer starts before) and it is not being deleted. Resources made before the finalizer
    would outlive a VolumeManager deleted in between."""
    metadata = body["metadata"]
    return not metadata.get("deletionTimestamp") and names.FINALIZER in (metadata.get("finalizers") or [])


def _spec_passed(body: kopf.Body) -> bool:
    """Whether a pass has handled the VolumeManager's current spec (its generation)."""
    known = PASSES.status(str(body["metadata"]["uid"]), body.get("status") or {})
    return bool(known.get("observedGeneration") == body["metadata"].get("generation"))


@kopf.on.event(*VMGR)
def volumemanager_event(type: str, body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """A spec no pass has handled yet (a new VolumeManager, an update, one changed while the
    controller was down) is passed at once; everything else waits for the timer."""
    metadata = body["metadata"]
    if type == "DELETED" or not _guarded(body) or _spec_passed(body):
        return
    trigger = "create" if not (body.get("status") or {}).get("observedGeneration") else "update"
    try:
        _reconcile(body, patch, memo, trigger)
    except Exception:
        # kopf does not retry event handlers: the timer's next tick does.
        PASSES.touch([str(metadata["uid"])])
        raise


@kopf.timer(*VMGR, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
async def volumemanager_timer(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **kwargs: Any) -> None:
    # A settled VolumeManager waits here, in the loop, until it is due: a kopf timer tick
    # costs ~0.5 ms of the loop's CPU, and a thousand settled VolumeManagers ticking every
    # resync kept a core 40% busy doing nothing. The wait ends at once when the object goes
    # or the operator stops, and is re-checked every resync (a spec update unsettles it).
    stopped: kopf.DaemonStopped = kwargs["stopped"]  # kopf passes it to timers; TimerFn omits it
    uid, namespace = str(body["metadata"]["uid"]), body["metadata"]["namespace"]
    gated = GATED_POD_PASSES.due(namespace)
    while not gated and (wait := PASSES.until_due(uid)) > 0:
        if await stopped.wait(min(wait, RESYNC_SECONDS)):
            return
        gated = GATED_POD_PASSES.due(namespace)
    due = PASSES.due(uid)
    if not due:
        metrics.RECONCILES.labels("timer", "settled").inc()
    elif not _guarded(body):
        due = False  # the first pass waits for the finalizer; the next tick looks again
    if due or gated:
        # In kopf's handler threads, with this context (kopf.event posts through it).
        work = functools.partial(_timer_pass, body, patch, memo, due=due, gated=gated)
        await asyncio.get_running_loop().run_in_executor(memo.executor, contextvars.copy_context().run, work)


def _timer_pass(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, due: bool, gated: bool) -> None:
    if due:
        _reconcile(body, patch, memo, "timer")
    if gated:
        namespace = body["metadata"]["namespace"]
        gated_pass = gates.release_gated_pods(memo.core, memo.custom, namespace)
        metrics.GATED_PODS_RELEASED.inc(gated_pass.released)
        PASSES.touch(gated_pass.rearranged)


@kopf.on.delete(*VMGR)
def volumemanager_delete(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    patch.status["state"] = State.DELETING.value
    remaining = reconcile.delete(_context(body, memo), memo.registry)
    patch.status["message"] = "; ".join(remaining) or "removing the volumes' resources"
    if remaining:
        raise kopf.TemporaryError("; ".join(remaining), delay=5)
    PASSES.forget(str(body["metadata"]["uid"]))


@kopf.on.cleanup()
def controller_cleanup(memo: kopf.Memo, **_: Any) -> None:
    heartbeat = memo.get("heartbeat")
    if heartbeat is not None:
        heartbeat.stop()
    kube.stop_informers()


def node_deleted(custom: Any, name: str) -> None:
    """A deleted Node takes its VolumeNode along (its replicas are re-placed by the timer).

    Called by the Node informer, which also notices deletions missed while its watch was down.
    """
    try:
        custom.delete_cluster_custom_object(names.GROUP, names.VERSION, names.VOLUMENODE_PLURAL, name)
        logger.info("deleted VolumeNode %s: its node is gone", name)
    except ApiException as exc:
        if exc.status != 404:
            raise
