from __future__ import annotations

import base64
import copy
import json
from typing import Any

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e2e import pod_strategies
from webhook.admission import BadReviewError, admit, json_patch, wants_volumes
from webhook.mutation import MutationError, wire_pod
from webhook.resolve import Catalog, CatalogEntry

SOURCE = {"hostPath": {"path": "/var/lib/kvc/team-a/datasets/cifar-1", "type": "Directory"}}
AFFINITY = {
    "requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "data.kvc.kubeflow.org/x", "operator": "Exists"}]}]
    }
}
ENTRIES = [CatalogEntry("datasets", "cifar", "Ready", "2/2 replicas ready", SOURCE, AFFINITY, "ReadOnlyMany")]


def catalog(namespace: str) -> Catalog:
    return Catalog(ENTRIES if namespace == "team-a" else [])


def review(obj: dict[str, Any], operation: str = "CREATE", namespace: str = "team-a") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {"uid": "0d6b-uid", "operation": operation, "namespace": namespace, "object": obj},
    }


def pod(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "annotations": annotations or {}},
        "spec": {"containers": [{"name": "main", "image": "x"}]},
    }


def patched(response: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    patch = json.loads(base64.b64decode(response["response"]["patch"]))
    result: dict[str, Any] = jsonpatch.apply_patch(copy.deepcopy(obj), patch)
    return result


def test_an_annotated_pod_gets_a_json_patch_and_the_uid_is_echoed() -> None:
    obj = pod({"kvc/volume": "cifar"})
    response = admit(review(obj), catalog)
    assert response["apiVersion"] == "admission.k8s.io/v1"
    assert response["response"]["uid"] == "0d6b-uid"
    assert response["response"]["allowed"] is True
    assert response["response"]["patchType"] == "JSONPatch"
    wired = patched(response, obj)
    assert wired["spec"]["volumes"][0]["hostPath"] == SOURCE["hostPath"]
    assert wired["spec"]["affinity"]["nodeAffinity"] == AFFINITY


def test_plain_pods_and_other_operations_pass_unchanged() -> None:
    for response in (admit(review(pod()), catalog), admit(review(pod({"kvc/volume": "cifar"}), "UPDATE"), catalog)):
        assert response["response"] == {"uid": "0d6b-uid", "allowed": True}


def test_denials_say_what_to_fix() -> None:
    response = admit(review(pod({"kvc/volume": "cifar"}), namespace="team-b"), catalog)
    assert response["response"]["allowed"] is False
    assert response["response"]["status"]["message"] == (
        "KVC: volume cifar not found in namespace team-b; volumes there: none"
    )
    bad = admit(review(pod({"kvc/volume": "cifar", "kvc/read-only": "maybe"})), catalog)
    assert "kvc/read-only must be" in bad["response"]["status"]["message"]


def test_a_pytorchjob_template_that_asks_is_wired_alone() -> None:
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "j"},
        "spec": {
            "pytorchReplicaSpecs": {
                "Master": {
                    "template": {
                        "metadata": {"annotations": {"kvc/volume": "cifar"}},
                        "spec": {"containers": [{"name": "pytorch"}]},
                    }
                },
                "Worker": {"template": {"metadata": {}, "spec": {"containers": [{"name": "pytorch"}]}}},
            }
        },
    }
    assert wants_volumes(job)
    wired = patched(admit(review(job), catalog), job)
    replicas = wired["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["template"]["spec"]["volumes"]
    assert "volumes" not in replicas["Worker"]["template"]["spec"]


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"kind": "AdmissionReview"},
        {"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "x"}},
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"},
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": ""}},
    ],
)
def test_malformed_reviews_are_rejected(body: Any) -> None:
    with pytest.raises(BadReviewError):
        admit(body, catalog)


_JSON = st.recursive(
    # The server parses bodies with orjson, which takes 64-bit integers only.
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)
_ANNOTATION_VALUES = st.sampled_from(["cifar", "datasets/cifar", "", ",", "a/b/c", "/data", "false", "x y"]) | st.text(
    max_size=12
)


@st.composite
def _shaky_objects(draw: st.DrawFn) -> Any:
    """Objects of any shape, often close to a Pod or a TFJob and carrying kvc/* annotations."""
    kind = draw(st.sampled_from(["Pod", "TFJob", "PyTorchJob"]))
    annotations = draw(
        st.dictionaries(
            st.sampled_from(["kvc/volume", "kvc/mount-path", "kvc/containers", "kvc/read-only", "kvc/x"]),
            _ANNOTATION_VALUES,
            max_size=4,
        )
    )
    annotations.setdefault("kvc/volume", "cifar")
    metadata = draw(st.sampled_from([{"annotations": annotations}, {"annotations": draw(_JSON)}, draw(_JSON)]))
    template = {"metadata": metadata, "spec": draw(st.sampled_from([pod()["spec"], draw(_JSON)]))}
    spec = {
        "Pod": draw(st.sampled_from([pod()["spec"], draw(_JSON)])),
        "TFJob": {"tfReplicaSpecs": draw(st.sampled_from([{"Worker": {"template": template}}, draw(_JSON)]))},
        "PyTorchJob": {"pytorchReplicaSpecs": {"Master": draw(st.sampled_from([{"template": template}, draw(_JSON)]))}},
    }[kind]
    return {"kind": kind, "metadata": metadata, "spec": spec}


@settings(max_examples=500, deadline=None)
@given(_shaky_objects())
def test_any_object_gets_an_answer_never_a_crash(obj: Any) -> None:
    response = admit(review(obj), catalog)["response"]
    assert response["uid"] == "0d6b-uid"
    if response["allowed"] and "patch" in response:
        patched(admit(review(obj), catalog), obj)  # the patch applies to what was sent
    if not response["allowed"]:
        assert response["status"]["message"].startswith("KVC: ")


@settings(max_examples=300, deadline=None)
@given(pod_strategies.cases())
def test_the_patch_of_the_differing_parts_turns_the_pod_into_the_wired_pod(case: pod_strategies.Case) -> None:
    try:
        wired = wire_pod(case.pod, case.request, case.volumes)
    except MutationError:
        return
    patch = json_patch(case.pod, wired)
    assert jsonpatch.apply_patch(copy.deepcopy(case.pod), patch) == wired
    assert all(op["op"] in ("add", "replace") for op in patch)  # wiring never removes or moves anything
