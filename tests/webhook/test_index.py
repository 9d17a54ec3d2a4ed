from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY

from webhook.index import VolumeIndex


def volumemanager(namespace: str, name: str, *ids: str, phase: str = "Ready") -> dict[str, Any]:
    return {
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"volumeConfigs": [{"id": i, "sourceType": "NFS"} for i in ids]},
        "status": {"volumes": [{"id": i, "phase": phase, "volumeSource": {"persistentVolumeClaim": {}}} for i in ids]},
    }


def indexed() -> float | None:
    return REGISTRY.get_sample_value("kvc_webhook_indexed_volumemanagers")


def ids(index: VolumeIndex, namespace: str) -> list[tuple[str, str, str]]:
    return sorted((e.manager, e.volume_id, e.phase) for e in index.entries(namespace))


def test_the_index_is_synced_only_after_the_first_full_list() -> None:
    index = VolumeIndex()
    assert not index.synced.is_set()
    index.replace_all([volumemanager("a", "vm", "cifar"), volumemanager("b", "vm", "bert", "coco")])
    assert index.synced.is_set()
    assert ids(index, "a") == [("vm", "cifar", "Ready")]
    assert ids(index, "b") == [("vm", "bert", "Ready"), ("vm", "coco", "Ready")]
    assert ids(index, "c") == []
    assert indexed() == 2


def test_watch_events_add_change_and_remove_volumemanagers() -> None:
    index = VolumeIndex()
    index.replace_all([volumemanager("a", "vm", "cifar", phase="Provisioning")])
    index.apply("MODIFIED", volumemanager("a", "vm", "cifar"))
    index.apply("ADDED", volumemanager("a", "more", "coco"))
    assert ids(index, "a") == [("more", "coco", "Ready"), ("vm", "cifar", "Ready")]
    assert indexed() == 2
    index.apply("DELETED", volumemanager("a", "vm", "cifar"))
    assert ids(index, "a") == [("more", "coco", "Ready")]
    assert indexed() == 1


def test_a_relist_replaces_what_the_watch_missed() -> None:
    index = VolumeIndex()
    index.replace_all([volumemanager("a", "gone", "cifar")])
    index.replace_all([volumemanager("a", "new", "bert")])  # "gone" was deleted while the watch was down
    assert ids(index, "a") == [("new", "bert", "Ready")]
