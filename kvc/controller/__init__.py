"""The KVC controller: kopf handlers (thin) over pure reconcile and status functions."""

from __future__ import annotations

import ctypes
import logging

import kopf

from kvc import defaults
from kvc.api import names
from kvc.controller.lease import HeartbeatSettings
from kvc.policy import AdminPolicy

logger = logging.getLogger(__name__)


# glibc's M_ARENA_MAX: without it every thread that allocates may get a malloc arena of its
# own (up to 8 per core), each holding freed memory apart from the others. The controller's
# handler threads and informers then kept tens of MB more resident than two arenas do.
_M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for the threads started after this; False where not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False  # not glibc (musl, macOS): nothing to cap
    return bool(mallopt(_M_ARENA_MAX, arenas))


def run(  # noqa: PLR0917 - the command line's options, in its order
    namespaces: tuple[str, ...] = (),
    liveness_endpoint: str | None = None,
    node_data_root: str = defaults.NODE_DATA_ROOT,
    agent_grace_seconds: float = defaults.AGENT_GRACE_SECONDS,
    allowed_data_roots: tuple[str, ...] = (),
    credentials_namespace: str = names.DEFAULT_CREDENTIALS_NAMESPACE,
    policy: AdminPolicy | None = None,
    default_capacity: str = defaults.NODE_CAPACITY,
    heartbeat: HeartbeatSettings | None = None,
) -> None:
    """Run the controller until interrupted (``kvc run controller``)."""
    from kvc.controller import handlers  # noqa: F401, PLC0415 - registers the handlers with kopf

    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=True,
        liveness_endpoint=liveness_endpoint,
        memo=kopf.Memo(
            node_data_root=node_data_root,
            agent_grace_seconds=agent_grace_seconds,
            allowed_data_roots=allowed_data_roots,
            credentials_namespace=credentials_namespace,
            policy=policy or AdminPolicy(),
            default_capacity=default_capacity,
            heartbeat_settings=heartbeat or HeartbeatSettings(),
        ),
    )
