from __future__ import annotations

from typing import Any

import pytest

from kvc.sources import _readers


def tfjob(name: str, volumes: list[dict[str, Any]], conditions: list[dict[str, str]] | None = None) -> dict[str, Any]:
    template = {"spec": {"containers": [{"name": "tensorflow"}], "volumes": volumes}}
    return {
        "metadata": {"name": name},
        "spec": {"tfReplicaSpecs": {"Chief": {"template": template}, "Worker": {"replicas": 3, "template": template}}},
        "status": {"conditions": conditions or []},
    }


CLAIM = {"name": "kvc-datasets-cifar", "persistentVolumeClaim": {"claimName": "datasets-cifar-0a1b", "readOnly": True}}
HOST_PATH = {"name": "kvc-datasets-old", "hostPath": {"path": "/var/lib/kvc/ns/datasets/old-9f"}}


def test_every_template_volume_of_a_job_is_found() -> None:
    volumes = list(_readers.job_volumes("tfReplicaSpecs", tfjob("resnet", [CLAIM, HOST_PATH])))
    assert volumes == [CLAIM, HOST_PATH, CLAIM, HOST_PATH]
    assert list(_readers.job_volumes("tfReplicaSpecs", {"spec": {"tfReplicaSpecs": "not a map"}})) == []


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
    assert _readers.job_finished(tfjob("j", [], conditions)) is finished


def test_readers_are_found_by_claim_or_by_node_path() -> None:
    readers = _readers._collect([("tfjob/resnet", [CLAIM, HOST_PATH]), ("pod/early", [CLAIM]), ("pod/other", [])])
    assert readers.of("datasets-cifar-0a1b", "/nowhere") == ["pod/early", "tfjob/resnet"]
    assert readers.of("no-such-claim", "/var/lib/kvc/ns/datasets/old-9f") == ["tfjob/resnet"]
    assert readers.of("no-such-claim", "/nowhere") == []
