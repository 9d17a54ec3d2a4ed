"""kvc.kube.Informer against the real API server: paged list, watch, label selector, deletions."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from e2e.helpers import wait_for
from kvc import kube

SELECTOR = "kvc.test/informed=yes"


def config_map(name: str, value: str, informed: bool = True) -> dict[str, Any]:
    labels = {"kvc.test/informed": "yes" if informed else "no"}
    return {"metadata": {"name": name, "labels": labels}, "data": {"value": value}}


def value_of(raw: dict[str, Any]) -> str:
    return str((raw.get("data") or {}).get("value"))


@pytest.fixture
def informed(api: Any, namespace: str) -> Iterator[tuple[client.CoreV1Api, kube.Informer[str], list[str]]]:
    core = client.CoreV1Api(api)
    for index in range(5):
        core.create_namespaced_config_map(namespace, config_map(f"cm-{index}", str(index)))
    core.create_namespaced_config_map(namespace, config_map("other", "x", informed=False))
    deleted: list[str] = []
    informer: kube.Informer[str] = kube.Informer(
        "configmaps",
        functools.partial(core.list_namespaced_config_map, namespace),
        value_of,
        label_selector=SELECTOR,
        on_delete=lambda key, _value: deleted.append(key),
        page_size=2,  # five objects: three pages
        watch_seconds=5,  # the watch ends and is opened again during the test
    )
    informer.start()
    try:
        yield core, informer, deleted
    finally:
        informer.stop()


def test_the_informer_lists_in_pages_and_follows_changes(
    informed: tuple[client.CoreV1Api, kube.Informer[str], list[str]], namespace: str
) -> None:
    core, informer, deleted = informed
    assert informer.wait_synced(30)
    assert dict(informer.snapshot().items) == {f"{namespace}/cm-{i}": str(i) for i in range(5)}

    core.patch_namespaced_config_map("cm-0", namespace, {"data": {"value": "changed"}})
    core.delete_namespaced_config_map("cm-1", namespace)
    core.create_namespaced_config_map(namespace, config_map("cm-new", "new"))
    # Leaving the selector is a deletion for this informer; joining it an addition.
    core.patch_namespaced_config_map("cm-2", namespace, {"metadata": {"labels": {"kvc.test/informed": "no"}}})
    core.patch_namespaced_config_map("other", namespace, {"metadata": {"labels": {"kvc.test/informed": "yes"}}})
    expected = {
        f"{namespace}/cm-0": "changed",
        f"{namespace}/cm-3": "3",
        f"{namespace}/cm-4": "4",
        f"{namespace}/cm-new": "new",
        f"{namespace}/other": "x",
    }
    wait_for(lambda: dict(informer.snapshot().items) == expected, timeout=30, what="the informer to follow")
    assert sorted(deleted) == [f"{namespace}/cm-1", f"{namespace}/cm-2"]

    # After its watch timed out (5 s) the informer goes on from where it was, missing nothing.
    time.sleep(6)
    core.delete_namespaced_config_map("cm-3", namespace)
    wait_for(lambda: f"{namespace}/cm-3" not in informer.snapshot().items, timeout=30, what="a deletion after re-watch")
    assert informer.error is None
