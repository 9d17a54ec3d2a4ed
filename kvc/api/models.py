"""Typed views of the VolumeManager spec and of what the controller reports per volume.

The CRD's schema is the authority on what the API server accepts; these models give the
controller typed access to objects that already passed it (and parse defensively: an
object stored before a schema change still loads).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class AccessMode(StrEnum):
    READ_WRITE_ONCE = "ReadWriteOnce"
    READ_ONLY_MANY = "ReadOnlyMany"
    READ_WRITE_MANY = "ReadWriteMany"
    READ_WRITE_ONCE_POD = "ReadWriteOncePod"


class VolumePhase(StrEnum):
    PENDING = "Pending"
    PROVISIONING = "Provisioning"
    READY = "Ready"
    DEGRADED = "Degraded"
    FAILED = "Failed"


class State(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    FAILED = "Failed"
    DELETING = "Deleting"


class VolumeConfig(BaseModel):
    """One entry of spec.volumeConfigs."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    id: str
    source_type: str = Field(alias="sourceType")
    replicas: int = 1
    access_mode: str = Field(default=AccessMode.READ_WRITE_ONCE.value, alias="accessMode")
    capacity: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    node_affinity: dict[str, Any] | None = Field(default=None, alias="nodeAffinity")
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    options: dict[str, str] = Field(default_factory=dict)


class VolumeStatus(BaseModel):
    """One entry of status.volumes: what a source type reports for a volume."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    id: str
    source_type: str | None = Field(default=None, alias="sourceType")
    phase: VolumePhase
    message: str
    volume_source: dict[str, Any] | None = Field(default=None, alias="volumeSource")
    node_affinity: dict[str, Any] | None = Field(default=None, alias="nodeAffinity")
    replicas: dict[str, int] | None = None
    nodes: list[dict[str, Any]] | None = None
    claim_name: str | None = Field(default=None, alias="claimName")
    persistent_volume_name: str | None = Field(default=None, alias="persistentVolumeName")

    def to_status(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
