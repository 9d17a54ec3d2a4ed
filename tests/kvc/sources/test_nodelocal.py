from __future__ import annotations

import pytest

from kvc.api.models import VolumePhase
from kvc.sources._nodelocal import data_label, node_affinity, node_path, replica_key, volume_phase
from kvc.sources.base import VolumeManagerRef

FAILED = [{"name": "node-1", "message": "bucket b does not exist"}]


@pytest.mark.parametrize(
    ("ready", "shortfall", "failed", "was_usable", "phase", "message"),
    [
        (2, "", [], False, VolumePhase.READY, "2/2 replicas ready"),
        (0, "", [], False, VolumePhase.PROVISIONING, "0/2 replicas ready, 5/10 bytes"),
        (1, "", [], False, VolumePhase.PROVISIONING, "1/2 replicas ready, 5/10 bytes"),
        (1, "", [], True, VolumePhase.DEGRADED, "1/2 replicas ready, 5/10 bytes"),
        (1, "only 1 of 2", [], False, VolumePhase.DEGRADED, "1/2 replicas ready; only 1 of 2"),
        (0, "only 0 of 2", [], True, VolumePhase.PENDING, "0/2 replicas ready; only 0 of 2"),
        (0, "", FAILED, False, VolumePhase.FAILED, "node-1: bucket b does not exist"),
        (
            1,
            "",
            FAILED,
            False,
            VolumePhase.PROVISIONING,
            "1/2 replicas ready, 5/10 bytes; node-1: bucket b does not exist",
        ),
    ],
)
def test_volume_phase(
    ready: int, shortfall: str, failed: list[dict[str, str]], was_usable: bool, phase: VolumePhase, message: str
) -> None:
    assert volume_phase(2, ready, shortfall=shortfall, failed=failed, was_usable=was_usable, progress="5/10 bytes") == (
        phase,
        message,
    )


def test_names_for_long_namespaces_names_and_ids_stay_valid() -> None:
    owner = VolumeManagerRef(namespace="n" * 63, name="v" * 253, uid="uid-1")
    label = data_label(owner, "i" * 63, "abc")
    prefix, name = label.split("/")
    assert prefix == "data.kvc.kubeflow.org"
    assert len(name) <= 63
    assert label != data_label(owner, "i" * 63, "abd")
    assert data_label(VolumeManagerRef("a", "b", "u1"), "c", "d") != data_label(
        VolumeManagerRef("a", "b", "u2"), "c", "d"
    )


def test_paths_keys_and_affinity() -> None:
    owner = VolumeManagerRef(namespace="team-a", name="datasets", uid="u")
    assert node_path("/var/lib/kvc/", owner, "cifar", "0123") == "/var/lib/kvc/team-a/datasets/cifar-0123"
    assert replica_key(owner, "cifar", "0123") == "team-a.datasets.cifar-0123"
    assert node_affinity("k") == {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "k", "operator": "Exists"}]}]
        }
    }
