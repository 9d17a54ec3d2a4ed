"""AdmissionReview in, AdmissionReview out (pure): the decision for one request.

The server parses the body, looks nothing up itself, and hands this module the review
and a way to list the namespace's volumes (from its in-memory index). The response
always echoes ``request.uid``; denials carry a message that says what to fix.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from kvc.wiring import grammar
from kvc.wiring.mutation import (
    WORKLOADS,
    Denial,
    MutationError,
    check_metadata,
    guard_ephemeral_containers,
    json_copy,
    pod_templates,
    set_template,
    wire_job,
    wire_pod,
)
from kvc.wiring.resolve import Catalog, resolve

REVIEW_VERSION = "admission.k8s.io/v1"
# The volumes of a namespace, from the in-memory index.
Lookup = Callable[[str], Catalog]


class BadReviewError(ValueError):
    """Not an AdmissionReview v1 request: answered with HTTP 400."""


def _request(review: Any) -> Mapping[str, Any]:
    if not isinstance(review, dict):
        raise BadReviewError("the body must be a JSON object")
    if review.get("apiVersion") != REVIEW_VERSION or review.get("kind") != "AdmissionReview":
        raise BadReviewError(f"expected an AdmissionReview of {REVIEW_VERSION}")
    request = review.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str) or not request["uid"]:
        raise BadReviewError("the AdmissionReview has no request.uid")
    return request


def _response(uid: str, allowed: bool, message: str = "", patch: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if message:
        response["status"] = {"code": 403 if not allowed else 200, "message": message}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(orjson.dumps(patch)).decode()
    return {"apiVersion": REVIEW_VERSION, "kind": "AdmissionReview", "response": response}


def _get(obj: Any, *path: str) -> Any:
    """The value at ``path`` in nested objects, or None when any step is missing or not an object."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _asks(obj: Any) -> bool:
    """Any ``kvc/*`` key, not only kvc/volume: a misspelt or stray key must reach the
    grammar and be refused with a message, never be admitted as if it were not there."""
    annotations = _get(obj, "metadata", "annotations")
    return isinstance(annotations, dict) and any(key.startswith(grammar.PREFIX) for key in annotations)


def _same(old: Any, new: Any) -> bool:
    # Python's == takes 1, 1.0 and True for one another. The type check sees such a change
    # where the value itself is compared, but not deeper inside equal-looking containers;
    # the wiring copies the pod exactly and only adds members and items, so it never makes
    # one. (A strict comparison would walk every unchanged part of the pod in Python.)
    return old == new and type(old) is type(new)


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _diff(old: Any, new: Any, path: str, patch: list[dict[str, Any]]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old.keys() - new.keys():
            patch.append({"op": "remove", "path": f"{path}/{_escape(key)}"})
        for key, value in new.items():
            if key not in old:
                patch.append({"op": "add", "path": f"{path}/{_escape(key)}", "value": value})
            elif not _same(old[key], value):
                _diff(old[key], value, f"{path}/{_escape(key)}", patch)
    elif isinstance(old, list) and isinstance(new, list) and len(new) >= len(old):
        for index, item in enumerate(old):
            if not _same(item, new[index]):
                _diff(item, new[index], f"{path}/{index}", patch)
        for index in range(len(old), len(new)):
            patch.append({"op": "add", "path": f"{path}/{index}", "value": new[index]})
    else:
        patch.append({"op": "replace", "path": path, "value": new})


def json_patch(original: Any, wired: Any) -> list[dict[str, Any]]:
    """The JSON Patch (RFC 6902) that turns ``original`` into ``wired``.

    Built for what the wiring does: members added to objects become ``add`` at their key,
    items appended to lists ``add`` at their index, and only the parts that differ are
    visited. Every path is taken from the two objects themselves, so an ``add`` always
    lands in an object or list that exists in the original. Anything else (a member gone,
    a list that shrank, a value of another type) is still patched correctly, as
    ``remove`` or ``replace`` of that part. Tests apply these patches with jsonpatch and
    compare with jsonpatch's own diff.
    """
    patch: list[dict[str, Any]] = []
    if not _same(original, wired):
        _diff(original, wired, "", patch)
    return patch


def wants_volumes(obj: Mapping[str, Any]) -> bool:
    """The fast path: does the object (or a pod template in it) carry any ``kvc/*`` annotation?

    A TrainJob asks on itself only: the templates in its runtime patches are not its pods'
    templates but patches to its runtime's, and the pod hook wires the pods they reach.
    """
    if _asks(obj):
        return True
    workload = WORKLOADS.get(str(obj.get("kind")))
    if workload is None or workload.patched:
        return False
    return any(_asks(template.template) for template in pod_templates(obj, strict=False))


def _made_by_a_trainjob(obj: Mapping[str, Any]) -> bool:
    """The JobSet Kubeflow Trainer makes from a TrainJob: its training template carries KVC's
    runtime patch (volumes, mounts, kvc/* annotations) already, and the pod hook places each pod
    made from it; a gate or affinity added here would be the Trainer's to keep or revert."""
    owners = _get(obj, "metadata", "ownerReferences")
    return isinstance(owners, list) and any(
        isinstance(owner, dict) and owner.get("kind") == "TrainJob" and owner.get("controller") for owner in owners
    )


def _wire(obj: Mapping[str, Any], namespace: str, lookup: Lookup) -> dict[str, Any]:
    kind = str(obj.get("kind"))
    entries = lookup(namespace)
    if kind == "Pod":
        check_metadata(obj, "the pod")  # the grammar reads the annotations; wire_pod checks the rest
        request = grammar.parse(obj.get("metadata", {}).get("annotations", {}))
        if request is None:
            return dict(obj)
        return wire_pod(obj, request, resolve(request, namespace, entries))
    if kind in WORKLOADS:
        # The job's own metadata is as typed as the installed CRD's schema: check it before
        # the grammar reads its annotations.
        check_metadata(obj, f"the {kind}")
        job_annotations = _get(obj, "metadata", "annotations")
        job_request = grammar.parse(job_annotations) if isinstance(job_annotations, dict) else None
        if job_request is not None:
            return wire_job(obj, job_request, resolve(job_request, namespace, entries))
        if WORKLOADS[kind].patched or _made_by_a_trainjob(obj):
            return dict(obj)
        # Only some templates ask: wire each of those as the pod it describes.
        wired: dict[str, Any] = json_copy(obj)
        for template in pod_templates(obj):
            request = grammar.parse(template.template.get("metadata", {}).get("annotations", {}))
            if request is not None:
                volumes = resolve(request, namespace, entries)
                set_template(wired, template, wire_pod(template.template, request, volumes))
        return wired
    return dict(obj)


@dataclass(frozen=True)
class Decision:
    """The AdmissionReview to answer with, and, for a refusal, what it is about."""

    review: dict[str, Any]
    denial: Denial | None = None
    namespace: str = ""  # the workload's, when its volumes were looked up


def _denied(uid: str, exc: Exception, namespace: str = "") -> Decision:
    reason = exc.reason if isinstance(exc, MutationError) else Denial.INVALID
    return Decision(_response(uid, allowed=False, message=f"KVC: {exc}"), reason, namespace)


def decide(review: Any, lookup: Lookup) -> Decision:
    """The decision on ``review``; raises BadReviewError for a malformed one."""
    request = _request(review)
    uid = request["uid"]
    obj = request.get("object")
    if request.get("operation") == "CREATE" and not isinstance(obj, dict):
        raise BadReviewError("the AdmissionReview has no request.object")
    if request.get("subResource") == "ephemeralcontainers" and isinstance(obj, dict) and obj.get("kind") == "Pod":
        # kubectl debug adds a container to a running pod: it must not write what the pod reads.
        try:
            guarded = guard_ephemeral_containers(obj)
        except MutationError as exc:
            return _denied(uid, exc)
        return Decision(_response(uid, allowed=True, patch=json_patch(obj, guarded)))
    if request.get("operation") != "CREATE" or not isinstance(obj, dict) or not wants_volumes(obj):
        return Decision(_response(uid, allowed=True))
    namespace = str(request.get("namespace") or (obj.get("metadata") or {}).get("namespace") or "")
    try:
        wired = _wire(obj, namespace, lookup)
    except (grammar.GrammarError, MutationError) as exc:
        return _denied(uid, exc, namespace)
    return Decision(_response(uid, allowed=True, patch=json_patch(obj, wired)), namespace=namespace)


def admit(review: Any, lookup: Lookup) -> dict[str, Any]:
    """The AdmissionReview response for ``review``; raises BadReviewError for a malformed one."""
    return decide(review, lookup).review
