"""AdmissionReview in, AdmissionReview out (pure): the decision for one request.

The server parses the body, looks nothing up itself, and hands this module the review
and a way to list the namespace's volumes (from its in-memory index). The response
always echoes ``request.uid``; denials carry a message that says what to fix.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from typing import Any

import jsonpatch
import orjson

from webhook import grammar
from webhook.mutation import REPLICA_SPECS, MutationError, check_pod_shape, job_templates, json_copy, wire_job, wire_pod
from webhook.resolve import Catalog, resolve

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
    annotations = _get(obj, "metadata", "annotations")
    return isinstance(annotations, dict) and grammar.VOLUME in annotations


def _without_common_parts(src: Any, dst: Any) -> tuple[Any, Any]:
    """``src`` and ``dst`` stripped of what they share, for a cheaper diff giving the same patch.

    Object members equal on both sides are dropped (members are addressed by name, so no
    path moves); list items equal at the same index become the same empty placeholder (so
    indexes stay put and the differ sees no change there). The wiring only adds members and
    appends items, so the differ never has to move a placeholder; the property tests check
    that the patch, applied to the original, gives the wired object.
    """
    if isinstance(src, dict) and isinstance(dst, dict):
        small_src: dict[str, Any] = {}
        small_dst: dict[str, Any] = {}
        for key, value in src.items():
            if key not in dst:
                small_src[key] = value
            elif value != dst[key]:
                small_src[key], small_dst[key] = _without_common_parts(value, dst[key])
        for key, value in dst.items():
            if key not in src:
                small_dst[key] = value
        return small_src, small_dst
    if isinstance(src, list) and isinstance(dst, list):
        small_src_items: list[Any] = []
        small_dst_items: list[Any] = []
        for index in range(max(len(src), len(dst))):
            if index >= len(src):
                small_dst_items.append(dst[index])
            elif index >= len(dst):
                small_src_items.append(src[index])
            elif src[index] == dst[index]:
                small_src_items.append({})
                small_dst_items.append({})
            else:
                item_src, item_dst = _without_common_parts(src[index], dst[index])
                small_src_items.append(item_src)
                small_dst_items.append(item_dst)
        return small_src_items, small_dst_items
    return src, dst


def json_patch(original: Any, wired: Any) -> list[dict[str, Any]]:
    """The JSON Patch from ``original`` to ``wired`` (jsonpatch's diff of their differing parts)."""
    src, dst = _without_common_parts(original, wired)
    patch: list[dict[str, Any]] = jsonpatch.make_patch(src, dst).patch
    return patch


def wants_volumes(obj: Mapping[str, Any]) -> bool:
    """The fast path: does the object (or a pod template in it) ask for a KVC volume at all?"""
    if _asks(obj):
        return True
    field = REPLICA_SPECS.get(str(obj.get("kind")))
    replicas = _get(obj, "spec", field) if field else None
    return isinstance(replicas, dict) and any(_asks(_get(r, "template")) for r in replicas.values())


def _wire(obj: Mapping[str, Any], namespace: str, lookup: Lookup) -> dict[str, Any]:
    kind = str(obj.get("kind"))
    entries = lookup(namespace)
    if kind == "Pod":
        check_pod_shape(obj)
        request = grammar.parse(obj.get("metadata", {}).get("annotations", {}))
        if request is None:
            return dict(obj)
        return wire_pod(obj, request, resolve(request, namespace, entries))
    if kind in REPLICA_SPECS:
        job_annotations = _get(obj, "metadata", "annotations")
        job_request = grammar.parse(job_annotations) if isinstance(job_annotations, dict) else None
        if job_request is not None:
            return wire_job(obj, job_request, resolve(job_request, namespace, entries))
        # Only some templates ask: wire each of those as the pod it describes.
        wired: dict[str, Any] = json_copy(obj)
        replicas = wired["spec"][REPLICA_SPECS[kind]]
        for role, template in job_templates(obj):
            request = grammar.parse(template.get("metadata", {}).get("annotations", {}))
            if request is not None:
                replicas[role]["template"] = wire_pod(template, request, resolve(request, namespace, entries))
        return wired
    return dict(obj)


def admit(review: Any, lookup: Lookup) -> dict[str, Any]:
    """The AdmissionReview response for ``review``; raises BadReviewError for a malformed one."""
    request = _request(review)
    uid = request["uid"]
    obj = request.get("object")
    if request.get("operation") != "CREATE" or not isinstance(obj, dict) or not wants_volumes(obj):
        return _response(uid, allowed=True)
    namespace = str(request.get("namespace") or (obj.get("metadata") or {}).get("namespace") or "")
    try:
        wired = _wire(obj, namespace, lookup)
    except (grammar.GrammarError, MutationError) as exc:
        return _response(uid, allowed=False, message=f"KVC: {exc}")
    return _response(uid, allowed=True, patch=json_patch(obj, wired))
