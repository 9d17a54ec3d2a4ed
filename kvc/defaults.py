"""The defaults every component agrees on, written once: the flags, the settings objects and
the kopf memo all take their values from here."""

from __future__ import annotations

# The node path under which every agent keeps its data (one for the whole cluster): the
# controller writes it into statuses and PVs, agents map it to their --data-root.
NODE_DATA_ROOT = "/var/lib/kvc"

# Seconds without an agent heartbeat after which its node's replicas are placed elsewhere.
AGENT_GRACE_SECONDS = 45.0

# The bytes a node-local replica may take when its volume gives no capacity.
NODE_CAPACITY = "100Gi"
