from __future__ import annotations

import base64
import copy
import json
from typing import Any

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvc.testing import strategies as pod_strategies
from kvc.wiring.mutation import TRAINJOB_MANAGER, Denial, MutationError, wire_pod
from kvc.wiring.resolve import Catalog, CatalogEntry
from webhook.admission import BadReviewError, admit, decide, json_patch, wants_volumes

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


def jobset(templates: dict[str, dict[str, str]], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A JobSet whose replicated jobs have these pod template annotations."""
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": "js", "annotations": annotations or {}},
        "spec": {
            "replicatedJobs": [
                {"name": name, "template": {"spec": {"template": pod(template_annotations)}}}
                for name, template_annotations in templates.items()
            ]
        },
    }


def leaderworkerset(leader: dict[str, str], worker: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": "lws"},
        "spec": {"leaderWorkerTemplate": {"leaderTemplate": pod(leader), "workerTemplate": pod(worker)}},
    }


def trainjob(annotations: dict[str, str], patch_annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A TrainJob; ``patch_annotations``: those of a pod template in a runtime patch of another manager."""
    job: dict[str, Any] = {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": "tj", "annotations": annotations},
        "spec": {"runtimeRef": {"name": "torch-distributed"}},
    }
    if patch_annotations is not None:
        node = {"name": "node", "template": {"spec": {"template": {"metadata": {"annotations": patch_annotations}}}}}
        job["spec"]["runtimePatches"] = [
            {"manager": "example.com/team", "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node]}}}}
        ]
    return job


def test_a_jobset_template_that_asks_is_wired_alone() -> None:
    job = jobset({"driver": {}, "workers": {"kvc/volume": "cifar"}})
    assert wants_volumes(job)
    wired = patched(admit(review(job), catalog), job)
    driver, workers = (j["template"]["spec"]["template"] for j in wired["spec"]["replicatedJobs"])
    assert "volumes" not in driver["spec"]
    assert [v["name"] for v in workers["spec"]["volumes"]] == ["kvc-datasets-cifar"]
    assert admit(review(wired), catalog)["response"].get("patch") is None  # reinvoked: nothing more to add


def test_the_jobset_a_trainjob_makes_is_left_to_the_pod_hook() -> None:
    """Its training template carries KVC's runtime patch already; the Trainer owns the rest."""
    job = jobset({"node": {"kvc/volume": "cifar"}})
    owner = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "name": "tj", "uid": "u"}
    job["metadata"]["ownerReferences"] = [{**owner, "controller": True}]
    assert admit(review(job), catalog)["response"] == {"uid": "0d6b-uid", "allowed": True}
    # Only a TrainJob controlling it: a JobSet merely referring to one is wired as usual.
    job["metadata"]["ownerReferences"] = [owner]
    assert admit(review(job), catalog)["response"].get("patch")


def test_a_leaderworkerset_asking_on_its_leader_template_alone_wires_the_leader() -> None:
    lws = leaderworkerset({"kvc/volume": "cifar"}, {})
    assert wants_volumes(lws)
    wired = patched(admit(review(lws), catalog), lws)
    groups = wired["spec"]["leaderWorkerTemplate"]
    assert groups["leaderTemplate"]["spec"]["volumes"]
    assert "volumes" not in groups["workerTemplate"]["spec"]


def test_a_trainjob_asking_on_itself_gets_a_runtime_patch_once() -> None:
    job = trainjob({"kvc/volume": "cifar"})
    response = admit(review(job), catalog)["response"]
    assert response["allowed"] is True
    wired = patched({"response": response}, job)
    assert [p["manager"] for p in wired["spec"]["runtimePatches"]] == [TRAINJOB_MANAGER]
    assert admit(review(wired), catalog)["response"].get("patch") is None


def test_a_trainjob_is_asked_for_on_itself_only() -> None:
    """Its runtime patches are not its pods' templates but patches to its runtime's: the pod hook
    wires the pods they reach, and the TrainJob itself takes the fast path."""
    job = trainjob({}, patch_annotations={"kvc/volume": "cifar"})
    assert not wants_volumes(job)
    assert admit(review(job), catalog)["response"] == {"uid": "0d6b-uid", "allowed": True}


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (jobset({"workers": {"kvc/volumes": "cifar"}}), "KVC: unknown annotation kvc/volumes"),
        (leaderworkerset({}, {"kvc/volumes": "cifar"}), "KVC: unknown annotation kvc/volumes"),
        (trainjob({"kvc/volumes": "cifar"}), "KVC: unknown annotation kvc/volumes"),
        (trainjob({"kvc/volume": "nope"}), "KVC: volume nope not found in namespace team-a"),
        ({**jobset({}, {"kvc/volume": "cifar"}), "spec": {}}, "KVC: JobSet has no spec.replicatedJobs to wire"),
        (
            {**leaderworkerset({}, {}), "metadata": {"annotations": {"kvc/volume": "cifar"}}, "spec": {}},
            "KVC: LeaderWorkerSet has no pod template at spec.leaderWorkerTemplate.workerTemplate",
        ),
    ],
)
def test_workload_denials_say_what_to_fix(obj: dict[str, Any], message: str) -> None:
    assert wants_volumes(obj)
    response = admit(review(obj), catalog)["response"]
    assert response["allowed"] is False
    assert response["status"]["message"].startswith(message)


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({"kvc/volumes": "cifar"}, "KVC: unknown annotation kvc/volumes (did you mean kvc/volume?)"),
        ({"kvc/x": "1", "team": "vision"}, "KVC: unknown annotation kvc/x: KVC reads kvc/volume"),
        ({"kvc/mount-path": "/data"}, "KVC: kvc/mount-path given without kvc/volume"),
        ({"kvc/volume": "cifar", "kvc/readonly": "true"}, "KVC: unknown annotation kvc/readonly"),
    ],
)
def test_any_kvc_key_goes_to_the_grammar_even_without_kvc_volume(annotations: dict[str, str], message: str) -> None:
    obj = pod(annotations)
    assert wants_volumes(obj)
    response = admit(review(obj), catalog)["response"]
    assert response["allowed"] is False
    assert response["status"]["message"].startswith(message)


def test_keys_that_only_look_like_ours_take_the_fast_path() -> None:
    obj = pod({"kvc.kubeflow.org/injected": "[]", "example.com/kvc/volume": "cifar", "kvc": "x"})
    assert not wants_volumes(obj)
    assert admit(review(obj), catalog)["response"] == {"uid": "0d6b-uid", "allowed": True}


@pytest.mark.parametrize("where", ["job", "template"])
def test_a_misspelt_key_on_a_job_or_its_template_is_refused(where: str) -> None:
    template: dict[str, Any] = {"metadata": {}, "spec": {"containers": [{"name": "tensorflow"}]}}
    job: dict[str, Any] = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "TFJob",
        "metadata": {"name": "j"},
        "spec": {"tfReplicaSpecs": {"Worker": {"template": template}}},
    }
    (job if where == "job" else template)["metadata"]["annotations"] = {"kvc/volumes": "cifar"}
    assert wants_volumes(job)
    response = admit(review(job), catalog)["response"]
    assert response["allowed"] is False
    assert "unknown annotation kvc/volumes" in response["status"]["message"]


def test_a_job_annotation_that_is_not_a_string_is_refused_not_a_crash() -> None:
    job = {
        "kind": "PyTorchJob",
        "metadata": {"annotations": {"kvc/volume": 7}},
        "spec": {"pytorchReplicaSpecs": {"Master": {"template": pod()}}},
    }
    response = admit(review(job), catalog)["response"]
    assert response["allowed"] is False
    assert "metadata.annotations[kvc/volume] must be a string" in response["status"]["message"]


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
    """Objects of any shape, often close to a Pod or a training workload and carrying kvc/* annotations."""
    kind = draw(st.sampled_from(["Pod", "TFJob", "PyTorchJob", "JobSet", "LeaderWorkerSet", "TrainJob"]))
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
        "JobSet": {
            "replicatedJobs": [draw(st.sampled_from([{"template": {"spec": {"template": template}}}, draw(_JSON)]))]
        },
        "LeaderWorkerSet": {
            "leaderWorkerTemplate": draw(
                st.sampled_from([{"workerTemplate": template, "leaderTemplate": template}, draw(_JSON)])
            )
        },
        "TrainJob": {
            "runtimePatches": draw(
                st.sampled_from(
                    [
                        [{"manager": TRAINJOB_MANAGER, "trainingRuntimeSpec": draw(_JSON)}],
                        [{"manager": "example.com/x", "trainingRuntimeSpec": {"template": {"spec": draw(_JSON)}}}],
                        draw(_JSON),
                    ]
                )
            )
        },
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
def test_the_patch_turns_the_pod_into_the_wired_pod_as_jsonpatch_would(case: pod_strategies.Case) -> None:
    try:
        wired = wire_pod(case.pod, case.request, case.volumes)
    except MutationError:
        return
    patch = json_patch(case.pod, wired)
    assert jsonpatch.apply_patch(copy.deepcopy(case.pod), patch) == wired
    assert all(op["op"] in ("add", "replace") for op in patch)  # wiring never removes or moves anything
    # jsonpatch's own diff of the same pair: the same result, and never a shorter patch.
    reference = jsonpatch.make_patch(case.pod, wired).patch
    assert jsonpatch.apply_patch(copy.deepcopy(case.pod), reference) == wired
    assert len(patch) <= len(reference)
    assert json_patch(wired, wire_pod(wired, case.request, case.volumes)) == []  # a second pass adds nothing


# Leaves without booleans and floats: Python's == takes 1, 1.0 and True for one another
# inside containers, and the wiring never turns one into another (see admission._same).
# The jsonpatch library that checks the patches refuses `replace` at a key named "-" even in
# an object (RFC 6901 gives "-" a meaning in arrays only); no Kubernetes field is named so.
_KEYS = st.text(max_size=3).filter(lambda key: key != "-")
_PLAIN_JSON = st.recursive(
    st.none() | st.integers() | st.text(max_size=4),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["a", "b", "a/b", "~0", "~1/", ""]) | _KEYS, children, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def _json_pairs(draw: st.DrawFn) -> tuple[Any, Any]:
    """A document and another: often the first with parts changed, added or removed."""
    original = draw(st.dictionaries(_KEYS, _PLAIN_JSON, max_size=4))
    changed = draw(
        st.sampled_from(
            [
                draw(st.dictionaries(_KEYS, _PLAIN_JSON, max_size=4)),
                {**original, **draw(st.dictionaries(_KEYS, _PLAIN_JSON, max_size=2))},
                {key: draw(_PLAIN_JSON) if draw(st.booleans()) else value for key, value in original.items()},
                {key: value for key, value in original.items() if draw(st.booleans())},
                {
                    key: (value + draw(st.lists(_PLAIN_JSON, max_size=3)) if isinstance(value, list) else value)
                    for key, value in original.items()
                },
            ]
        )
    )
    return original, changed


@settings(max_examples=500, deadline=None)
@given(_json_pairs())
def test_the_patch_of_any_two_documents_turns_one_into_the_other(pair: tuple[Any, Any]) -> None:
    original, changed = pair
    before = copy.deepcopy(original)
    patch = json_patch(original, changed)
    assert original == before  # the differ reads, never writes
    assert jsonpatch.apply_patch(copy.deepcopy(original), patch) == changed
    if original == changed:
        assert patch == []


@pytest.mark.parametrize(
    ("original", "changed", "expected"),
    [
        (
            {"a": 1, "b": 0},
            {"a": True, "b": 0, "c": 1.0},
            [
                {"op": "replace", "path": "/a", "value": True},
                {"op": "add", "path": "/c", "value": 1.0},
            ],
        ),
        ({"a": [1, 2]}, {"a": [1]}, [{"op": "replace", "path": "/a", "value": [1]}]),
        ({"a/b": {"~": 1}}, {"a/b": {"~": 1, "c": 2}}, [{"op": "add", "path": "/a~1b/c", "value": 2}]),
        ({"x": 1, "y": 2}, {"y": 2}, [{"op": "remove", "path": "/x"}]),
        (
            {"l": [{"n": 1}]},
            {"l": [{"n": 1, "m": 2}, {}]},
            [
                {"op": "add", "path": "/l/0/m", "value": 2},
                {"op": "add", "path": "/l/1", "value": {}},
            ],
        ),
    ],
)
def test_patch_operations_address_the_parts_that_changed(original: Any, changed: Any, expected: Any) -> None:
    assert json_patch(original, changed) == expected


def test_an_ephemeral_container_added_to_a_wired_pod_is_made_read_only() -> None:
    wired = patched(admit(review(pod({"kvc/volume": "cifar"})), catalog), pod({"kvc/volume": "cifar"}))
    wired["spec"]["ephemeralContainers"] = [
        {"name": "debugger", "image": "busybox", "volumeMounts": [{"name": "kvc-datasets-cifar", "mountPath": "/d"}]}
    ]
    update = review(wired, operation="UPDATE")
    update["request"]["subResource"] = "ephemeralcontainers"
    response = admit(update, catalog)
    assert response["response"]["allowed"] is True
    assert patched(response, wired)["spec"]["ephemeralContainers"][0]["volumeMounts"][0]["readOnly"] is True
    # The same update of the pod itself (not the subresource) is none of the webhook's business.
    assert "patch" not in admit(review(wired, operation="UPDATE"), catalog)["response"]


MISSING_CLAIM = "PersistentVolumeClaim scratch not found in namespace team-a"
REASONS = Catalog(
    [
        *ENTRIES,
        CatalogEntry("other", "cifar", "Ready", "ok", SOURCE, AFFINITY, "ReadOnlyMany"),
        CatalogEntry("datasets", "scratch", "Failed", MISSING_CLAIM, SOURCE, None, "ReadWriteMany"),
        CatalogEntry("datasets", "coco", "Provisioning", "1/2", SOURCE, AFFINITY, "ReadOnlyMany"),
    ]
)


@pytest.mark.parametrize(
    ("annotations", "spec", "denial"),
    [
        ({"kvc/volume": "imagenet"}, {}, Denial.UNKNOWN),
        ({"kvc/volume": "cifar"}, {}, Denial.AMBIGUOUS),
        # Its own message says "not found in namespace": it is still a Failed volume, not an unknown one.
        ({"kvc/volume": "scratch"}, {}, Denial.FAILED),
        ({"kvc/volume": "datasets/coco"}, {"nodeName": "n1"}, Denial.NODE_NAME),
        (
            {"kvc/volume": "datasets/cifar"},
            {"volumes": [{"name": "kvc-datasets-cifar", "emptyDir": {}}]},
            Denial.CONFLICT,
        ),
        ({"kvc/volume": "datasets/cifar", "kvc/volumes": "x"}, {}, Denial.INVALID),
        ({"kvc/volume": "datasets/cifar"}, {}, None),
    ],
)
def test_each_refusal_says_what_it_is_about(
    annotations: dict[str, str], spec: dict[str, Any], denial: Denial | None
) -> None:
    obj = pod(annotations)
    obj["spec"].update(spec)
    decision = decide(review(obj), lambda namespace: REASONS)
    assert decision.denial == denial
    assert decision.review["response"]["allowed"] is (denial is None)
    assert decision.namespace == "team-a"
