from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from kvc.sources import _readers
from kvc.sources.base import SourceContext, VolumeManagerRef


def tfjob(name: str, volumes: list[dict[str, Any]], conditions: list[dict[str, str]] | None = None) -> dict[str, Any]:
    template = {"spec": {"containers": [{"name": "tensorflow"}], "volumes": volumes}}
    return {
        "metadata": {"name": name},
        "spec": {"tfReplicaSpecs": {"Chief": {"template": template}, "Worker": {"replicas": 3, "template": template}}},
        "status": {"conditions": conditions or []},
    }


CLAIM = {"name": "kvc-datasets-cifar", "persistentVolumeClaim": {"claimName": "datasets-cifar-0a1b", "readOnly": True}}
HOST_PATH = {"name": "kvc-datasets-old", "hostPath": {"path": "/var/lib/kvc/ns/datasets/old-9f"}}


def pod_template(volumes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"metadata": {}, "spec": {"containers": [{"name": "main"}], "volumes": volumes}}


def test_every_template_volume_of_a_job_is_found() -> None:
    volumes = list(_readers.job_volumes("TFJob", tfjob("resnet", [CLAIM, HOST_PATH])))
    assert volumes == [CLAIM, HOST_PATH, CLAIM, HOST_PATH]
    assert list(_readers.job_volumes("TFJob", {"spec": {"tfReplicaSpecs": "not a map"}})) == []


@pytest.mark.parametrize(
    ("kind", "spec"),
    [
        (
            "JobSet",
            {
                "replicatedJobs": [
                    {"name": "driver", "template": {"spec": {"template": pod_template([CLAIM])}}},
                    {"name": "workers", "template": {"spec": {"template": pod_template([HOST_PATH])}}},
                    {"name": "broken", "template": "not an object"},
                ]
            },
        ),
        (
            "LeaderWorkerSet",
            {
                "leaderWorkerTemplate": {
                    "leaderTemplate": pod_template([HOST_PATH]),
                    "workerTemplate": pod_template([CLAIM]),
                }
            },
        ),
        (
            "TrainJob",
            {
                "runtimeRef": {"name": "torch-distributed"},
                "runtimePatches": [
                    {"manager": "example.com/other"},
                    {
                        "manager": "kvc.kubeflow.org/webhook",
                        "trainingRuntimeSpec": {
                            "template": {
                                "spec": {
                                    "replicatedJobs": [
                                        {
                                            "name": "node",
                                            "template": {"spec": {"template": pod_template([CLAIM, HOST_PATH])}},
                                        }
                                    ]
                                }
                            }
                        },
                    },
                ],
            },
        ),
    ],
)
def test_the_volumes_of_every_pod_template_of_each_workload_kind_are_found(kind: str, spec: dict[str, Any]) -> None:
    assert list(_readers.job_volumes(kind, {"metadata": {"name": "j"}, "spec": spec})) == [CLAIM, HOST_PATH]


def test_a_leaderworkerset_without_a_leader_template_has_its_workers_volumes() -> None:
    spec = {"leaderWorkerTemplate": {"workerTemplate": pod_template([CLAIM])}}
    assert list(_readers.job_volumes("LeaderWorkerSet", {"spec": spec})) == [CLAIM]


@pytest.mark.parametrize(
    ("conditions", "finished"),
    [
        ([], False),
        ([{"type": "Running", "status": "True"}], False),
        ([{"type": "Succeeded", "status": "False"}], False),
        ([{"type": "Created", "status": "True"}, {"type": "Succeeded", "status": "True"}], True),
        ([{"type": "Failed", "status": "True"}], True),
    ],
)
def test_a_job_is_finished_once_it_succeeded_or_failed(conditions: list[dict[str, str]], finished: bool) -> None:
    assert _readers.job_finished("TFJob", tfjob("j", [], conditions)) is finished


@pytest.mark.parametrize(
    ("kind", "condition", "finished"),
    [
        ("JobSet", "Completed", True),
        ("JobSet", "Failed", True),
        ("JobSet", "Suspended", False),
        ("TrainJob", "Complete", True),
        ("TrainJob", "Failed", True),
        ("TrainJob", "Succeeded", False),  # not a TrainJob condition
        ("LeaderWorkerSet", "Available", False),
        ("LeaderWorkerSet", "Failed", False),  # a serving group runs until it is deleted
    ],
)
def test_each_kind_finishes_on_its_own_conditions(kind: str, condition: str, finished: bool) -> None:
    job = {"status": {"conditions": [{"type": condition, "status": "True"}]}}
    assert _readers.job_finished(kind, job) is finished


class Listing:
    """CustomObjectsApi.list_namespaced_custom_object over fixed answers (plural -> items or an API status)."""

    def __init__(self, answers: dict[str, list[dict[str, Any]] | int]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, str, str, str]] = []

    def list_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str) -> Any:
        self.asked.append((group, version, namespace, plural))
        answer = self.answers.get(plural, 404)
        if isinstance(answer, int):
            raise ApiException(status=answer)
        return {"items": answer}


def context(custom: Listing) -> SourceContext:
    return SourceContext(owner=VolumeManagerRef("team-a", "datasets", "uid-1"), core=None, custom=custom)


def test_unfinished_workloads_of_every_kind_keep_the_claims_their_templates_mount() -> None:
    wired = {"leaderWorkerTemplate": {"workerTemplate": pod_template([CLAIM])}}
    done = {"type": "Completed", "status": "True"}
    custom = Listing(
        {
            "tfjobs": [tfjob("resnet", [CLAIM])],
            "pytorchjobs": 403,  # KVC may not read them: none to keep data for
            "jobsets": [
                {"metadata": {"name": "done"}, "spec": {"replicatedJobs": []}, "status": {"conditions": [done]}},
            ],
            "leaderworkersets": [{"metadata": {"name": "serve"}, "spec": wired}],
            # trainjobs: 404, the CRD is not installed
        }
    )
    readers = _readers.job_readers(context(custom))
    assert readers.of("datasets-cifar-0a1b", "/nowhere") == ["leaderworkerset/serve", "tfjob/resnet"]
    assert {(group, version, plural) for group, version, _, plural in custom.asked} == {
        ("kubeflow.org", "v1", "tfjobs"),
        ("kubeflow.org", "v1", "pytorchjobs"),
        ("jobset.x-k8s.io", "v1alpha2", "jobsets"),
        ("leaderworkerset.x-k8s.io", "v1", "leaderworkersets"),
        ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
    }
    assert {namespace for _, _, namespace, _ in custom.asked} == {"team-a"}


def test_other_api_errors_are_not_taken_for_no_workloads() -> None:
    with pytest.raises(ApiException):
        _readers.job_readers(context(Listing({"jobsets": 500})))


def test_readers_are_found_by_claim_or_by_node_path() -> None:
    readers = _readers._collect([("tfjob/resnet", [CLAIM, HOST_PATH]), ("pod/early", [CLAIM]), ("pod/other", [])])
    assert readers.of("datasets-cifar-0a1b", "/nowhere") == ["pod/early", "tfjob/resnet"]
    assert readers.of("no-such-claim", "/var/lib/kvc/ns/datasets/old-9f") == ["tfjob/resnet"]
    assert readers.of("no-such-claim", "/nowhere") == []
