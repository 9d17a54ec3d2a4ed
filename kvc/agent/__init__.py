"""The node agent (``agent.Agent``) and the on-disk form of replicas (``files``)."""
