"""Connecting to the cluster: in-cluster credentials when running in a pod, else kubeconfig."""

from __future__ import annotations

from typing import Any

from kubernetes import client, config


def api_client() -> Any:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()
