"""Prometheus metrics of the controller and the agent, and the endpoint serving them.

The webhook's own metrics live in webhook/server.py (it serves /metrics on its HTTPS port).
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

RECONCILES = Counter(
    "kvc_controller_reconciles_total", "VolumeManager reconciles by trigger and result", ["trigger", "result"]
)
RECONCILE_SECONDS = Histogram(
    "kvc_controller_reconcile_seconds",
    "Time to reconcile one VolumeManager",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
VOLUME_TRANSITIONS = Counter(
    "kvc_controller_volume_transitions_total", "Volumes entering a phase (by the event reason)", ["reason"]
)
GATED_PODS_RELEASED = Counter("kvc_controller_gated_pods_released_total", "Pods released once their data was usable")

FETCHES = Counter("kvc_agent_fetches_total", "Replica fetches by source type and result", ["source_type", "result"])
BYTES_FETCHED = Counter("kvc_agent_bytes_fetched_total", "Bytes written into replicas", ["source_type"])
VERIFICATIONS = Counter("kvc_agent_deep_verifications_total", "Re-reads of Ready data by result", ["result"])
REPLICAS = Gauge("kvc_agent_replicas", "Replicas on this node by phase", ["phase"])
REPLICA_PHASES = ("Pending", "Downloading", "Ready", "Failed")


def serve(port: int, host: str = "0.0.0.0") -> None:  # noqa: S104 - scraped from other pods
    """Serve /metrics on a thread of its own (port 0: do not serve)."""
    if port:
        start_http_server(port, addr=host)
        logger.info("metrics on http://%s:%d/metrics", host, port)
