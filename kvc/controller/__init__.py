"""The KVC controller: kopf handlers (thin) over pure reconcile and status functions."""

from __future__ import annotations

import logging

import kopf

logger = logging.getLogger(__name__)


def run(
    namespaces: tuple[str, ...] = (),
    liveness_endpoint: str | None = None,
    node_data_root: str = "/var/lib/kvc",
    agent_grace_seconds: float = 45.0,
    allowed_data_roots: tuple[str, ...] = (),
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
        ),
    )
