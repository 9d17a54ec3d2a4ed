"""The bad-input corpus (tests/corpus/*.yaml) at unit level.

Admission cases go through the webhook's real HTTP app in-process, against an index of
the corpus' catalog. VolumeManager cases that the controller must turn Failed go through
its reconcile pass with a cluster that holds nothing: validation alone decides them, so
they must never reach the cluster. Cases the API server itself refuses run in
e2e/test_corpus.py only.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable, Mapping
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from kvc.controller import reconcile, status
from kvc.policy import AdminPolicy, NfsExport
from kvc.sources.base import SourceContext
from kvc.sources.registry import load_registry
from kvc.testing.corpus import (
    ADMISSION,
    ADMISSION_OUTCOMES,
    ADMISSION_REQUESTS,
    ALLOWED_DATA_ROOT,
    ALLOWED_NFS_SERVERS,
    FAILED,
    VOLUMEMANAGER_CASES,
    VOLUMEMANAGER_OUTCOMES,
    expected_text,
    failed_messages,
    failed_summary,
    ids,
    outcome,
    workload,
)
from webhook.index import VolumeIndex
from webhook.server import MAX_BODY, make_app

CATALOG_NAMESPACE: str = ADMISSION["catalog"]["namespace"]
ADMISSION_CASES: list[dict[str, Any]] = ADMISSION["cases"]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Deeper than any JSON parser's nesting limit.
NESTING = 100_000


# --------------------------------------------------------------------------- the corpus itself


@pytest.mark.parametrize(
    ("cases", "outcomes", "requests"),
    [
        (VOLUMEMANAGER_CASES, VOLUMEMANAGER_OUTCOMES, ("volumes", "spec")),
        (ADMISSION_CASES, ADMISSION_OUTCOMES, ADMISSION_REQUESTS),
    ],
    ids=["volumemanagers", "admission"],
)
def test_every_case_is_named_explained_and_has_one_request_and_one_outcome(
    cases: list[dict[str, Any]], outcomes: tuple[str, ...], requests: tuple[str, ...]
) -> None:
    names = [case["name"] for case in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    for case in cases:
        assert DNS_LABEL.match(case["name"]), case["name"]
        assert len(case["name"]) <= 63, case["name"]
        assert str(case.get("why", "")).strip(), f"{case['name']} needs a why"
        assert sum(request in case for request in requests) == 1, f"{case['name']} needs one of {requests}"
        outcome(case, outcomes)


def test_the_corpus_holds_at_least_fifty_cases_of_each_kind() -> None:
    assert len(VOLUMEMANAGER_CASES) >= 50
    assert len(ADMISSION_CASES) >= 50


# --------------------------------------------------------------------------- VolumeManagers


class EmptyCluster:
    """A cluster with nothing in it: lists are empty, and anything else is a test failure,
    because a volume that fails validation must never make KVC create or change objects."""

    def __getattr__(self, call: str) -> Callable[..., Any]:
        if call.startswith("__"):  # copy, pickle and friends probe for these
            raise AttributeError(call)
        if not call.startswith("list_"):
            raise AssertionError(f"a volume that fails validation made KVC call {call}")

        def empty(*args: Any, **kwargs: Any) -> Any:
            # CustomObjectsApi answers with dicts, CoreV1Api with objects.
            return {"items": []} if "custom_object" in call else SimpleNamespace(items=[])

        return empty


@pytest.fixture(scope="module")
def registry() -> Any:
    return load_registry()


@pytest.mark.parametrize("case", FAILED, ids=ids(FAILED))
def test_malformed_volumemanager_is_reported_failed_with_its_message(registry: Any, case: dict[str, Any]) -> None:
    body = {
        "metadata": {"name": case["name"], "namespace": "corpus", "uid": "0b6e7c2a-corpus", "generation": 1},
        "spec": {"volumeConfigs": case["volumes"]},
    }
    ctx = SourceContext(
        owner=reconcile.owner_of(body),
        core=EmptyCluster(),
        custom=EmptyCluster(),
        allowed_data_roots=(ALLOWED_DATA_ROOT,),
        policy=AdminPolicy(nfs_exports=tuple(NfsExport.parse(server) for server in ALLOWED_NFS_SERVERS)),
    )
    result = reconcile.reconcile(body, ctx, registry)
    assert [(v.phase.value, v.message) for v in result.volumes] == [
        ("Failed", message) for message in failed_messages(case)
    ]
    summary = status.aggregate(result.volumes, generation=1, notes=result.notes)
    assert (summary["state"], summary["message"]) == ("Failed", failed_summary(case))


# --------------------------------------------------------------------------- admission


def catalog_index() -> VolumeIndex:
    """The corpus' catalog as the webhook's index holds it: statuses as the controller
    reports them (claims for NFS and PVC volumes, no volume source once Failed)."""
    objects = []
    for manager in ADMISSION["catalog"]["volumemanagers"]:
        volumes = []
        for volume in manager["volumes"]:
            config = volume["config"]
            reported: dict[str, Any] = {
                "id": config["id"],
                "phase": volume["phase"],
                "message": volume.get("message", "as the controller reports it"),
            }
            if volume["phase"] != "Failed":
                claim = {"claimName": f"{manager['name']}-{config['id']}", "readOnly": False}
                reported["volumeSource"] = {"persistentVolumeClaim": claim}
            volumes.append(reported)
        objects.append(
            {
                "metadata": {"name": manager["name"], "namespace": CATALOG_NAMESPACE},
                "spec": {"volumeConfigs": [volume["config"] for volume in manager["volumes"]]},
                "status": {"volumes": volumes},
            }
        )
    index = VolumeIndex()
    index.replace_all(objects)
    return index


def review_of(case: Mapping[str, Any]) -> dict[str, Any]:
    """The AdmissionReview the API server would send for a `pod` or `job` case."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": f"uid-{case['name']}",
            "operation": case.get("operation", "CREATE"),
            "namespace": CATALOG_NAMESPACE,
            "object": workload(case),
        },
    }


async def _over_the_cap() -> AsyncIterator[bytes]:
    chunk = b" " * (1 << 20)
    for _ in range(MAX_BODY // len(chunk) + 1):
        yield chunk


def request_body(case: Mapping[str, Any]) -> Any:
    """What the case POSTs: bytes, or an async iterator for a chunked body."""
    if "body" in case:
        body = case["body"]
        return body if isinstance(body, bytes) else str(body).encode()
    generated = case.get("generated")
    if generated == "oversize":
        return b" " * (MAX_BODY + 1)
    if generated == "oversize-chunked":
        return _over_the_cap()
    if generated == "deep-nesting":
        return b"[" * NESTING + b"]" * NESTING
    if generated is not None:
        raise ValueError(f"unknown generated body {generated!r} in {case['name']}")
    review = case["review"] if "review" in case else review_of(case)
    return json.dumps(review).encode()


def expected_uid(case: Mapping[str, Any]) -> Any:
    return case["review"]["request"]["uid"] if "review" in case else f"uid-{case['name']}"


@pytest.mark.parametrize("case", ADMISSION_CASES, ids=ids(ADMISSION_CASES))
def test_malformed_admission_request_gets_its_answer(case: dict[str, Any]) -> None:
    async def post() -> tuple[int, Any]:
        async with TestClient(TestServer(make_app(catalog_index()))) as http:
            response = await http.post("/mutate", data=request_body(case), headers={"Content-Type": "application/json"})
            return response.status, await response.json()

    code, answer = asyncio.run(post())
    kind = outcome(case, ADMISSION_OUTCOMES)
    if kind == "http":
        expected = case["http"]
        assert (code, answer) == (expected["status"], {"error": expected["error"]})
        return
    assert code == 200, answer
    response = answer["response"]
    if kind == "allow":
        assert case["allow"] == "unchanged", "the corpus holds only near misses admitted unchanged"
        assert response == {"uid": expected_uid(case), "allowed": True}
        return
    message = expected_text(case["deny"], CATALOG_NAMESPACE)
    assert response == {"uid": expected_uid(case), "allowed": False, "status": {"code": 403, "message": message}}
