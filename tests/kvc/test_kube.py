"""The informer's store and its list/watch loop, driven by a scripted lister.

The real API server is used in e2e/test_informers.py; here are the answers it does not give
on demand: a watch that has expired (410), a list refused (403), a stream cut mid-line.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from kvc import kube


def by_colour(item: dict[str, Any]) -> list[str]:
    colour = item.get("colour")
    return [colour] if colour else []


def test_the_store_keeps_indexes_in_step_with_puts_and_removals() -> None:
    store: kube.Store[dict[str, Any]] = kube.Store({"colour": by_colour})
    store.put("a", {"colour": "red"})
    store.put("b", {"colour": "red"})
    store.put("a", {"colour": "blue"})
    assert store.by("colour", "red") == [{"colour": "red"}]
    assert store.by("colour", "blue") == [{"colour": "blue"}]
    assert store.put("b", None) == {"colour": "red"}
    assert store.by("colour", "red") == []
    assert "red" not in store.snapshot().indexes["colour"]  # no empty sets left behind
    assert len(store) == 1


def test_an_equal_object_is_not_a_change() -> None:
    store: kube.Store[dict[str, Any]] = kube.Store()
    first = {"colour": "red"}
    store.put("a", first)
    revision = store.revision
    store.put("a", {"colour": "red"})
    assert store.revision == revision
    assert store.get("a") is first
    store.put("missing", None)
    assert store.revision == revision
    store.put("a", {"colour": "blue"})
    assert store.revision == revision + 1


def test_a_snapshot_does_not_change_with_later_events() -> None:
    store: kube.Store[dict[str, Any]] = kube.Store({"colour": by_colour})
    store.put("a", {"colour": "red"})
    snapshot = store.snapshot()
    store.put("b", {"colour": "red"})
    store.put("a", None)
    assert list(snapshot.items) == ["a"]
    assert snapshot.by("colour", "red") == [{"colour": "red"}]
    assert snapshot.keys_by("colour", "green") == frozenset()


def test_replace_returns_what_is_gone_and_reindexes() -> None:
    store: kube.Store[dict[str, Any]] = kube.Store({"colour": by_colour})
    store.put("a", {"colour": "red"})
    store.put("b", {"colour": "blue"})
    gone = store.replace({"b": {"colour": "red"}, "c": {"colour": "green"}})
    assert gone == {"a": {"colour": "red"}}
    assert store.by("colour", "red") == [{"colour": "red"}]
    assert store.by("colour", "blue") == []


def test_object_key_and_managed_fields() -> None:
    assert kube.object_key({"metadata": {"name": "n1"}}) == "n1"
    assert kube.object_key({"metadata": {"name": "c", "namespace": "ns"}}) == "ns/c"
    raw = {"metadata": {"name": "x", "managedFields": [{"manager": "kubectl"}]}}
    assert kube.without_managed_fields(raw) == {"metadata": {"name": "x"}}


def test_a_node_record_reads_like_the_typed_client() -> None:
    raw = {
        "metadata": {"name": "n1", "uid": "u", "labels": {"zone": "a"}, "managedFields": [{}]},
        "spec": {"unschedulable": True, "taints": [{"key": "k", "effect": "NoSchedule"}]},
        "status": {
            "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "images": [{"names": ["big"]}],
        },
    }
    node = kube.NodeRecord.from_raw(raw)
    assert node.metadata.name == "n1"
    assert node.metadata.labels == {"zone": "a"}
    assert node.spec.unschedulable is True
    assert node.spec.taints[0].key == "k"
    assert node.spec.taints[0].value is None
    assert node.status.conditions[0].status == "False"
    assert node.status.conditions[0].last_transition_time == "2026-01-01T00:00:00Z"
    assert kube.NodeRecord.from_raw(raw) == node  # equal records: a heartbeat is not a change


# --------------------------------------------------------------------------- the loop


class _Response:
    def __init__(self, body: bytes, chunks: list[bytes] | None = None) -> None:
        self.data = body
        self._chunks = chunks

    def stream(self, amt: Any = None, decode_content: bool = False) -> Iterator[bytes]:
        yield from self._chunks or []

    def release_conn(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def _obj(name: str, version: int, **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": str(version)}, **extra}


def _list(items: list[dict[str, Any]], version: int, token: str | None = None) -> _Response:
    metadata: dict[str, Any] = {"resourceVersion": str(version)}
    if token:
        metadata["continue"] = token
    return _Response(orjson.dumps({"items": items, "metadata": metadata}))


def _watch(*events: dict[str, Any], split: bool = False) -> _Response:
    body = b"".join(orjson.dumps(e) + b"\n" for e in events)
    chunks = [body[i : i + 7] for i in range(0, len(body), 7)] if split else [body]
    return _Response(b"", chunks)


class ScriptedLister:
    """Answers calls in order; records what was asked; stops the informer when out of answers."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = list(answers)
        self.calls: list[dict[str, Any]] = []
        self.synced: list[bool] = []  # whether the informer offered itself to readers at each call
        self.done = threading.Event()
        self.informer: kube.Informer[Any] | None = None

    def __call__(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        self.synced.append(self.informer is not None and self.informer.synced)
        if not self.answers:
            self.done.set()
            assert self.informer is not None
            self.informer._stopping.set()
            raise ConnectionError("script over")
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def run(answers: list[Any], **options: Any) -> tuple[kube.Informer[Any], ScriptedLister, list[str]]:
    lister = ScriptedLister(answers)
    deleted: list[str] = []
    informer: kube.Informer[Any] = kube.Informer(
        "things",
        lister,
        lambda raw: None if raw.get("skip") else {"v": raw.get("v")},
        on_delete=lambda key, _item: deleted.append(key),
        **options,
    )
    lister.informer = informer
    informer._pause = lambda backoff: backoff  # type: ignore[method-assign]
    informer.start()
    assert lister.done.wait(10), "the informer did not reach the end of the script"
    informer.stop()
    return informer, lister, deleted


def test_lists_in_pages_then_watches_from_the_lists_version() -> None:
    informer, lister, deleted = run(
        [
            _list([_obj("a", 1, v=1)], 5, token="next"),
            _list([_obj("b", 2, v=2), _obj("hidden", 3, skip=True)], 6),
            _watch(
                {"type": "MODIFIED", "object": _obj("a", 7, v=10)},
                {"type": "ADDED", "object": _obj("c", 8, v=3)},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}},
                {"type": "DELETED", "object": _obj("b", 10)},
                split=True,
            ),
        ],
        label_selector="app=x",
        page_size=1,
    )
    assert informer.synced
    assert dict(informer.snapshot().items) == {"a": {"v": 10}, "c": {"v": 3}}
    assert deleted == ["b"]
    first, second, watch, resumed = lister.calls
    assert first["limit"] == 1
    assert "_continue" not in first
    assert first["label_selector"] == "app=x"
    assert second["_continue"] == "next"
    assert watch["watch"] is True
    assert watch["resource_version"] == "6"
    assert resumed["resource_version"] == "10"  # after a stream ends: on from the last event seen


def test_an_expired_watch_lists_again_and_reports_what_went_meanwhile() -> None:
    gone = ApiException(status=410, reason="Gone")
    informer, lister, deleted = run(
        [
            _list([_obj("a", 1, v=1), _obj("b", 2, v=2)], 5),
            _watch({"type": "ERROR", "object": {"code": 410, "message": "too old"}}),
            _list([_obj("b", 2, v=2)], 20),
            gone,
            _list([_obj("b", 2, v=3)], 30),
        ]
    )
    assert dict(informer.snapshot().items) == {"b": {"v": 3}}
    assert deleted == ["a"]  # deleted while the watch was expired: noticed by the second list
    assert [c.get("watch", False) for c in lister.calls] == [False, True, False, True, False, True]


def test_a_refused_list_settles_unsynced_and_keeps_trying() -> None:
    refused = ApiException(status=403, reason="Forbidden")
    lister = ScriptedLister([refused, refused])
    informer: kube.Informer[Any] = kube.Informer("things", lister, dict)
    lister.informer = informer
    informer._pause = lambda backoff: backoff  # type: ignore[method-assign]
    informer.start()
    assert informer.wait_synced(5) is False  # refused: no use waiting for the whole timeout
    assert lister.done.wait(5)
    informer.stop()
    assert "403 Forbidden" in str(informer.error)
    assert len(lister.calls) == 3  # tried again after the refusal


def test_a_refused_watch_sends_readers_to_the_api_until_a_list_succeeds() -> None:
    forbidden = ApiException(status=403, reason="Forbidden")
    informer, lister, _ = run(
        [_list([_obj("a", 1, v=1)], 5), forbidden, _list([_obj("b", 2, v=2)], 9), _watch()],
    )
    assert lister.synced == [False, True, False, True, True]
    assert [c.get("watch", False) for c in lister.calls] == [False, True, False, True, True]
    assert informer.synced
    assert list(informer.snapshot().items) == ["b"]


def test_a_broken_stream_resumes_from_the_last_version() -> None:
    informer, lister, _ = run(
        [
            _list([], 5),
            _watch({"type": "ADDED", "object": _obj("a", 6, v=1)}),
            ConnectionResetError("reset"),
            _watch({"type": "ADDED", "object": _obj("b", 7, v=2)}),
        ]
    )
    assert sorted(informer.snapshot().items) == ["a", "b"]
    assert [c.get("resource_version") for c in lister.calls[1:4]] == ["5", "6", "6"]
    assert informer.error is not None
    assert "reset" in informer.error


def test_changes_are_reported_once_each_from_watches_and_relists() -> None:
    changes: list[tuple[Any, Any]] = []
    run(
        [
            _list([_obj("a", 1, v=1), _obj("b", 2, v=2)], 5),
            _watch(
                {"type": "MODIFIED", "object": _obj("a", 6, v=1)},  # nothing kept changed
                {"type": "MODIFIED", "object": _obj("a", 7, v=10)},
                {"type": "DELETED", "object": _obj("b", 8)},
                {"type": "ERROR", "object": {"code": 410, "message": "too old"}},
            ),
            # Meanwhile: c added, a changed again; the re-list says so.
            _list([_obj("a", 1, v=11), _obj("c", 9, v=3)], 20),
        ],
        on_change=lambda old, new: changes.append((old, new)),
    )
    assert sorted(changes[:2], key=str) == [(None, {"v": 1}), (None, {"v": 2})]  # the first list
    assert changes[2:4] == [({"v": 1}, {"v": 10}), ({"v": 2}, None)]
    assert sorted(changes[4:], key=str) == [(None, {"v": 3}), ({"v": 10}, {"v": 11})]


def test_a_failing_deletion_handler_does_not_stop_the_informer() -> None:
    lister = ScriptedLister(
        [
            _list([_obj("a", 1)], 2),
            _watch({"type": "DELETED", "object": _obj("a", 3)}, {"type": "ADDED", "object": _obj("b", 4)}),
        ]
    )

    def explode(key: str, item: Any) -> None:
        raise RuntimeError("boom")

    informer: kube.Informer[Any] = kube.Informer("things", lister, dict, on_delete=explode)
    lister.informer = informer
    informer._pause = lambda backoff: backoff  # type: ignore[method-assign]
    informer.start()
    assert lister.done.wait(5)
    informer.stop()
    assert list(informer.snapshot().items) == ["b"]


def test_only_synced_informers_are_offered_to_readers() -> None:
    informer: kube.Informer[Any] = kube.Informer("unsynced-test", ScriptedLister([]), dict)
    kube.register(informer)
    try:
        assert kube.informer("unsynced-test") is None
        informer._synced.set()
        assert kube.informer("unsynced-test") is informer
    finally:
        kube.stop_informers()
    assert kube.informer("unsynced-test") is None


@pytest.mark.parametrize("pool", [None, 32])
def test_api_client_pool_size(pool: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "load_incluster_config", lambda: None)
    api = kube.api_client(pool_size=pool)
    expected = pool or client.Configuration.get_default_copy().connection_pool_maxsize
    assert api.configuration.connection_pool_maxsize == expected
