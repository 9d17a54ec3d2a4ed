from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvc.api.models import VolumeConfig, VolumePhase
from kvc.sources.pvc import PVCSource, claim_status


def config(claim: str = "data", mode: str = "ReadWriteOnce") -> VolumeConfig:
    return VolumeConfig.model_validate(
        {"id": "v", "sourceType": "PVC", "accessMode": mode, "options": {"claimName": claim}}
    )


def claim(phase: str | None, deleting: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        metadata=SimpleNamespace(deletion_timestamp="now" if deleting else None), status=SimpleNamespace(phase=phase)
    )


@pytest.mark.parametrize(
    ("found", "phase", "fragment"),
    [
        (None, VolumePhase.PENDING, "PersistentVolumeClaim data not found in namespace ns"),
        (claim("Bound"), VolumePhase.READY, "claim data is bound"),
        (claim("Pending"), VolumePhase.PENDING, "waiting for claim data to bind (it is Pending)"),
        (claim("Lost"), VolumePhase.FAILED, "lost its PersistentVolume"),
        (claim("Bound", deleting=True), VolumePhase.PENDING, "claim data is being deleted"),
    ],
)
def test_claim_state_maps_to_volume_status(found: SimpleNamespace | None, phase: VolumePhase, fragment: str) -> None:
    status = claim_status(config(), "ns", found)
    assert status.phase == phase
    assert fragment in status.message
    assert status.volume_source == {"persistentVolumeClaim": {"claimName": "data", "readOnly": False}}


def test_read_only_many_is_mounted_read_only() -> None:
    status = claim_status(config(mode="ReadOnlyMany"), "ns", claim("Bound"))
    assert status.volume_source == {"persistentVolumeClaim": {"claimName": "data", "readOnly": True}}


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "options.claimName is required for PVC volumes"),
        ("Data", "options.claimName 'Data' is not a valid PersistentVolumeClaim name"),
        ("a" * 254, "is not a valid PersistentVolumeClaim name"),
        ("bad..name", "is not a valid PersistentVolumeClaim name"),
    ],
)
def test_claim_name_is_validated(name: str, problem: str) -> None:
    assert any(problem in p for p in PVCSource().validate(config(claim=name)))


def test_every_access_mode_is_accepted() -> None:
    for mode in ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"):
        assert PVCSource().validate(config(mode=mode)) == []
