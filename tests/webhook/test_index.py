from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

from prometheus_client import REGISTRY

from webhook.index import ReadThrough, VolumeIndex


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


class Lister:
    """What the API server answers for a namespace, one list at a time, each held until released."""

    def __init__(self, *answers: list[dict[str, Any]] | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[str] = []
        self.release = threading.Event()
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def __call__(self, namespace: str) -> list[dict[str, Any]]:
        with self._lock:
            self.calls.append(namespace)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            answer = self.answers.pop(0)
        try:
            assert self.release.wait(5)
            if isinstance(answer, Exception):
                raise answer
            return answer
        finally:
            with self._lock:
                self.running -= 1


def read_throughs(result: str) -> float:
    return REGISTRY.get_sample_value("kvc_webhook_read_throughs_total", {"result": result}) or 0.0


def run(main: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(main)


def test_read_through_answers_from_the_api_server_without_touching_the_index() -> None:
    lister = Lister([volumemanager("a", "vm", "cifar")])
    lister.release.set()
    index = VolumeIndex()
    index.replace_all([])
    catalog = run(ReadThrough(lister).catalog("a"))
    assert [(e.manager, e.volume_id) for e in catalog.entries] == [("vm", "cifar")]
    assert lister.calls == ["a"]
    # The watch stays the index's only writer: an older list never undoes a deletion it saw.
    assert ids(index, "a") == []


def test_requests_during_a_list_share_the_next_one_which_starts_after_they_arrived() -> None:
    early, late = [volumemanager("a", "vm", "old")], [volumemanager("a", "vm", "old", "new")]
    lister = Lister(early, late)
    read_through = ReadThrough(lister)

    async def main() -> tuple[list[Any], int]:
        first = asyncio.ensure_future(read_through.catalog("a"))
        await asyncio.sleep(0.05)  # the first list is in flight: these arrive after it began
        rest = [asyncio.ensure_future(read_through.catalog("a")) for _ in range(50)]
        await asyncio.sleep(0.05)
        in_flight = lister.running
        lister.release.set()
        return await asyncio.gather(first, *rest), in_flight

    catalogs, in_flight = run(main())
    assert in_flight == 1  # the 50 wait for the first list to end before theirs starts
    assert lister.calls == ["a", "a"]
    assert lister.most_running == 1
    assert [e.volume_id for e in catalogs[0].entries] == ["old"]
    # Every later request sees what existed when it arrived.
    assert all([e.volume_id for e in c.entries] == ["old", "new"] for c in catalogs[1:])


def test_namespaces_are_listed_independently_and_a_failed_list_fails_only_its_waiters() -> None:
    lister = Lister(ConnectionError("API server unreachable"), [volumemanager("b", "vm", "bert")])
    read_through = ReadThrough(lister)
    failed_before = read_throughs("failed")

    async def main() -> list[Any]:
        requests = [read_through.catalog("a"), read_through.catalog("b")]
        tasks = [asyncio.ensure_future(r) for r in requests]
        await asyncio.sleep(0.05)
        assert lister.most_running == 2
        lister.release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    failed, found = run(main())
    assert isinstance(failed, ConnectionError)
    assert [e.volume_id for e in found.entries] == ["bert"]
    assert read_throughs("failed") == failed_before + 1


def test_a_request_that_gives_up_never_cancels_the_list_others_wait_for() -> None:
    lister = Lister(*([volumemanager("a", "vm", "cifar")] for _ in range(3)))
    read_through = ReadThrough(lister)

    async def main() -> list[Any]:
        first = asyncio.ensure_future(read_through.catalog("a"))
        await asyncio.sleep(0.02)
        impatient, patient = (asyncio.ensure_future(read_through.catalog("a")) for _ in range(2))
        await asyncio.sleep(0.02)
        first.cancel()  # its client went away during the list
        impatient.cancel()  # and this one while waiting for the next
        lister.release.set()
        return [await patient, await read_through.catalog("a")]

    assert all([e.volume_id for e in c.entries] == ["cifar"] for c in run(main()))
    # Both lists ran to their end; the last request, arriving after them, got a list of its own.
    assert lister.calls == ["a", "a", "a"]
