"""AdmissionReview in, AdmissionReview out (pure): the decision for one request.

The server parses the body, looks nothing up itself, and hands this module the review
and a way to list the namespace's volumes (from its in-memory index). The response
always echoes ``request.uid``; denials carry a message that says what to fix.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jsonpatch

from webhook import grammar
from webhook.mutation import REPLICA_SPECS, MutationError, check_pod_shape, job_templates, wire_job, wire_pod
from webhook.resolve import CatalogEntry, resolve

REVIEW_VERSION = "admission.k8s.io/v1"
Catalog = Callable[[str], Iterable[CatalogEntry]]


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
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
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


def wants_volumes(obj: Mapping[str, Any]) -> bool:
    """The fast path: does the object (or a pod template in it) ask for a KVC volume at all?"""
    if _asks(obj):
        return True
    field = REPLICA_SPECS.get(str(obj.get("kind")))
    replicas = _get(obj, "spec", field) if field else None
    return isinstance(replicas, dict) and any(_asks(_get(r, "template")) for r in replicas.values())


def _wire(obj: Mapping[str, Any], namespace: str, catalog: Catalog) -> dict[str, Any]:
    kind = str(obj.get("kind"))
    entries = list(catalog(namespace))
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
        wired = copy.deepcopy(dict(obj))
        replicas = wired["spec"][REPLICA_SPECS[kind]]
        for role, template in job_templates(obj):
            request = grammar.parse(template.get("metadata", {}).get("annotations", {}))
            if request is not None:
                replicas[role]["template"] = wire_pod(template, request, resolve(request, namespace, entries))
        return wired
    return dict(obj)


def admit(review: Any, catalog: Catalog) -> dict[str, Any]:
    """The AdmissionReview response for ``review``; raises BadReviewError for a malformed one."""
    request = _request(review)
    uid = request["uid"]
    obj = request.get("object")
    if request.get("operation") != "CREATE" or not isinstance(obj, dict) or not wants_volumes(obj):
        return _response(uid, allowed=True)
    namespace = str(request.get("namespace") or (obj.get("metadata") or {}).get("namespace") or "")
    try:
        wired = _wire(obj, namespace, catalog)
    except (grammar.GrammarError, MutationError) as exc:
        return _response(uid, allowed=False, message=f"KVC: {exc}")
    return _response(uid, allowed=True, patch=jsonpatch.make_patch(obj, wired).patch)
